"""
Size limits: C{max_message_size} per frame and per message (plain,
fragmented and permessage-deflate, checked on the decompressed size), the
cap on fragments per message, the cap on control frames while writes to the
peer are blocked, and unit tests of L{TrafficGuard} and L{TokenBucket}.

End-to-end tests run a real L{SecureServerFactory} on 127.0.0.1 with real
clients: C{websockets} where a library client can say it, hand-built
frames (L{wsframes}) where it cannot (exact fragment counts, a header that
promises 2**40 bytes, a compression bomb). Close codes are read from the
close frame the client receives.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
import websockets
import wsframes
from conftest import aio
from memory import memory_kib, reset_peak_rss
from websockets.exceptions import ConnectionClosed

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec.apps.echo import EchoProtocol
from txwssec.limits import TokenBucket
from txwssec.policy import RouteLimits
from txwssec.server import SecureServerProtocol
from txwssec.traffic import BYTE_RATE, CONTROL_FRAMES, FRAGMENTS, MESSAGE_RATE, TrafficGuard

Serve = Callable[[Any], int]

#: The route's max_message_size in most tests (small: tests stay fast).
LIMIT = 65536
MIB = 1024 * 1024
#: A missing close fails the test after this long instead of hanging it.
SANITY_TIMEOUT = 10.0

DEFLATE_OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"


# -- helpers ----------------------------------------------------------------


def echo_factory(
    max_message_size: int = LIMIT,
    limits: RouteLimits | None = None,
    compression: bool = False,
) -> SecureServerFactory:
    """An anonymous echo route at /echo."""
    route = RoutePolicy(
        "/echo",
        [AnonymousAuthenticator()],
        protocol=EchoProtocol,
        max_message_size=max_message_size,
        limits=limits or RouteLimits(),
        compression=compression,
    )
    return SecureServerFactory(ServerPolicy.single(route))


def only_session(factory: SecureServerFactory) -> SecureServerProtocol:
    """The one open session of the anonymous consumer."""
    (protocol,) = factory.sessions["anonymous"]
    return protocol


def payload_of(opcode: int, size: int) -> bytes:
    """
    C{size} bytes: valid UTF-8 with two-byte characters for text (so a
    character boundary never decides the limit), random for binary.
    """
    if opcode == wsframes.TEXT:
        text = ("é" * (size // 2) + "x" * (size % 2)).encode()
        assert len(text) == size
        return text
    return os.urandom(size)


def deflate(data: bytes | list[bytes]) -> bytes:
    """
    A permessage-deflate message body (RFC 7692 section 7.2.1): raw deflate,
    sync-flushed, with the trailing 00 00 ff ff removed. C{data} may be a
    list of chunks, to compress a large message without holding it whole.
    """
    compressor = zlib.compressobj(wbits=-15)
    chunks = data if isinstance(data, list) else [data]
    body = b"".join(compressor.compress(chunk) for chunk in chunks)
    body += compressor.flush(zlib.Z_SYNC_FLUSH)
    assert body.endswith(b"\x00\x00\xff\xff")
    return body[:-4]


@functools.cache
def bomb() -> bytes:
    """64 MiB of zeros, deflated: about 64 KiB on the wire."""
    zeros = bytes(MIB)
    return deflate([zeros] * 64)


async def raw_close(client: wsframes.RawClient) -> tuple[list[wsframes.Frame], int | None]:
    """Read until the server's close frame: the frames before it and its code."""
    try:
        before, close = await wsframes.read_until_close(client.reader, SANITY_TIMEOUT)
    finally:
        client.close()
    return before, close.close_code


async def raw_echo(port: int, message: bytes, *headers: str) -> wsframes.Frame:
    """Send C{message} (complete frames), return the echoed message."""
    client = await wsframes.connect(port, "/echo", *headers)
    try:
        await client.send(message)
        return await wsframes.read_message(client.reader, SANITY_TIMEOUT)
    finally:
        client.close()


async def raw_refused(
    port: int, message: bytes, *headers: str
) -> tuple[list[wsframes.Frame], int]:
    """
    Send C{message} (frames, possibly incomplete), return what came back
    before the close frame and the close code.
    """
    client = await wsframes.connect(port, "/echo", *headers)
    await client.send(message)
    before, code = await raw_close(client)
    assert code is not None
    return before, code


async def ws_echo(port: int, message: str | bytes, compression: str | None = None) -> str | bytes:
    """Echo one message through a C{websockets} client."""
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/echo", compression=compression, max_size=None
    ) as ws:
        await ws.send(message)
        return await asyncio.wait_for(ws.recv(), SANITY_TIMEOUT)


