"""
The gateway's frame relay (txwssec.gateway.relay): once a session is open and no
extension is in use, data frames pass between the legs as they came, their
headers checked against the route's limits; control frames and anything
unexpected go through Autobahn as before.

The upstream is a plain Autobahn server on the test's reactor that records
every message with its frames, pings, and how its connection ended, and
echoes each message with the fragmentation it arrived with. Clients are raw
sockets (tests/wsframes.py) where the exact frames matter, and the
C{websockets} library for large messages. A unit test of L{FrameScanner}
feeds a stream cut at every byte.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
import websockets
import wsframes
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from conftest import aio

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec.gateway.relay import FrameScanner
from txwssec.policy import RouteLimits
from txwssec.proxy import GatewayProtocol, Upstream
from txwssec.traffic import Violation

Serve = Callable[[Any], int]

KIB = 1024
MIB = 1024 * KIB
#: A missing event fails the test after this long instead of hanging it.
SANITY_TIMEOUT = 10.0


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (asyncio) until C{condition()} holds, or fail after a while."""
    deadline = asyncio.get_running_loop().time() + SANITY_TIMEOUT
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


# -- the upstream ------------------------------------------------------------------


@dataclass
class Received:
    """A message as the upstream received it: its frames' payloads."""

    frames: list[bytes]
    binary: bool

    @property
    def payload(self) -> bytes:
        return b"".join(self.frames)


class FrameEcho(WebSocketServerProtocol):
    """
    Echoes each message frame by frame, as it arrived; records messages,
    pings, and the close it got (C{factory.closes}, in order of events
    with the client's, see L{Events}).
    """

    factory: FrameEchoFactory

    def onOpen(self) -> None:
        self.factory.connections.append(self)
        self._frames: list[bytes] = []

    def onMessageFrame(self, payload: list[bytes]) -> None:
        super().onMessageFrame(payload)
        self._frames.append(b"".join(payload))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        frames, self._frames = self._frames, []
        self.factory.messages.append(Received(frames, isBinary))
        if self.factory.echo:
            last = len(frames) - 1
            for index, chunk in enumerate(frames):
                opcode = (2 if isBinary else 1) if index == 0 else 0
                self.sendFrame(opcode, chunk, fin=index == last)

    def onPing(self, payload: bytes) -> None:
        self.factory.pings.append(payload)
        super().onPing(payload)

    def onCloseFrame(self, code: Any, reasonRaw: Any) -> Any:
        self.factory.events.append(f"upstream got close {code}")
        return super().onCloseFrame(code, reasonRaw)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.events.append("upstream closed")
        self.factory.closes.append(self.remoteCloseCode)

    def _fail_connection(self, code: int = 1001, reason: str = "going away") -> None:
        self.factory.failures.append(code)
        super()._fail_connection(code, reason)

    def write(self, data: bytes) -> None:
        """Raw bytes to the gateway (frames by hand)."""
        transport: Any = self.transport
        transport.write(data)


@dataclass
class Events:
    """What happened, in order, on both sides of the gateway."""

    log: list[str] = field(default_factory=list)


class FrameEchoFactory(WebSocketServerFactory):
    protocol = FrameEcho  # type: ignore[assignment]

    def __init__(self, echo: bool = True) -> None:
        super().__init__()
        self.setProtocolOptions(
            failByDrop=False, autoPingInterval=0, maxMessagePayloadSize=0, maxFramePayloadSize=0
        )
        self.echo = echo
        self.connections: list[FrameEcho] = []
        self.messages: list[Received] = []
        self.pings: list[bytes] = []
        self.closes: list[int | None] = []
        self.failures: list[int] = []
        self.events: list[str] = []

    @property
    def only(self) -> FrameEcho:
        (protocol,) = self.connections
        return protocol


# -- the gateway -----------------------------------------------------------------------


@dataclass
class Gateway:
    upstream: FrameEchoFactory
    factory: SecureServerFactory
    port: int

    def leg(self) -> GatewayProtocol:
        """The client leg of the one open session."""
        (protocol,) = self.factory.sessions["anonymous"]
        assert isinstance(protocol, GatewayProtocol)
        return protocol

    async def raw(self) -> wsframes.RawClient:
        """A raw client, once both legs are open (and relaying)."""
        client = await wsframes.connect(self.port, "/ws")
        await until(lambda: len(self.upstream.connections) == 1, "the upstream leg")
        return client


def gateway(
    serve: Serve,
    upstream: FrameEchoFactory | None = None,
    *,
    protocol: type[GatewayProtocol] | None = None,
    ping_interval: float = 0,
    ping_timeout: float = 10,
    **route: Any,
) -> Gateway:
    """A gateway route C{/ws} (anonymous) in front of a L{FrameEcho} upstream."""
    upstream = upstream or FrameEchoFactory()
    upstream_port = serve(upstream)
    policy = ServerPolicy.single(
        RoutePolicy(
            "/ws",
            [AnonymousAuthenticator()],
            upstream=Upstream((f"ws://127.0.0.1:{upstream_port}/",)),
            protocol=protocol,
            **route,
        ),
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
    )
    factory = SecureServerFactory(policy)
    return Gateway(upstream, factory, serve(factory))


