"""
Attacks on the gateway's held writes (txwssec/gateway/held.py): the client
leaves (a reset, a FIN, a close frame) in the same segment as messages the
gateway has read but still holds for the upstream; the upstream gets every
message, in order, then the close; nothing is written after the close.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
import pytest_twisted
import wsframes
from conftest import aio
from test_gateway_relay import FrameEchoFactory, Serve, gateway, the_end, unmasked, until
from wsframes import BINARY, TEXT, close_frame, frame

MESSAGES = 20


def _messages() -> bytes:
    return b"".join(
        frame(BINARY if index % 2 else TEXT, b"%d;" % index + b"x" * (index * 997))
        for index in range(MESSAGES)
    )


def _expected() -> list[bytes]:
    return [b"%d;" % index + b"x" * (index * 997) for index in range(MESSAGES)]


@pytest.mark.parametrize("ending", ["reset", "fin", "close frame"])
@pytest_twisted.ensureDeferred
async def test_client_leaves_with_messages_held_for_the_upstream(
    serve: Serve, ending: str
) -> None:
    upstream = FrameEchoFactory(echo=False)
    env = gateway(serve, upstream)
    client = await aio(env.raw())
    data = _messages()
    if ending == "close frame":
        data += close_frame(1000, "bye")
    sock: Any = client.writer.get_extra_info("socket")
    if ending == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.write(data)
    await aio(client.writer.drain())
    if ending == "fin":
        client.writer.write_eof()
    if ending != "close frame":
        client.close()
    await aio(until(lambda: upstream.closes, "the upstream leg closed"))
    received = [message.payload for message in upstream.messages]
    if ending == "reset":
        # (the kernel may drop what the gateway had not read when the reset came)
        assert received == _expected()[: len(received)]
    else:
        assert received == _expected()
    assert upstream.closes == [1000 if ending == "close frame" else 1001]
    assert upstream.failures == []
    if ending == "close frame":
        _, close = await aio(wsframes.read_until_close(client.reader, 10))
        assert close.close_code == 1000
        client.close()


@pytest_twisted.ensureDeferred
async def test_client_closes_while_the_upstream_is_mid_message(serve: Serve) -> None:
    """
    The upstream sends a 4 MiB message in 64 fragments; the client closes
    once the first fragment is in: it gets fragments of that message, in
    order, then the close, then nothing (no frame after the close).
    """
    upstream = FrameEchoFactory(echo=False)
    env = gateway(serve, upstream)
    client = await aio(env.raw())
    piece = bytes(range(256)) * 256  # 64 KiB
    fragments = [
        unmasked(BINARY if index == 0 else 0, piece, fin=index == 63) for index in range(64)
    ]
    upstream.only.write(b"".join(fragments))
    first = await aio(wsframes.read_frame(client.reader, 10))
    assert (first.opcode, first.payload) == (BINARY, piece)
    await aio(client.send(close_frame(1000, "enough")))
    before, close = await aio(wsframes.read_until_close(client.reader, 10))
    assert all((f.opcode, f.payload) == (0, piece) for f in before)
    assert close.close_code == 1000
    rest = await aio(the_end(client))
    assert rest == b""
    await aio(until(lambda: upstream.closes, "the upstream leg closed"))
    assert upstream.closes == [1000]