async def ws_close_code(port: int, message: str | bytes, compression: str | None = None) -> int:
    """Send one message through a C{websockets} client; the close code it gets."""
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/echo", compression=compression, max_size=None
    ) as ws:
        try:
            await ws.send(message)
            echoed = await asyncio.wait_for(ws.recv(), SANITY_TIMEOUT)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "closed without a close frame"
            return closed.rcvd.code
    raise AssertionError(f"message echoed instead of refused ({len(echoed)} bytes)")


# -- max_message_size, uncompressed -------------------------------------------


@pytest.mark.parametrize("opcode", [wsframes.TEXT, wsframes.BINARY], ids=["text", "binary"])
@pytest_twisted.ensureDeferred
async def test_message_of_exactly_the_limit_is_delivered(serve: Serve, opcode: int) -> None:
    factory = echo_factory()
    port = serve(factory)
    message = payload_of(opcode, LIMIT)
    echoed = await aio(raw_echo(port, wsframes.frame(opcode, message)))
    assert (echoed.opcode, echoed.payload) == (opcode, message)
    assert factory.counters["limit.max_message_size"] == 0


@pytest.mark.parametrize("opcode", [wsframes.TEXT, wsframes.BINARY], ids=["text", "binary"])
@pytest_twisted.ensureDeferred
async def test_message_over_the_limit_closes_1009(serve: Serve, opcode: int) -> None:
    """One byte over: 1009, and nothing of the message reaches the application."""
    factory = echo_factory()
    port = serve(factory)
    before, code = await aio(
        raw_refused(port, wsframes.frame(opcode, payload_of(opcode, LIMIT + 1)))
    )
    assert code == 1009
    assert before == []
    assert factory.counters["limit.max_message_size"] == 1