async def read_frames(client: wsframes.RawClient, count: int) -> list[wsframes.Frame]:
    return [await wsframes.read_frame(client.reader, SANITY_TIMEOUT) for _ in range(count)]


async def closed(client: wsframes.RawClient) -> tuple[list[wsframes.Frame], int | None, str]:
    """Read until the gateway's close frame: the frames before it, its code, its reason."""
    try:
        before, close = await wsframes.read_until_close(client.reader, SANITY_TIMEOUT)
    finally:
        client.close()
    return before, close.close_code, close.close_reason


async def the_end(client: wsframes.RawClient) -> bytes:
    """
    What the gateway sends until it closes the TCP connection (after a
    closing handshake it started, Autobahn aborts it: a reset).
    """
    received = b""
    try:
        while chunk := await asyncio.wait_for(client.reader.read(65536), SANITY_TIMEOUT):
            received += chunk
    except ConnectionResetError:
        pass
    finally:
        client.close()
    return received


def unmasked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """An unmasked frame (a server's, or a client's protocol error)."""
    first = (0x80 if fin else 0) | opcode
    if len(payload) < 126:
        return struct.pack("!BB", first, len(payload)) + payload
    if len(payload) < 1 << 16:
        return struct.pack("!BBH", first, 126, len(payload)) + payload
    return struct.pack("!BBQ", first, 127, len(payload)) + payload


# -- the relay is on, and off where it must be ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_relay_is_on_for_a_plain_route(serve: Serve) -> None:
    env = gateway(serve)
    client = await aio(env.raw())
    leg = env.leg()
    assert leg._scanner is not None
    assert leg.upstream is not None and leg.upstream._scanner is not None
    client.close()


@pytest_twisted.ensureDeferred
async def test_compression_keeps_the_full_relay(serve: Serve) -> None:
    """
    A route with compression and a client that negotiates it: Autobahn
    inflates and checks every message (the upstream gets them
    uncompressed), as before the relay.
    """
    env = gateway(serve, compression=True, max_message_size=MIB)
    text = "compressible " * 5000

    async def run() -> tuple[str | bytes, str | bytes, str | None]:
        async with websockets.connect(
            f"ws://127.0.0.1:{env.port}/ws", compression="deflate", max_size=None
        ) as ws:
            extensions = ws.response.headers.get("Sec-WebSocket-Extensions")
            await ws.send(text)
            first = await asyncio.wait_for(ws.recv(), SANITY_TIMEOUT)
            await ws.send(b"\x00" * 100_000)
            second = await asyncio.wait_for(ws.recv(), SANITY_TIMEOUT)
            assert env.leg()._scanner is None
            return first, second, extensions

    first, second, extensions = await aio(run())
    assert extensions is not None and extensions.startswith("permessage-deflate")
    assert (first, second) == (text, b"\x00" * 100_000)
    assert [(m.payload, m.binary) for m in env.upstream.messages] == [
        (text.encode(), False),
        (b"\x00" * 100_000, True),
    ]


class Inspecting(GatewayProtocol):
    """A gateway that reads its clients' messages."""

    seen: list[bytes] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        Inspecting.seen.append(payload)
        super().onMessage(payload, isBinary)


@pytest_twisted.ensureDeferred
async def test_a_subclass_reading_messages_keeps_the_full_relay(serve: Serve) -> None:
    env = gateway(serve, protocol=Inspecting)
    Inspecting.seen = []

    async def run() -> wsframes.Frame:
        client = await env.raw()
        try:
            await client.send(wsframes.fragments(wsframes.TEXT, b"inspected", 3))
            return await wsframes.read_message(client.reader, SANITY_TIMEOUT)
        finally:
            client.close()

    echoed = await aio(run())
    assert echoed.payload == b"inspected"
    assert Inspecting.seen == [b"inspected"]
    # Autobahn reassembled it: one frame upstream.
    assert env.upstream.messages[0].frames == [b"inspected"]


# -- what passes ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fragment_boundaries_pass_both_ways(serve: Serve) -> None:
    """
    A text and a binary message in 3 and 4 frames (one empty): the upstream
    receives the same frames, and its frame-by-frame echo reaches the
    client with the same boundaries.
    """
    env = gateway(serve)
    text = [b"frag", b"men", b"ted"]
    binary = [b"\x00\x01", b"", b"\xff" * 200, b"end"]

    def message(opcode: int, chunks: list[bytes]) -> bytes:
        return b"".join(
            wsframes.frame(
                opcode if i == 0 else wsframes.CONTINUATION, c, fin=i == len(chunks) - 1
            )
            for i, c in enumerate(chunks)
        )

    async def run() -> list[wsframes.Frame]:
        client = await env.raw()
        try:
            await client.send(message(wsframes.TEXT, text) + message(wsframes.BINARY, binary))
            return await read_frames(client, 7)
        finally:
            client.close()

    frames = await aio(run())
    assert [m.frames for m in env.upstream.messages] == [text, binary]
    assert [(f.opcode, f.payload, f.fin) for f in frames] == [
        (wsframes.TEXT, b"frag", False),
        (wsframes.CONTINUATION, b"men", False),
        (wsframes.CONTINUATION, b"ted", True),
        (wsframes.BINARY, b"\x00\x01", False),
        (wsframes.CONTINUATION, b"", False),
        (wsframes.CONTINUATION, b"\xff" * 200, False),
        (wsframes.CONTINUATION, b"end", True),
    ]


