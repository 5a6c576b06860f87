"""
Attacks on the gateway's held writes (txwssec/gateway/held.py): the client
leaves (a reset, a FIN, a close frame) in the same segment as messages the
gateway has read but still holds for the upstream; the upstream gets every
message, in order, then the close; nothing is written after the close.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import wsframes
from conftest import aio, upgrade_request
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


# -- a wss client of the gateway that stops reading -------------------------------------


@pytest_twisted.ensureDeferred
async def test_slow_wss_client_pauses_the_upstream(serve: Serve, tmp_path: Path) -> None:
    """
    test_gateway_lifecycle's slow client, over txwssec's TLS transport: the
    client (TLS, small receive buffer) stops reading while the upstream
    floods 300 x 64 KiB; the gateway stops reading from the upstream, its
    memory does not hold the flood, nothing is closed; once the client
    reads again it gets every message, in order.
    """
    import test_gateway_lifecycle as life
    from test_tls_wire import context

    from txwssec import SecureServerFactory
    from txwssec._tlswire import ServerTLSFactory
    from txwssec.devcert import issue, make_ca

    ca = make_ca("held CA")
    server = issue(ca, "localhost", ip_addresses=("127.0.0.1",))
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    (tmp_path / "server.pem").write_bytes(server.cert_pem())
    (tmp_path / "server.key").write_bytes(server.key_pem())
    upstream_server = life.UpstreamServer(echo=False)
    factory = SecureServerFactory(life.gateway_route(serve(upstream_server)))
    port = serve(ServerTLSFactory(context(tmp_path), False, factory))

    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024)
    raw.settimeout(life.SANITY_TIMEOUT)

    def open_session() -> Any:
        raw.connect(("127.0.0.1", port))
        client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        tls = client.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(upgrade_request("/ws", f"apikey: {life.KEY}"))
        head = b""
        while b"\r\n\r\n" not in head:
            head += tls.recv(1)
        assert head.startswith(b"HTTP/1.1 101 ")
        return tls

    tls = await aio(asyncio.to_thread(open_session))
    try:
        upstream = await upstream_server.next_open()
        (leg,) = factory.sessions["jack"]
        upstream_transport = leg.upstream.transport
        memory = life.Memory()
        upstream.flood(life.FLOOD_COUNT)
        await life.stalled(
            lambda: upstream.sent,
            lambda: upstream.paused and not life.reading(upstream_transport),
            "the upstream paused, the gateway not reading from it",
        )
        assert upstream.sent < life.FLOOD_COUNT
        assert memory.growth_kib() < life.MEMORY_BOUND_KIB, memory.growth_kib()
        assert leg.state == leg.STATE_OPEN

        def read_all() -> list[int]:
            buffer = b""
            indexes = []
            while len(indexes) < life.FLOOD_COUNT:
                while True:
                    parsed = _server_frame(buffer)
                    if parsed is None:
                        break
                    (opcode, payload), buffer = parsed
                    assert opcode == BINARY
                    assert payload == life.numbered(len(indexes))
                    indexes.append(len(indexes))
                if len(indexes) < life.FLOOD_COUNT:
                    buffer += tls.recv(1 << 20)
            return indexes

        indexes = await aio(asyncio.to_thread(read_all))
        assert indexes == list(range(life.FLOOD_COUNT))
        assert factory.counters["limit.max_buffered_bytes"] == 0
    finally:
        tls.close()


def _server_frame(buffer: bytes) -> tuple[tuple[int, bytes], bytes] | None:
    """One whole unmasked frame from C{buffer}, and the rest (or None)."""
    if len(buffer) < 2:
        return None
    opcode, size, at = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
    if size == 126:
        if len(buffer) < 4:
            return None
        (size,), at = struct.unpack("!H", buffer[2:4]), 4
    elif size == 127:
        if len(buffer) < 10:
            return None
        (size,), at = struct.unpack("!Q", buffer[2:10]), 10
    if len(buffer) < at + size:
        return None
    return (opcode, buffer[at : at + size]), buffer[at + size :]