@pytest_twisted.ensureDeferred
async def test_websockets_client_limit_and_limit_plus_one(serve: Serve) -> None:
    """The same boundary seen by a library client, text and binary."""
    port = serve(echo_factory())
    text = "é" * (LIMIT // 2)
    data = os.urandom(LIMIT)
    assert await aio(ws_echo(port, text)) == text
    assert await aio(ws_echo(port, data)) == data
    assert await aio(ws_close_code(port, text + "x")) == 1009
    assert await aio(ws_close_code(port, data + b"x")) == 1009


@pytest.mark.parametrize("opcode", [wsframes.TEXT, wsframes.BINARY], ids=["text", "binary"])
@pytest_twisted.ensureDeferred
async def test_fragmented_message_of_exactly_the_limit_is_delivered(
    serve: Serve, opcode: int
) -> None:
    factory = echo_factory()
    port = serve(factory)
    message = payload_of(opcode, LIMIT)
    echoed = await aio(raw_echo(port, wsframes.fragments(opcode, message, 5)))
    assert (echoed.opcode, echoed.payload) == (opcode, message)


@pytest.mark.parametrize("opcode", [wsframes.TEXT, wsframes.BINARY], ids=["text", "binary"])
@pytest_twisted.ensureDeferred
async def test_fragmented_message_over_the_limit_closes_1009(serve: Serve, opcode: int) -> None:
    """
    Every fragment is under the limit, their total one byte over it: the
    per-message check closes 1009 and delivers nothing.
    """
    factory = echo_factory()
    port = serve(factory)
    message = payload_of(opcode, LIMIT + 1)
    before, code = await aio(raw_refused(port, wsframes.fragments(opcode, message, 5)))
    assert code == 1009
    assert before == []
    assert factory.counters["limit.max_message_size"] == 1


@pytest.mark.parametrize("opcode", [wsframes.TEXT, wsframes.BINARY], ids=["text", "binary"])
@pytest_twisted.ensureDeferred
async def test_huge_length_header_closes_1009_without_waiting_for_payload(
    serve: Serve, opcode: int
) -> None:
    """
    A frame header announcing 2**40 bytes, and no payload at all: the
    server answers 1009 from the header alone, then ends the connection
    (the client never sends anything else).
    """
    factory = echo_factory()
    port = serve(factory)

    async def attempt() -> tuple[int | None, bytes]:
        client = await wsframes.connect(port)
        await client.send(wsframes.frame_header(opcode, 2**40, mask=os.urandom(4)))
        _, close = await wsframes.read_until_close(client.reader, SANITY_TIMEOUT)
        # The server does not wait for a payload that will never come: it
        # drops the TCP connection after its close timeout (1 s), with a
        # reset (abort) since the peer never completed the close.
        try:
            rest = await asyncio.wait_for(client.reader.read(), SANITY_TIMEOUT)
        except ConnectionResetError:
            rest = b""
        client.close()
        return close.close_code, rest

    code, rest = await aio(attempt())
    assert (code, rest) == (1009, b"")
    assert factory.counters["limit.max_message_size"] == 1


@pytest_twisted.ensureDeferred
async def test_huge_length_in_a_later_fragment_closes_1009(serve: Serve) -> None:
    """A continuation frame that announces 2**40 bytes closes 1009 too."""
    port = serve(echo_factory())
    start = wsframes.frame(wsframes.BINARY, b"a" * 100, fin=False)
    huge = wsframes.frame_header(wsframes.CONTINUATION, 2**40, mask=os.urandom(4))
    before, code = await aio(raw_refused(port, start + huge))
    assert (before, code) == ([], 1009)


# -- compression off by default -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_compression_is_off_by_default(serve: Serve) -> None:
    """An offered permessage-deflate is ignored: no extension in the 101."""
    port = serve(echo_factory())

    async def handshake() -> bytes:
        client = await wsframes.connect(port, "/echo", DEFLATE_OFFER)
        client.close()
        return client.response

    response = await aio(handshake())
    assert response.startswith(b"HTTP/1.1 101 ")
    assert b"sec-websocket-extensions" not in response.lower()


@pytest_twisted.ensureDeferred
async def test_websockets_client_offering_deflate_gets_none_by_default(serve: Serve) -> None:
    port = serve(echo_factory())

    async def run() -> tuple[list[Any], str]:
        async with websockets.connect(f"ws://127.0.0.1:{port}/echo", compression="deflate") as ws:
            await ws.send("plain")
            return list(ws.protocol.extensions), str(await ws.recv())

    assert await aio(run()) == ([], "plain")


@pytest_twisted.ensureDeferred
async def test_compressed_frame_without_negotiation_is_a_protocol_error(serve: Serve) -> None:
    """
    RSV1 set when permessage-deflate was not negotiated: 1002, and the
    payload (a bomb) is not inflated.
    """
    factory = echo_factory(max_message_size=MIB)
    port = serve(factory)
    before, code = await aio(
        raw_refused(port, wsframes.frame(wsframes.BINARY, bomb(), rsv1=True), DEFLATE_OFFER)
    )
    assert (before, code) == ([], 1002)
    assert factory.counters["limit.max_message_size"] == 0


# -- compression on -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_compression_on_negotiates_deflate(serve: Serve) -> None:
    port = serve(echo_factory(compression=True))

    async def handshake() -> bytes:
        client = await wsframes.connect(port, "/echo", DEFLATE_OFFER)
        client.close()
        return client.response

    response = (await aio(handshake())).lower()
    assert b"\r\nsec-websocket-extensions: permessage-deflate" in response


@pytest_twisted.ensureDeferred
async def test_compressed_messages_are_echoed(serve: Serve) -> None:
    """A websockets client with compression: several messages, both types."""
    port = serve(echo_factory(compression=True))

    async def run() -> list[str | bytes]:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/echo", compression="deflate", max_size=None
        ) as ws:
            assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]
            received: list[str | bytes] = []
            messages: list[str | bytes] = ["hello", b"\x00\x01" * 1000, "again " * 500, b""]
            for message in messages:
                await ws.send(message)
                received.append(await asyncio.wait_for(ws.recv(), SANITY_TIMEOUT))
            return received

    assert await aio(run()) == ["hello", b"\x00\x01" * 1000, "again " * 500, b""]


@pytest.mark.parametrize(
    "content",
    ["zeros", "text", "random"],
)
@pytest_twisted.ensureDeferred
async def test_compressed_message_of_exactly_the_limit_is_delivered(
    serve: Serve, content: str
) -> None:
    """
    The limit is on the decompressed size: a message of exactly the limit
    is delivered intact however well (or badly) it compresses. Random bytes
    grow a little when deflated, so their frame on the wire is over the
    limit while the message is not.
    """
    factory = echo_factory(compression=True)
    port = serve(factory)
    message = {
        "zeros": bytes(LIMIT),
        "text": (b"the quick brown fox " * LIMIT)[:LIMIT],
        "random": os.urandom(LIMIT),
    }[content]
    assert await aio(ws_echo(port, message, "deflate")) == message
    assert factory.counters["limit.max_message_size"] == 0


@pytest.mark.parametrize("content", ["zeros", "text", "random"])
@pytest_twisted.ensureDeferred
async def test_compressed_message_over_the_limit_closes_1009(serve: Serve, content: str) -> None:
    """One byte over the limit once inflated: 1009, whatever its wire size."""
    factory = echo_factory(compression=True)
    port = serve(factory)
    message = {
        "zeros": bytes(LIMIT + 1),
        "text": (b"the quick brown fox " * LIMIT)[: LIMIT + 1],
        "random": os.urandom(LIMIT + 1),
    }[content]
    assert await aio(ws_close_code(port, message, "deflate")) == 1009
    assert factory.counters["limit.max_message_size"] == 1