@pytest.mark.parametrize("size", [64 * KIB, MIB], ids=["64KiB", "1MiB"])
@pytest_twisted.ensureDeferred
async def test_large_binary_messages_arrive_byte_exact(serve: Serve, size: int) -> None:
    """Large messages (the 1 MiB one is exactly the route's limit), both ways."""
    env = gateway(serve, max_message_size=MIB)
    payloads = [os.urandom(size) for _ in range(3)]

    async def run() -> list[str | bytes]:
        async with websockets.connect(
            f"ws://127.0.0.1:{env.port}/ws", compression=None, max_size=None
        ) as ws:
            assert env.leg()._scanner is not None
            for payload in payloads:
                await ws.send(payload)
            return [await asyncio.wait_for(ws.recv(), SANITY_TIMEOUT) for _ in payloads]

    assert await aio(run()) == payloads
    assert [m.payload for m in env.upstream.messages] == payloads


@pytest_twisted.ensureDeferred
async def test_frames_arriving_a_few_bytes_at_a_time(serve: Serve) -> None:
    """
    Frames with 7-, 16- and 64-bit lengths, written in pieces of 1 to 7
    bytes with pauses between: they are relayed whole, in order.
    """
    env = gateway(serve)
    payloads = [b"a" * 5, b"b" * 300, b"c" * 70_000, b"", b"d" * 125, b"e" * 126]
    stream = b"".join(wsframes.frame(wsframes.BINARY, p) for p in payloads)

    async def run() -> list[wsframes.Frame]:
        client = await env.raw()
        sock = client.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            position, step = 0, 1
            while position < len(stream):
                end = position + step if position < 400 else position + 9_000
                await client.send(stream[position:end])
                await asyncio.sleep(0.001)
                position, step = end, step % 7 + 1
            return await read_frames(client, len(payloads))
        finally:
            client.close()

    frames = await aio(run())
    assert [f.payload for f in frames] == payloads
    assert [m.payload for m in env.upstream.messages] == payloads


@pytest_twisted.ensureDeferred
async def test_utf8_split_inside_characters_across_frames(serve: Serve) -> None:
    """
    A text message whose 2-, 3- and 4-byte characters are cut between
    frames: valid as a whole, so the upstream (which validates) takes it,
    and the echo comes back with the same cuts.
    """
    env = gateway(serve)
    text = "é€😀 ok".encode()
    chunks = [text[:1], text[1:3], text[3:6], text[6:8], text[8:]]

    async def run() -> list[wsframes.Frame]:
        client = await env.raw()
        try:
            await client.send(
                b"".join(
                    wsframes.frame(
                        wsframes.TEXT if i == 0 else wsframes.CONTINUATION,
                        c,
                        fin=i == len(chunks) - 1,
                    )
                    for i, c in enumerate(chunks)
                )
            )
            return await read_frames(client, len(chunks))
        finally:
            client.close()

    frames = await aio(run())
    assert [f.payload for f in frames] == chunks
    assert b"".join(f.payload for f in frames).decode() == "é€😀 ok"
    assert env.upstream.messages[0].frames == chunks
    assert env.upstream.failures == []


@pytest_twisted.ensureDeferred
async def test_ping_between_fragments_reaches_the_upstream_and_its_pong_comes_back(
    serve: Serve,
) -> None:
    env = gateway(serve)

    async def run() -> list[wsframes.Frame]:
        client = await env.raw()
        try:
            await client.send(
                wsframes.frame(wsframes.TEXT, b"one ", fin=False)
                + wsframes.frame(wsframes.PING, b"in between")
                + wsframes.frame(wsframes.CONTINUATION, b"message")
            )
            return await read_frames(client, 3)
        finally:
            client.close()

    frames = await aio(run())
    assert env.upstream.pings == [b"in between"]
    assert env.upstream.messages[0].frames == [b"one ", b"message"]
    # The echo's frames in order, and the pong before, between or after.
    assert [(f.opcode, f.payload) for f in frames if f.opcode != wsframes.PONG] == [
        (wsframes.TEXT, b"one "),
        (wsframes.CONTINUATION, b"message"),
    ]
    assert [f.payload for f in frames if f.opcode == wsframes.PONG] == [b"in between"]