async def send_trickled(client: wsframes.RawClient, data: bytes, step: int = 4096) -> None:
    """
    Send C{data} a few KiB at a time with a short pause between writes, so
    that the server inflates frames in several pieces.
    """
    for offset in range(0, len(data), step):
        await client.send(data[offset : offset + step])
        await asyncio.sleep(0.005)


def inflate(frame: wsframes.Frame) -> bytes:
    """The payload of a message the server may have compressed (first message)."""
    if not frame.rsv1:
        return frame.payload
    return zlib.decompressobj(wbits=-15).decompress(frame.payload + b"\x00\x00\xff\xff")


@pytest.mark.parametrize("delivery", ["whole", "trickled"])
@pytest.mark.parametrize("content", ["pattern", "random"])
@pytest.mark.parametrize("extra", [0, 1], ids=["limit", "limit+1"])
@pytest_twisted.ensureDeferred
async def test_raw_compressed_boundary(
    serve: Serve, extra: int, content: str, delivery: str
) -> None:
    """
    The same boundary with a hand-deflated message split into 4 frames
    (RSV1 on the first only), sent at once or trickled: exactly the limit
    is delivered byte for byte, even random bytes whose deflated frames are
    longer on the wire than the limit; one more byte closes 1009 with
    nothing delivered.
    """
    factory = echo_factory(compression=True)
    port = serve(factory)
    size = LIMIT + extra
    message = os.urandom(size) if content == "random" else (bytes(range(256)) * size)[:size]
    wire = wsframes.fragments(wsframes.BINARY, deflate(message), 4, rsv1=True)
    if content == "random":
        assert len(wire) > LIMIT

    async def run() -> tuple[list[wsframes.Frame], int | None]:
        client = await wsframes.connect(port, "/echo", DEFLATE_OFFER)
        if delivery == "whole":
            await client.send(wire)
        else:
            await send_trickled(client, wire)
        if extra:
            return await raw_close(client)
        try:
            return [await wsframes.read_message(client.reader, SANITY_TIMEOUT)], None
        finally:
            client.close()

    frames, code = await aio(run())
    if extra:
        assert (frames, code) == ([], 1009)
        assert factory.counters["limit.max_message_size"] == 1
    else:
        (echoed,) = frames
        assert (echoed.opcode, inflate(echoed)) == (wsframes.BINARY, message)
        assert factory.counters["limit.max_message_size"] == 0


@pytest_twisted.ensureDeferred
async def test_huge_compressed_frame_header_closes_1009(serve: Serve) -> None:
    """
    A compressed frame may be a little longer on the wire than the limit,
    but not 2**40 bytes: 1009 from the header alone.
    """
    factory = echo_factory(compression=True)
    port = serve(factory)
    header = wsframes.frame_header(wsframes.BINARY, 2**40, rsv1=True, mask=os.urandom(4))
    before, code = await aio(raw_refused(port, header, DEFLATE_OFFER))
    assert (before, code) == ([], 1009)
    assert factory.counters["limit.max_message_size"] == 1


@pytest.mark.parametrize("extra", [0, 1], ids=["limit", "limit+1"])
@pytest_twisted.ensureDeferred
async def test_uncompressed_message_after_compressed_one_keeps_exact_limit(
    serve: Serve, extra: int
) -> None:
    """
    On a connection with permessage-deflate, an uncompressed message (RSV1
    clear) after a compressed one is held to the limit on the wire, exactly:
    the compressed message's wider wire allowance does not carry over.
    """
    factory = echo_factory(compression=True)
    port = serve(factory)
    random = os.urandom(LIMIT)

    async def run() -> tuple[list[wsframes.Frame], int | None]:
        client = await wsframes.connect(port, "/echo", DEFLATE_OFFER)
        await client.send(wsframes.frame(wsframes.BINARY, deflate(random), rsv1=True))
        first = await wsframes.read_message(client.reader, SANITY_TIMEOUT)
        await client.send(wsframes.frame(wsframes.BINARY, bytes(LIMIT + extra)))
        if extra:
            before, code = await raw_close(client)
            return [first, *before], code
        try:
            return [first, await wsframes.read_message(client.reader, SANITY_TIMEOUT)], None
        finally:
            client.close()

    frames, code = await aio(run())
    # The server's compressor keeps its context from message to message.
    inflater = zlib.decompressobj(wbits=-15)
    payloads = [
        inflater.decompress(f.payload + b"\x00\x00\xff\xff") if f.rsv1 else f.payload
        for f in frames
    ]
    if extra:
        assert (payloads, code) == ([random], 1009)
    else:
        assert (payloads, code) == ([random, bytes(LIMIT)], None)


@pytest.mark.parametrize("split", [1, 8], ids=["one-frame", "fragmented"])
@pytest_twisted.ensureDeferred
async def test_compression_bomb_closes_1009_without_inflating(serve: Serve, split: int) -> None:
    """
    64 MiB of zeros, about 64 KiB deflated, against a 1 MiB limit: 1009, and
    the server never holds more than about the limit in inflated bytes.

    Memory is checked with the process's peak RSS (VmHWM), reset just before
    the attack (server and client share this process). Inflating the bomb
    would need at least 64 MiB at once (Autobahn joins a message into one
    bytes object), so a 16 MiB bound separates "bounded by the 1 MiB
    limit" from "inflated" with a wide margin on both sides: it is a memory
    bound, not a timing threshold, and allocator noise is far below it.
    Where the kernel refuses the reset, the current RSS (VmRSS) is used.
    The counter shows the limit (not a crash or a timeout) ended it.
    """
    factory = echo_factory(max_message_size=MIB, compression=True)
    port = serve(factory)
    body = bomb()
    assert len(body) < 128 * 1024
    wire = wsframes.fragments(wsframes.BINARY, body, split, rsv1=True)

    async def attack() -> tuple[list[wsframes.Frame], int | None]:
        client = await wsframes.connect(port, "/echo", DEFLATE_OFFER)
        await client.send(wire)
        return await raw_close(client)

    peak = reset_peak_rss()
    before_kib = memory_kib("VmRSS")
    frames, code = await aio(attack())
    after_kib = memory_kib("VmHWM" if peak else "VmRSS")
    assert (frames, code) == ([], 1009)
    assert factory.counters["limit.max_message_size"] == 1
    assert after_kib - before_kib < 16 * 1024, (before_kib, after_kib)


@pytest_twisted.ensureDeferred
async def test_server_serves_after_a_bomb(serve: Serve) -> None:
    """The bomb ends one connection; the next client is served."""
    port = serve(echo_factory(max_message_size=MIB, compression=True))
    body = bomb()
    before, code = await aio(
        raw_refused(port, wsframes.frame(wsframes.BINARY, body, rsv1=True), DEFLATE_OFFER)
    )
    assert (before, code) == ([], 1009)
    assert await aio(ws_echo(port, "still here", "deflate")) == "still here"


# -- max_fragments --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_max_fragments(serve: Serve) -> None:
    """
    max_fragments=4: two 4-frame messages in a row are delivered (the count
    starts again with each message, and pings between fragments are not
    fragments); a 5-frame message closes 1008.
    """
    factory = echo_factory(limits=RouteLimits(max_fragments=4))
    port = serve(factory)

    async def run() -> tuple[list[wsframes.Frame], list[wsframes.Frame], int | None]:
        client = await wsframes.connect(port)
        first = wsframes.fragments(wsframes.TEXT, b"abcdefgh", 4)
        # The same message with a ping between each fragment.
        second = b"".join(
            wsframes.frame(op, chunk, fin=fin) + wsframes.frame(wsframes.PING, b"p")
            for op, chunk, fin in [
                (wsframes.BINARY, b"12", False),
                (wsframes.CONTINUATION, b"34", False),
                (wsframes.CONTINUATION, b"56", False),
                (wsframes.CONTINUATION, b"78", True),
            ]
        )
        await client.send(first + second)
        echoes = [
            await wsframes.read_message(client.reader, SANITY_TIMEOUT),
            await wsframes.read_message(client.reader, SANITY_TIMEOUT),
        ]
        await client.send(wsframes.fragments(wsframes.TEXT, b"abcde", 5))
        before, code = await raw_close(client)
        return echoes, before, code

    echoes, before, code = await aio(run())
    assert [(e.opcode, e.payload) for e in echoes] == [
        (wsframes.TEXT, b"abcdefgh"),
        (wsframes.BINARY, b"12345678"),
    ]
    assert code == 1008
    # Only the pong of the last ping can still be in flight.
    assert [f.opcode for f in before] in ([], [wsframes.PONG])
    assert factory.counters["limit.fragments"] == 1


@pytest_twisted.ensureDeferred
async def test_fragments_default_cap_is_1024(serve: Serve) -> None:
    """Defaults: 1024 empty fragments pass, 1025 close 1008."""
    factory = echo_factory()
    port = serve(factory)
    echoed = await aio(raw_echo(port, wsframes.fragments(wsframes.BINARY, b"", 1024)))
    assert (echoed.opcode, echoed.payload) == (wsframes.BINARY, b"")
    before, code = await aio(raw_refused(port, wsframes.fragments(wsframes.BINARY, b"", 1025)))
    assert (before, code) == ([], 1008)
    assert factory.counters["limit.fragments"] == 1