@pytest_twisted.ensureDeferred
async def test_upstream_ping_between_fragments_reaches_the_client(serve: Serve) -> None:
    env = gateway(serve)

    async def run() -> list[wsframes.Frame]:
        client = await env.raw()
        try:
            env.upstream.only.write(
                unmasked(wsframes.BINARY, b"12", fin=False)
                + unmasked(wsframes.PING, b"up")
                + unmasked(wsframes.CONTINUATION, b"34")
            )
            return await read_frames(client, 3)
        finally:
            client.close()

    frames = await aio(run())
    assert [(f.opcode, f.payload) for f in frames] == [
        (wsframes.BINARY, b"12"),
        (wsframes.PING, b"up"),
        (wsframes.CONTINUATION, b"34"),
    ]


@pytest_twisted.ensureDeferred
async def test_data_answers_the_gateways_ping(serve: Serve) -> None:
    """
    As Autobahn does (autoPingRestartOnAnyTraffic): a client that never
    answers the gateway's pings but sends a message every 0.1 s is not
    closed 3008 for it (otherwise it would be, 1.2 s in).
    """
    env = gateway(serve, ping_interval=0.2, ping_timeout=1)

    async def run() -> list[int]:
        client = await env.raw()
        try:
            opcodes = []
            for i in range(25):
                await client.send(wsframes.frame(wsframes.TEXT, b"%d" % i))
                await asyncio.sleep(0.1)
                while True:
                    received = await wsframes.read_frame(client.reader, SANITY_TIMEOUT)
                    opcodes.append(received.opcode)
                    if received.opcode == wsframes.TEXT:
                        break
            return opcodes
        finally:
            client.close()

    opcodes = await aio(run())
    assert wsframes.PING in opcodes
    assert wsframes.CLOSE not in opcodes
    assert env.factory.counters["limit.ping_timeout"] == 0


# -- limits on the relay ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_message_rate_closes_1008_after_relaying_what_came_before(serve: Serve) -> None:
    """
    Five messages in one write with a burst of 2: the first two are relayed
    (in the same read as the third), then 1008 to the client, 1001 to the
    upstream.
    """
    env = gateway(serve, limits=RouteLimits(messages_per_second=1, burst=2))

    async def run() -> tuple[list[wsframes.Frame], int | None, str]:
        client = await env.raw()
        await client.send(b"".join(wsframes.frame(wsframes.TEXT, b"m%d" % i) for i in range(5)))
        return await closed(client)

    before, code, reason = await aio(run())
    assert (code, reason) == (1008, "message rate exceeded")
    assert all(f.opcode == wsframes.TEXT for f in before)
    await aio(until(lambda: env.upstream.closes == [1001], "the upstream closed 1001"))
    assert [m.payload for m in env.upstream.messages] == [b"m0", b"m1"]
    assert env.factory.counters["limit.message_rate"] == 1


@pytest_twisted.ensureDeferred
async def test_byte_rate_closes_1008_after_relaying_what_came_before(serve: Serve) -> None:
    """
    Five messages of 300 bytes in one write with a byte bucket of 1000
    (max_message_size): three are relayed, the fourth closes 1008.
    """
    env = gateway(serve, max_message_size=1000, limits=RouteLimits(bytes_per_second=1))

    async def run() -> tuple[list[wsframes.Frame], int | None, str]:
        client = await env.raw()
        frames = [wsframes.frame(wsframes.BINARY, b"%d" % i * 300) for i in range(5)]
        await client.send(b"".join(frames))
        return await closed(client)

    _, code, reason = await aio(run())
    assert (code, reason) == (1008, "byte rate exceeded")
    await aio(until(lambda: env.upstream.closes == [1001], "the upstream closed 1001"))
    assert [m.payload for m in env.upstream.messages] == [b"%d" % i * 300 for i in range(3)]
    assert env.factory.counters["limit.byte_rate"] == 1


@pytest_twisted.ensureDeferred
async def test_too_many_fragments_close_1008(serve: Serve) -> None:
    env = gateway(serve, limits=RouteLimits(max_fragments=4))

    async def run() -> tuple[list[wsframes.Frame], int | None, str]:
        client = await env.raw()
        await client.send(wsframes.fragments(wsframes.TEXT, b"abcd", 4))
        assert (await wsframes.read_message(client.reader)).payload == b"abcd"
        await client.send(wsframes.fragments(wsframes.TEXT, b"abcde", 5))
        return await closed(client)

    _, code, reason = await aio(run())
    assert (code, reason) == (1008, "too many fragments")
    await aio(until(lambda: env.upstream.closes == [1001], "the upstream closed 1001"))
    # The first 4 frames of the second message reached the upstream, not its end.
    assert [m.payload for m in env.upstream.messages] == [b"abcd"]
    assert env.factory.counters["limit.fragments"] == 1


@pytest_twisted.ensureDeferred
async def test_a_frame_header_over_the_size_limit_closes_1009_at_once(serve: Serve) -> None:
    """A header announcing one byte over the limit: 1009 without waiting for its payload."""
    env = gateway(serve, max_message_size=64 * KIB)

    async def run() -> tuple[list[wsframes.Frame], int | None, str]:
        client = await env.raw()
        await client.send(wsframes.frame_header(wsframes.BINARY, 64 * KIB + 1))
        return await closed(client)

    before, code, reason = await aio(run())
    assert (before, code, reason) == ([], 1009, "message too big")
    await aio(until(lambda: env.upstream.closes == [1001], "the upstream closed 1001"))
    assert env.factory.counters["limit.max_message_size"] == 1


@pytest_twisted.ensureDeferred
async def test_many_small_fragments_over_the_size_limit_close_1009(serve: Serve) -> None:
    """
    The limit counts a message's frames together: 10 fragments of 100 bytes
    make exactly the limit and pass; one more byte in an 11th closes 1009.
    """
    env = gateway(serve, max_message_size=1000)

    async def run() -> tuple[list[wsframes.Frame], int | None, str]:
        client = await env.raw()
        await client.send(wsframes.fragments(wsframes.BINARY, b"x" * 1000, 10))
        assert len((await wsframes.read_message(client.reader)).payload) == 1000
        parts = [wsframes.frame(wsframes.BINARY, b"y" * 100, fin=False)]
        parts += [wsframes.frame(wsframes.CONTINUATION, b"y" * 100, fin=False)] * 9
        parts += [wsframes.frame(wsframes.CONTINUATION, b"y")]
        await client.send(b"".join(parts))
        return await closed(client)

    _, code, reason = await aio(run())
    assert (code, reason) == (1009, "message too big")
    await aio(until(lambda: env.upstream.closes == [1001], "the upstream closed 1001"))
    assert [len(m.payload) for m in env.upstream.messages] == [1000]
    assert env.factory.counters["limit.max_message_size"] == 1


@pytest_twisted.ensureDeferred
async def test_pings_while_writes_to_the_client_are_blocked_close_1008(serve: Serve) -> None:
    """
    A client that stops reading (its receive buffer and the gateway's send
    buffer made small) after asking for a 1 MiB echo, then pings 40 times:
    past max_pending_control_frames (32), 1008, and 1001 upstream.
    """
    env = gateway(serve, max_message_size=MIB)

    async def run() -> tuple[list[wsframes.Frame], int | None, str]:
        client = await wsframes.connect(env.port, "/ws", rcvbuf=4096)
        await until(lambda: len(env.upstream.connections) == 1, "the upstream leg")
        leg = env.leg()
        handle: Any = leg.transport.getHandle()  # type: ignore[union-attr]
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        await client.send(wsframes.frame(wsframes.BINARY, bytes(MIB)))
        await until(lambda: leg._guard is not None and leg._guard.writes_blocked, "blocked")
        await client.send(b"".join(wsframes.frame(wsframes.PING, b"%d" % i) for i in range(40)))
        return await closed(client)

    before, code, reason = await aio(run())
    assert (code, reason) == (1008, "too many control frames")
    assert [(f.opcode, len(f.payload)) for f in before[:1]] == [(wsframes.BINARY, MIB)]
    await aio(until(lambda: env.upstream.closes == [1001], "the upstream closed 1001"))
    assert env.factory.counters["limit.control_frames"] == 1


# -- protocol errors -----------------------------------------------------------------------

BAD_FRAMES = {
    "reserved-data-opcode": wsframes.frame(0x3, b"x"),
    "reserved-control-opcode": wsframes.frame(0xB, b"x"),
    "rsv-bit": wsframes.frame(wsframes.TEXT, b"x", rsv1=True),
    "unmasked": unmasked(wsframes.TEXT, b"x"),
    "continuation-first": wsframes.frame(wsframes.CONTINUATION, b"x"),
    "text-inside-message": wsframes.frame(wsframes.TEXT, b"a", fin=False)
    + wsframes.frame(wsframes.TEXT, b"b"),
    "long-control": wsframes.frame(wsframes.PING, b"p" * 126),
    "fragmented-ping": wsframes.frame(wsframes.PING, b"p", fin=False),
    "non-minimal-length": struct.pack("!BBH", 0x82, 0xFE, 5) + b"\x00" * 4 + b"x" * 5,
}