# -- max_pending_control_frames -----------------------------------------------------


async def stall_writes(
    factory: SecureServerFactory, port: int
) -> tuple[wsframes.RawClient, SecureServerProtocol]:
    """
    Make the server's writes to a client block, and keep them blocked.

    The client has a tiny receive buffer and never reads. Twisted pauses
    its producer (the protocol) as soon as more than 64 KiB wait in the
    transport, but resumes it once the kernel has taken them all, and on
    loopback the kernel takes megabytes (the send buffer autotunes up to
    net.ipv4.tcp_wmem's maximum). So the server's socket send buffer is
    also made small (SO_SNDBUF, as a memory-tight server would set it):
    the 1 MiB echo then stays in Twisted's buffer, and the protocol stays
    paused until the client reads. Waits (polling, bounded) for the pause.
    """
    client = await wsframes.connect(port, rcvbuf=4096)
    protocol = only_session(factory)
    handle: Any = protocol.transport.getHandle()  # type: ignore[union-attr]
    handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    await client.send(wsframes.frame(wsframes.BINARY, bytes(MIB - 1)))
    for _ in range(int(SANITY_TIMEOUT / 0.01)):
        guard = protocol._guard
        if guard is not None and guard.writes_blocked:
            return client, protocol
        await asyncio.sleep(0.01)
    raise AssertionError("writes to the client never blocked")


@pytest_twisted.ensureDeferred
async def test_pings_while_writes_blocked_close_1008(serve: Serve) -> None:
    """
    A peer that stops reading and keeps pinging: each ping queues a pong it
    will not read. Past max_pending_control_frames (default 32), 1008.

    With the default max_buffered_bytes (4 MiB) the pongs (a few bytes each)
    are far from the buffered-bytes limit, so the control-frame cap is
    what trips. Once the client reads again it gets the echo, 32 pongs,
    then the close frame: nothing the server sent before the close is lost.
    """
    factory = echo_factory(max_message_size=MIB)
    port = serve(factory)

    async def run() -> tuple[list[wsframes.Frame], int | None]:
        client, _ = await stall_writes(factory, port)
        await client.send(b"".join(wsframes.frame(wsframes.PING, b"%d" % i) for i in range(40)))
        return await raw_close(client)

    before, code = await aio(run())
    assert code == 1008
    assert [(f.opcode, len(f.payload)) for f in before[:1]] == [(wsframes.BINARY, MIB - 1)]
    assert [f.payload for f in before[1:]] == [b"%d" % i for i in range(32)]
    assert all(f.opcode == wsframes.PONG for f in before[1:])
    assert factory.counters["limit.control_frames"] == 1
    assert factory.counters["limit.max_buffered_bytes"] == 0


@pytest_twisted.ensureDeferred
async def test_buffered_bytes_trip_before_control_frames(serve: Serve) -> None:
    """
    Same stalled peer, with max_buffered_bytes=1000 and 125-byte pings:
    each pong adds 127 bytes to what piles up, so the 8th pong (1016 bytes)
    passes the buffered-bytes limit long before 32 pings: 1013, and the 8th
    pong is never written.
    """
    factory = echo_factory(max_message_size=MIB, limits=RouteLimits(max_buffered_bytes=1000))
    port = serve(factory)

    async def run() -> tuple[list[wsframes.Frame], int | None]:
        client, _ = await stall_writes(factory, port)
        pings = [bytes([i]) * 125 for i in range(20)]
        await client.send(b"".join(wsframes.frame(wsframes.PING, p) for p in pings))
        return await raw_close(client)

    before, code = await aio(run())
    assert code == 1013
    assert [f.opcode for f in before] == [wsframes.BINARY] + [wsframes.PONG] * 7
    assert [f.payload for f in before[1:]] == [bytes([i]) * 125 for i in range(7)]
    assert factory.counters["limit.max_buffered_bytes"] == 1
    assert factory.counters["limit.control_frames"] == 0


@pytest_twisted.ensureDeferred
async def test_pings_while_reading_are_not_limited(serve: Serve) -> None:
    """A peer that reads may ping far past the cap: each pong is answered."""
    factory = echo_factory()
    port = serve(factory)

    async def run() -> list[bytes]:
        client = await wsframes.connect(port)
        pongs = []
        try:
            for i in range(100):
                await client.send(wsframes.frame(wsframes.PING, b"%d" % i))
                pong = await wsframes.read_frame(client.reader, SANITY_TIMEOUT)
                assert pong.opcode == wsframes.PONG
                pongs.append(pong.payload)
        finally:
            client.close()
        return pongs

    assert await aio(run()) == [b"%d" % i for i in range(100)]
    assert factory.counters["limit.control_frames"] == 0


# -- TokenBucket (unit) ---------------------------------------------------------


def test_bucket_burst() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=100.0)
    assert [bucket.take(1, 100.0) for _ in range(6)] == [True] * 5 + [False]


def test_bucket_refill() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert all(bucket.take(1, 0.0) for _ in range(5))
    assert not bucket.take(1, 0.0)
    # 0.2 s at 10/s: exactly two tokens.
    assert [bucket.take(1, 0.2) for _ in range(3)] == [True, True, False]


def test_bucket_refill_is_capped_at_burst() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert bucket.take(5, 0.0)
    assert [bucket.take(1, 3600.0) for _ in range(6)] == [True] * 5 + [False]


def test_bucket_partial_refill_accumulates_across_refusals() -> None:
    """Half a token is not enough; the half is kept, and a second half is."""
    bucket = TokenBucket(rate=10, burst=1, now=0.0)
    assert bucket.take(1, 0.0)
    assert not bucket.take(1, 0.05)
    assert bucket.take(1, 0.1)
    assert not bucket.take(1, 0.1)


def test_bucket_take_more_than_burst_never_succeeds_and_takes_nothing() -> None:
    bucket = TokenBucket(rate=1000, burst=5, now=0.0)
    assert not bucket.take(6, 0.0)
    assert not bucket.take(6, 1000.0)
    # The refused takes took nothing: the whole burst is still there.
    assert bucket.take(5, 1000.0)
    assert not bucket.take(0.5, 1000.0)


def test_bucket_fractional_amounts() -> None:
    bucket = TokenBucket(rate=1, burst=1, now=0.0)
    assert bucket.take(0.75, 0.0)
    assert not bucket.take(0.5, 0.0)
    assert bucket.take(0.5, 0.25)


# -- TrafficGuard (unit) ------------------------------------------------------------

TEXT, BINARY, CONT = wsframes.TEXT, wsframes.BINARY, wsframes.CONTINUATION
CLOSE, PING, PONG = wsframes.CLOSE, wsframes.PING, wsframes.PONG


def guard(limits: RouteLimits | None = None, max_message_size: int = LIMIT) -> TrafficGuard:
    return TrafficGuard(limits or RouteLimits(), max_message_size, 0.0)


def test_guard_fragments_cap_and_reset_on_new_message() -> None:
    g = guard(RouteLimits(max_fragments=4))
    frames = [(TEXT, True), (CONT, False), (CONT, False), (CONT, False)]
    assert [g.frame(op, 10, starts, 0.0) for op, starts in frames] == [None] * 4
    # A new message starts the count again.
    assert [g.frame(op, 10, starts, 0.0) for op, starts in frames] == [None] * 4
    assert g.frame(CONT, 10, False, 0.0) is FRAGMENTS


def test_guard_control_frames_do_not_count_as_fragments() -> None:
    g = guard(RouteLimits(max_fragments=2))
    assert g.frame(BINARY, 1, True, 0.0) is None
    for _ in range(10):
        assert g.frame(PING, 0, False, 0.0) is None
        assert g.frame(PONG, 0, False, 0.0) is None
    assert g.frame(CONT, 1, False, 0.0) is None
    assert g.frame(CONT, 1, False, 0.0) is FRAGMENTS


def test_guard_fragments_cap_off() -> None:
    g = guard(RouteLimits(max_fragments=0))
    assert g.frame(BINARY, 1, True, 0.0) is None
    assert all(g.frame(CONT, 1, False, 0.0) is None for _ in range(5000))


def test_guard_control_frames_counted_only_while_blocked() -> None:
    g = guard(RouteLimits(max_pending_control_frames=3))
    assert all(g.frame(PING, 4, False, 0.0) is None for _ in range(100))
    assert g.pending_control == 0
    g.blocked()
    assert [g.frame(op, 4, False, 0.0) for op in (PING, PONG, PING, PING)] == [
        None,
        None,
        None,
        CONTROL_FRAMES,
    ]
    # The peer caught up: the count starts again.
    g.unblocked()
    assert g.pending_control == 0
    assert all(g.frame(PING, 4, False, 0.0) is None for _ in range(100))
    g.blocked()
    assert [g.frame(PING, 4, False, 0.0) for _ in range(4)][-1] is CONTROL_FRAMES


def test_guard_data_frames_while_blocked_are_not_control_frames() -> None:
    g = guard(RouteLimits(max_pending_control_frames=1))
    g.blocked()
    assert all(g.frame(TEXT, 4, True, 0.0) is None for _ in range(10))
    assert g.pending_control == 0