@pytest.mark.parametrize("bad", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
@pytest_twisted.ensureDeferred
async def test_protocol_error_closes_1002_after_the_upstream_closed(
    serve: Serve, bad: bytes
) -> None:
    """
    A message, then a frame that breaks the protocol, in one write: the
    upstream's echo of the message, then 1002; the upstream's connection
    (closed with 1001) ended before the client got its 1002.
    """
    env = gateway(serve)

    async def run() -> tuple[list[wsframes.Frame], int | None, list[str]]:
        client = await env.raw()
        await client.send(wsframes.frame(wsframes.TEXT, b"before") + bad)
        try:
            before, close = await wsframes.read_until_close(client.reader, SANITY_TIMEOUT)
            seen_then = list(env.upstream.events)
        finally:
            client.close()
        return before, close.close_code, seen_then

    before, code, events = await aio(run())
    assert code == 1002
    assert [(f.opcode, f.payload) for f in before] == [(wsframes.TEXT, b"before")]
    assert events == ["upstream got close 1001", "upstream closed"]
    assert env.upstream.messages[0].payload == b"before"


@pytest.mark.parametrize(
    "frames",
    [
        wsframes.frame(wsframes.TEXT, b"ok \xff\xfe"),
        wsframes.frame(wsframes.TEXT, "é".encode()[:1], fin=False)
        + wsframes.frame(wsframes.CONTINUATION, b"x"),
    ],
    ids=["invalid-byte", "cut-character"],
)
@pytest_twisted.ensureDeferred
async def test_invalid_utf8_gets_1007_from_the_upstream(serve: Serve, frames: bytes) -> None:
    """
    The relay does not read text: the upstream validates it, fails with
    1007, and its close reaches the client.
    """
    env = gateway(serve)

    async def run() -> tuple[list[wsframes.Frame], int | None, str]:
        client = await env.raw()
        await client.send(frames)
        return await closed(client)

    before, code, _ = await aio(run())
    assert (before, code) == ([], 1007)
    assert env.upstream.failures[:1] == [1007]
    assert env.upstream.messages == []


# -- sessions ending while a frame is half-way --------------------------------------------


async def end_session(env: Gateway, how: str) -> None:
    if how == "revoked":
        assert env.factory.revoke("anonymous") == 1
    # "expired": max_lifetime=1 does it.


ENDINGS = {"revoked": (3003, "credentials revoked"), "expired": (3000, "credentials expired")}


@pytest.mark.parametrize("how", ENDINGS.keys())
@pytest_twisted.ensureDeferred
async def test_session_ends_while_the_upstream_sends_a_large_frame(serve: Serve, how: str) -> None:
    """
    The upstream has sent half of a 256 KiB frame when the session ends:
    the client gets a well-formed close (nothing of the half frame before
    it), and nothing after it; the upstream gets 1001.
    """
    env = gateway(serve, max_message_size=MIB, max_lifetime=1 if how == "expired" else 0)
    whole = unmasked(wsframes.BINARY, os.urandom(256 * KIB))

    async def run() -> tuple[int | None, str, bytes]:
        client = await env.raw()
        env.upstream.only.write(unmasked(wsframes.TEXT, b"first") + whole[: len(whole) // 2])
        first = await wsframes.read_frame(client.reader, SANITY_TIMEOUT)
        assert first.payload == b"first"
        await end_session(env, how)
        close = await wsframes.read_frame(client.reader, SANITY_TIMEOUT)
        assert close.opcode == wsframes.CLOSE
        env.upstream.only.write(whole[len(whole) // 2 :])
        await client.send(wsframes.close_frame(1000))
        return close.close_code, close.close_reason, await the_end(client)

    code, reason, rest = await aio(run())
    assert (code, reason) == ENDINGS[how]
    assert rest == b""
    await aio(until(lambda: env.upstream.closes == [1001], "the upstream closed 1001"))


@pytest.mark.parametrize("how", ENDINGS.keys())
@pytest_twisted.ensureDeferred
async def test_session_ends_while_the_client_sends_a_large_frame(serve: Serve, how: str) -> None:
    """
    The client has sent half of a 256 KiB frame when the session ends: it
    gets the close, sends the rest and its own close, and the closing
    handshake completes; the upstream got 1001 and never the message.
    """
    env = gateway(serve, max_message_size=MIB, max_lifetime=1 if how == "expired" else 0)
    whole = wsframes.frame(wsframes.BINARY, os.urandom(256 * KIB))

    async def run() -> tuple[int | None, str, bytes]:
        client = await env.raw()
        half = len(whole) // 2
        await client.send(whole[:half])
        scanner: Any = env.leg()._scanner
        await until(lambda: scanner._stashed == half, "the half frame in the gateway")
        await end_session(env, how)
        frame = await wsframes.read_frame(client.reader, SANITY_TIMEOUT)
        await client.send(whole[half:] + wsframes.close_frame(1000))
        return frame.close_code, frame.close_reason, await the_end(client)

    code, reason, rest = await aio(run())
    assert (code, reason) == ENDINGS[how]
    assert rest == b""
    await aio(until(lambda: env.upstream.closes == [1001], "the upstream closed 1001"))
    assert env.upstream.messages == []
    assert env.factory.counters["limit.max_message_size"] == 0


# -- the upstream's size limit ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upstream_fragments_past_the_limit_close_the_client_1014(serve: Serve) -> None:
    """
    The upstream sends a fragmented message that passes max_message_size in
    its third frame: the first two frames have reached the client (the
    relay does not hold messages back), then 1014; the upstream got 1009.
    """
    env = gateway(serve, max_message_size=1000)

    async def run() -> tuple[list[wsframes.Frame], int | None, str]:
        client = await env.raw()
        env.upstream.only.write(
            unmasked(wsframes.BINARY, b"a" * 400, fin=False)
            + unmasked(wsframes.CONTINUATION, b"b" * 400, fin=False)
            + unmasked(wsframes.CONTINUATION, b"c" * 201)
        )
        return await closed(client)

    before, code, reason = await aio(run())
    assert [(f.opcode, f.payload) for f in before] == [
        (wsframes.BINARY, b"a" * 400),
        (wsframes.CONTINUATION, b"b" * 400),
    ]
    assert (code, reason) == (1014, "upstream failed")
    await aio(until(lambda: env.upstream.closes == [1009], "the upstream closed 1009"))


# -- FrameScanner, by itself ------------------------------------------------------------------


class Leg:
    """A leg that records what the scanner does."""

    def __init__(self, violate_at: int = -1, batches: bool = False) -> None:
        #: Whether relayAccountMessages accounts (else it refuses, and the
        #: scanner accounts frame by frame).
        self.batches = batches
        #: What relayAccountMessages was asked, and its answer.
        self.batched: list[tuple[int, int, bool]] = []
        self.out: list[bytes] = []
        self.controls: list[bytes] = []
        #: Forwarded frames and control frames, in the order they went.
        self.order: list[bytes] = []
        self.stopped: tuple[bytes, bool, int, bool] | None = None
        self.accounted: list[tuple[int, int, bool]] = []
        self.violate_at = violate_at
        self.limited: list[Violation] = []

    def relayOpen(self) -> bool:
        return self.stopped is None

    def relayAccount(self, opcode: int, length: int, starts_message: bool) -> Violation | None:
        self.accounted.append((opcode, length, starts_message))
        if len(self.accounted) - 1 == self.violate_at:
            return Violation(1008, "no", "limit.test")
        return None

    def relayAccountMessages(self, count: int, octets: int) -> bool:
        self.batched.append((count, octets, self.batches))
        if self.batches:
            self.accounted.extend([(-1, -1, True)] * count)
        return self.batches

    def relayLimit(self, violation: Violation) -> None:
        self.limited.append(violation)

    def relayForward(self, frames: bytes) -> None:
        self.out.append(frames)
        self.order.append(frames)

    def relayControl(self, frame: bytes) -> bool:
        self.controls.append(frame)
        self.order.append(frame)
        return True

    def relayStop(self, rest: bytes, inside: bool, so_far: int, binary: bool) -> None:
        self.stopped = (rest, inside, so_far, binary)


def scanner(leg: Leg, max_size: int = MIB) -> FrameScanner:
    return FrameScanner(leg, masked=True, max_frame=max_size, max_message=max_size, accounted=True)


STREAM = [
    wsframes.frame(wsframes.TEXT, b"hello"),
    wsframes.frame(wsframes.BINARY, b"x" * 200, fin=False),
    wsframes.frame(wsframes.PING, b"ping"),
    wsframes.frame(wsframes.CONTINUATION, b"y" * 70_000, fin=False),
    wsframes.frame(wsframes.CONTINUATION, b""),
    wsframes.frame(wsframes.PONG, b""),
    wsframes.frame(wsframes.TEXT, b"z" * 125),
]


def test_scanner_relays_whole_frames_however_the_stream_is_cut() -> None:
    """
    Every cut of the stream in two (and byte by byte): data frames come out
    whole and in order, control frames go to Autobahn one by one, in
    their place, and each header is accounted exactly once.
    """
    stream = b"".join(STREAM)
    data_frames = [f for f in STREAM if f[0] & 0x0F < 8]
    cuts = [[stream[:i], stream[i:]] for i in range(0, len(stream), 97)]
    cuts.append([stream[i : i + 1] for i in range(0, 300)] + [stream[300:]])
    for pieces in cuts:
        leg = Leg()
        scan = scanner(leg)
        order = leg.order
        for piece in pieces:
            scan.feed(piece)
        assert b"".join(order) == stream
        assert leg.stopped is None
        relayed = b"".join(o for o in order if o[0] & 0x0F < 8)
        assert relayed == b"".join(data_frames)
        assert [o for o in order if o[0] & 0x0F >= 8] == [STREAM[2], STREAM[5]]
        assert leg.accounted == [
            (wsframes.TEXT, 5, True),
            (wsframes.BINARY, 200, True),
            (wsframes.CONTINUATION, 70_000, False),
            (wsframes.CONTINUATION, 0, False),
            (wsframes.TEXT, 125, True),
        ]


def test_scanner_one_write_per_read() -> None:
    leg = Leg()
    frames = [wsframes.frame(wsframes.TEXT, b"%d" % i) for i in range(10)]
    scanner(leg).feed(b"".join(frames))
    assert leg.out == [b"".join(frames)]


def test_scanner_limit_relays_what_came_before_then_stops() -> None:
    leg = Leg(violate_at=2)
    frames = [wsframes.frame(wsframes.BINARY, b"0", fin=False)] + [
        wsframes.frame(wsframes.CONTINUATION, b"%d" % i, fin=i == 3) for i in (1, 2, 3)
    ]
    scanner(leg).feed(b"".join(frames))
    assert leg.out == [frames[0] + frames[1]]
    assert [v.counter for v in leg.limited] == ["limit.test"]
    # Handed over at the frame that went past the limit, inside a binary
    # message of 2 payload bytes so far.
    assert leg.stopped == (frames[2] + frames[3], True, 2, True)


def test_scanner_accounts_a_reads_messages_at_once() -> None:
    """
    The message-starting frames of a read are accounted in one
    relayAccountMessages call, before they are relayed in one write;
    continuations and control frames close the batch before them.
    """
    leg = Leg(batches=True)
    frames = [wsframes.frame(wsframes.TEXT, b"%d" % i) for i in range(10)]
    scanner(leg).feed(b"".join(frames))
    assert leg.batched == [(10, 10, True)]
    assert leg.out == [b"".join(frames)]
    leg = Leg(batches=True)
    scan = scanner(leg)
    for piece in STREAM:
        scan.feed(piece)
    assert leg.batched == [(1, 5, True), (1, 200, True), (1, 125, True)]
    leg = Leg(batches=True)
    scanner(leg).feed(b"".join(STREAM))
    assert leg.batched == [(2, 205, True), (1, 125, True)]
    assert leg.accounted == [
        (-1, -1, True),
        (-1, -1, True),
        (wsframes.CONTINUATION, 70_000, False),
        (wsframes.CONTINUATION, 0, False),
        (-1, -1, True),
    ]


@pytest.mark.parametrize("violate_at", [0, 1, 2, 3])
def test_scanner_refused_batch_goes_frame_by_frame(violate_at: int) -> None:
    """
    A batch that would go past a limit: the frames are accounted one by
    one, those before the one that went past it are relayed, and the rest
    of the stream is handed over from that frame, with the message state
    before it (a binary message of 3 bytes ended, one of 2 still open).
    """
    leg = Leg(violate_at=violate_at)
    frames = [
        wsframes.frame(wsframes.TEXT, b"a"),
        wsframes.frame(wsframes.BINARY, b"bcd"),
        wsframes.frame(wsframes.BINARY, b"ef", fin=False),
        wsframes.frame(wsframes.CONTINUATION, b"g"),
    ]
    scanner(leg).feed(b"".join(frames))
    assert leg.batched[0] == (3, 6, False)
    relayed = b"".join(frames[:violate_at])
    assert leg.out == ([relayed] if relayed else [])
    assert [v.counter for v in leg.limited] == ["limit.test"]
    states = [(False, 0, False), (False, 1, False), (False, 3, True), (True, 2, True)]
    assert leg.stopped == (b"".join(frames[violate_at:]), *states[violate_at])
    assert len(leg.accounted) == violate_at + 1


def test_scanner_batch_includes_a_frame_still_arriving() -> None:
    """
    The last frame of a read, whose payload has not all arrived, is
    accounted with the read's batch (at its header), and not again.
    """
    leg = Leg(batches=True)
    scan = scanner(leg)
    whole = wsframes.frame(wsframes.TEXT, b"x")
    big = wsframes.frame(wsframes.BINARY, b"y" * 1000)
    scan.feed(whole + big[:100])
    assert leg.batched == [(2, 1001, True)]
    assert leg.out == [whole]
    scan.feed(big[100:] + whole)
    assert leg.batched == [(2, 1001, True), (1, 1, True)]
    assert leg.out == [whole, big + whole]
    # Refused: a limit found at the frame still arriving hands it over.
    leg = Leg(violate_at=1)
    scanner(leg).feed(whole + big[:100])
    assert leg.out == [whole]
    assert leg.stopped == (big[:100], False, 1, False)


@pytest.mark.parametrize("bad", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_scanner_hands_anything_unexpected_to_autobahn(bad: bytes) -> None:
    """
    The frames before are relayed; the rest of the stream, from the
    unexpected frame on, goes to Autobahn, with the message in progress.
    """
    leg = Leg()
    good = wsframes.frame(wsframes.TEXT, b"fine")
    scanner(leg).feed(good + bad + good)
    if bad == BAD_FRAMES["text-inside-message"]:
        opened = bad[:7]  # its first frame is fine, and opens a message
        assert leg.out == [good + opened]
        assert leg.stopped == (bad[7:] + good, True, 1, False)
    else:
        assert leg.out == [good]
        assert leg.stopped == (bad + good, False, 4, False)


def test_scanner_hands_an_oversized_frame_to_autobahn_before_its_payload() -> None:
    leg = Leg()
    header = wsframes.frame_header(wsframes.BINARY, 1001)
    scanner(leg, max_size=1000).feed(header)
    assert leg.stopped == (header, False, 0, False)
    assert leg.accounted == []