def test_guard_close_frames_never_counted() -> None:
    """Close frames pass every limit: not control-frame pending, not rate."""
    g = guard(RouteLimits(max_pending_control_frames=1, messages_per_second=1, burst=1))
    g.blocked()
    assert all(g.frame(CLOSE, 2, False, 0.0) is None for _ in range(100))
    assert g.pending_control == 0
    # The message bucket is still full: one message passes, the next does not.
    assert g.frame(TEXT, 1, True, 0.0) is None
    assert g.frame(TEXT, 1, True, 0.0) is MESSAGE_RATE


def test_guard_wrote_counts_only_while_blocked() -> None:
    g = guard(RouteLimits(max_buffered_bytes=100))
    assert not g.wrote(10**9)
    assert g.buffered == 0
    g.blocked()
    assert not g.wrote(60)
    assert not g.wrote(40)
    assert g.buffered == 100
    assert g.wrote(1)
    g.unblocked()
    assert g.buffered == 0
    assert not g.wrote(10**9)
    # Blocking again starts from zero.
    g.blocked()
    assert not g.wrote(100)


def test_guard_repeated_pause_keeps_counting() -> None:
    """Twisted pauses on every write while its buffer is full: no reset."""
    g = guard(RouteLimits(max_buffered_bytes=100))
    g.blocked()
    assert not g.wrote(80)
    g.blocked()
    assert g.wrote(21)


def test_guard_wrote_cap_off() -> None:
    g = guard(RouteLimits(max_buffered_bytes=0))
    g.blocked()
    assert not any(g.wrote(10**9) for _ in range(10))


def test_guard_message_rate_counts_messages_and_pings_not_fragments() -> None:
    g = guard(RouteLimits(messages_per_second=2, burst=3))
    assert g.rated
    assert g.frame(TEXT, 1, True, 0.0) is None
    assert all(g.frame(CONT, 1, False, 0.0) is None for _ in range(50))
    assert g.frame(PING, 1, False, 0.0) is None
    assert g.frame(PONG, 1, False, 0.0) is None
    assert g.frame(BINARY, 1, True, 0.0) is MESSAGE_RATE
    # Half a second at 2/s: one more message.
    assert g.frame(BINARY, 1, True, 0.5) is None
    assert g.frame(PING, 1, False, 0.5) is MESSAGE_RATE


def test_guard_byte_rate_bucket_holds_at_least_one_message() -> None:
    """
    bytes_per_second below max_message_size: the bucket still holds one
    whole message, so a single limit-sized message is never refused.
    """
    g = guard(RouteLimits(bytes_per_second=1000), max_message_size=5000)
    assert g.frame(BINARY, 5000, True, 0.0) is None
    assert g.frame(BINARY, 1, True, 0.0) is BYTE_RATE
    assert g.frame(BINARY, 1000, True, 1.0) is None
    assert g.frame(BINARY, 1, True, 1.0) is BYTE_RATE


def test_guard_unrated_by_default() -> None:
    g = guard()
    assert not g.rated
    assert all(g.frame(BINARY, LIMIT, True, 0.0) is None for _ in range(1000))


def test_guard_consumer_buckets_are_shared() -> None:
    """Two guards sharing a consumer bucket draw on the same tokens."""
    shared = TokenBucket(rate=1, burst=3, now=0.0)
    a = TrafficGuard(RouteLimits(), LIMIT, 0.0, (shared, None))
    b = TrafficGuard(RouteLimits(), LIMIT, 0.0, (shared, None))
    assert a.rated and b.rated
    assert a.frame(TEXT, 1, True, 0.0) is None
    assert b.frame(TEXT, 1, True, 0.0) is None
    assert a.frame(TEXT, 1, True, 0.0) is None
    assert b.frame(TEXT, 1, True, 0.0) is MESSAGE_RATE
    assert a.frame(TEXT, 1, True, 0.0) is MESSAGE_RATE


@pytest_twisted.ensureDeferred
async def test_size_is_checked_before_the_byte_rate(serve: Any) -> None:
    """
    With bytes_per_second no larger than max_message_size, a frame over the
    size limit would also empty the byte bucket: the size wins (1009), as
    found by bench/stress.py.
    """
    factory = echo_factory(limits=RouteLimits(bytes_per_second=LIMIT))
    port = serve(factory)
    for message in (
        wsframes.frame(wsframes.BINARY, b"x" * (LIMIT + 1)),
        wsframes.frame(wsframes.BINARY, b"x" * (2 * LIMIT)),
    ):
        _, code = await aio(raw_refused(port, message))
        assert code == 1009
    assert factory.counters["limit.max_message_size"] == 2
    assert factory.counters["limit.byte_rate"] == 0
