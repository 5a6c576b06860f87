"""
The gateway's session lifecycle, with real upstream servers on 127.0.0.1:
close codes and reasons passed both ways, sessions the gateway ends (expiry,
revocation, idle timeout, limits) ending both legs, an upstream that dies, a
client that vanishes, no leaked connections or timers after many sessions,
and backpressure both ways with bounded memory.

Every upstream here is a plain Autobahn server on the test's reactor that
records what it receives (close codes and reasons, messages, headers) and
can close with any code, drop its TCP connection (C{abortConnection}),
stop reading, or flood its client as fast as its transport takes it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
import websockets
import wsframes
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from conftest import CapturedLog, aio
from memory import memory_kib, reset_peak_rss
from twisted.internet.defer import Deferred, DeferredList, DeferredQueue
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from txwssec import (
    Consumer,
    ConsumerDirectory,
    KeyAuthenticator,
    RoutePolicy,
    SecureServerFactory,
    ServerPolicy,
)
from txwssec.consumers import key_digest
from txwssec.policy import RouteLimits
from txwssec.proxy import GatewayProtocol, Upstream

Serve = Callable[[Any], int]

KEY = "this-is-jacks-key"
#: A missing event fails the test after this long instead of hanging it.
SANITY_TIMEOUT = 10.0
KIB = 1024

#: The backpressure floods: 300 messages of 64 KiB (about 19 MiB).
FLOOD_COUNT = 300
FLOOD_SIZE = 64 * KIB


def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


# -- the upstream ---------------------------------------------------------------


@dataclass(frozen=True)
class Closed:
    """
    How an upstream connection ended: whether cleanly (C{onClose}), and the
    code and reason of the close frame it received (of C{onClose} without
    one: 1006).
    """

    was_clean: bool
    code: int | None
    reason: str | None


class _ExactTimers:
    """
    Autobahn's timers on plain reactor calls. Autobahn's default batches
    them into shared whole-second buckets that stay scheduled after their
    calls are cancelled, which would blur the timer-leak count.
    """

    def call_later(self, delay: float, func: Callable[..., object], *args: Any) -> _Cancellable:
        return _Cancellable(reactor().callLater(delay, func, *args))


class _Cancellable:
    def __init__(self, call: IDelayedCall) -> None:
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


class RecordingUpstream(WebSocketServerProtocol):
    """
    An upstream connection that echoes messages (if its server says so) and
    records what it receives; the test drives it once it is open.

    @ivar sent: messages written by L{flood} so far.
    @ivar paused: whether its transport asked it to stop writing.
    """

    factory: UpstreamServer

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[bytes] = []
        self.headers: dict[str, str] = {}
        self.tag = ""
        self.closed: Deferred[Closed] = Deferred()
        self.sent = 0
        self.paused = False
        self._flood_count = 0
        self._close_frame: tuple[int | None, str | None] | None = None

    def connectionMade(self) -> None:
        self.factory.connected.add(self)
        super().connectionMade()

    def onConnect(self, request: ConnectionRequest) -> None:
        self.headers = dict(request.headers)
        self.tag = request.params.get("tag", [""])[0]

    def onOpen(self) -> None:
        self.factory.opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append(payload)
        if self.factory.echo:
            self.sendMessage(payload, isBinary)

    def onCloseFrame(self, code: Any, reasonRaw: Any) -> Any:
        if self._close_frame is None:
            self._close_frame = (code, reasonRaw.decode() if reasonRaw else None)
        return super().onCloseFrame(code, reasonRaw)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._close_frame is not None:
            # The close frame as received: Autobahn's own onClose reports
            # 1014, which its list of valid codes lacks, as 1000.
            code, reason = self._close_frame
        if not self.closed.called:
            self.closed.callback(Closed(wasClean, code, reason))

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.connected.discard(self)
        super().connectionLost(reason)

    def closeWith(self, code: int, reason: str = "") -> None:
        """Start a closing handshake with any code (1001 and 1008 too)."""
        self.sendCloseFrame(code, reason.encode())

    def abort(self) -> None:
        """Drop the TCP connection, no close frame (an upstream that dies)."""
        transport: Any = self.transport
        transport.abortConnection()

    def stopReading(self) -> None:
        """Stop reading from the gateway (an upstream that does not keep up)."""
        transport: Any = self.transport
        transport.pauseProducing()

    def startReading(self) -> None:
        transport: Any = self.transport
        transport.resumeProducing()

    # -- flooding, as a streaming producer: only as fast as the peer reads ----

    def flood(self, count: int) -> None:
        """Send C{count} numbered binary messages of FLOOD_SIZE bytes."""
        self._flood_count = count
        self.registerProducer(self, True)
        self._pump()

    def _pump(self) -> None:
        while not self.paused and self.sent < self._flood_count and self.state == self.STATE_OPEN:
            self.sendMessage(numbered(self.sent), True)
            self.sent += 1

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._flood_count = self.sent


class UpstreamServer(WebSocketServerFactory):
    """
    The upstream: its connections from TCP accept to TCP close
    (C{connected}), and the connections whose WebSocket opened, in order
    (L{next_open}) or by the C{tag} query parameter (L{tagged}).
    """

    protocol = RecordingUpstream  # type: ignore[assignment]

    def __init__(self, echo: bool = True) -> None:
        super().__init__()
        self.setProtocolOptions(failByDrop=False, maxMessagePayloadSize=0, maxFramePayloadSize=0)
        self._batched_timer = _ExactTimers()
        self.echo = echo
        self.connected: set[RecordingUpstream] = set()
        self._opened: DeferredQueue[RecordingUpstream] = DeferredQueue()
        self._tagged: dict[str, Deferred[RecordingUpstream]] = {}

    def opened(self, protocol: RecordingUpstream) -> None:
        self._opened.put(protocol)
        self._tag(protocol.tag).callback(protocol)

    def _tag(self, tag: str) -> Deferred[RecordingUpstream]:
        return self._tagged.setdefault(tag, Deferred())

    async def next_open(self) -> RecordingUpstream:
        """The next upstream connection to open."""
        protocol: RecordingUpstream = await within(self._opened.get())
        return protocol

    async def tagged(self, tag: str) -> RecordingUpstream:
        """The upstream connection made for a client request with C{?tag=...}."""
        protocol: RecordingUpstream = await within(self._tag(tag))
        return protocol


def numbered(index: int) -> bytes:
    """Flood message C{index}: its number, then filler (FLOOD_SIZE bytes)."""
    return struct.pack("!I", index) + bytes([index % 251]) * (FLOOD_SIZE - 4)


def within(d: Deferred[Any], timeout: float = SANITY_TIMEOUT) -> Deferred[Any]:
    """C{d}, failing with a timeout instead of hanging the test."""
    return d.addTimeout(timeout, reactor())


async def upstream_closed(upstream: RecordingUpstream) -> Closed:
    closed: Closed = await within(upstream.closed)
    return closed


# -- the gateway ----------------------------------------------------------------


def gateway_route(upstream_port: int, path: str = "/ws", **options: Any) -> RoutePolicy:
    """A gateway route to the upstream, for consumer jack (key auth)."""
    consumers = ConsumerDirectory([Consumer("jack", (key_digest(KEY),))])
    return RoutePolicy(
        path,
        [KeyAuthenticator(consumers)],
        upstream=Upstream((f"ws://127.0.0.1:{upstream_port}/",)),
        **options,
    )


@dataclass
class Setup:
    """An upstream server, a gateway in front of it, and the gateway's port."""

    upstream: UpstreamServer
    factory: SecureServerFactory
    port: int

    def url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def session(self) -> tuple[ClientConnection, RecordingUpstream]:
        """A websockets client through the gateway, and its upstream leg."""
        ws = await aio(connect(self.url()))
        return ws, await self.upstream.next_open()

    def gateway_leg(self) -> GatewayProtocol:
        """The client leg of the one open session."""
        (protocol,) = self.factory.sessions["jack"]
        assert isinstance(protocol, GatewayProtocol)
        return protocol


def setup(serve: Serve, upstream: UpstreamServer | None = None, **route: Any) -> Setup:
    """An upstream and a gateway with one route C{/ws} (C{route} options)."""
    upstream = upstream or UpstreamServer()
    factory = SecureServerFactory(gateway_route(serve(upstream), **route))
    return Setup(upstream, factory, serve(factory))


async def connect(url: str) -> ClientConnection:
    """A websockets client with jack's key."""
    return await websockets.connect(url, additional_headers={"apikey": KEY}, max_size=None)


async def server_close(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Read until the server closes: the code and reason of its close frame."""

    async def read() -> tuple[int | None, str | None]:
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as closed:
            if closed.rcvd is None:
                return None, None
            return closed.rcvd.code, closed.rcvd.reason

    return await asyncio.wait_for(read(), SANITY_TIMEOUT)


async def reset(client: wsframes.RawClient) -> None:
    """Vanish: close the socket with SO_LINGER 0, which sends a TCP RST."""
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.transport.abort()
    await asyncio.sleep(0)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the reactor run until C{condition()} holds (or fail after a while)."""
    deadline = reactor().seconds() + SANITY_TIMEOUT
    while not condition():
        if reactor().seconds() > deadline:
            raise AssertionError(f"never happened: {what}")
        await deferLater(reactor(), 0.02)


# -- close codes and reasons pass through ------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason"), [(1000, "bye"), (4001, "app reason"), (1014, "its own upstream")]
)
@pytest_twisted.ensureDeferred
async def test_client_close_reaches_the_upstream(serve: Serve, code: int, reason: str) -> None:
    """The client's close code and reason reach the upstream as sent."""
    env = setup(serve)
    ws, upstream = await env.session()
    await aio(ws.send("hello"))
    assert await aio(ws.recv()) == "hello"
    await aio(ws.close(code, reason))
    assert await upstream_closed(upstream) == Closed(True, code, reason)
    # The gateway answered the client's close (a reply with 1000 or the
    # same code both complete the closing handshake).
    assert ws.close_code in (1000, code)
    assert env.factory.counters["gateway.upstream_lost"] == 0


@pytest.mark.parametrize(
    ("code", "reason"),
    [(1000, "done"), (1001, "restarting"), (1008, "policy"), (1014, "chained"), (4002, "x")],
)
@pytest_twisted.ensureDeferred
async def test_upstream_close_reaches_the_client(serve: Serve, code: int, reason: str) -> None:
    """
    The upstream's close code and reason reach the client as sent, and the
    gateway answers the upstream's close (1000 or the same code: 1014, the
    IANA "Bad Gateway" that Autobahn's own list lacks, is not a protocol
    error, which would be answered with 1002).
    """
    env = setup(serve)
    ws, upstream = await env.session()
    upstream.closeWith(code, reason)
    assert await aio(server_close(ws)) == (code, reason)
    closed = await upstream_closed(upstream)
    assert closed.was_clean
    assert closed.code in (1000, code)
    assert env.factory.counters["gateway.upstream_lost"] == 0


# -- sessions the gateway ends: both legs ---------------------------------------------

GOING_AWAY = Closed(True, 1001, "going away")


@pytest_twisted.ensureDeferred
async def test_expiry_ends_both_legs(serve: Serve) -> None:
    """
    max_lifetime: the client gets 3000 "credentials expired"; the upstream
    a plain 1001 "going away", nothing about credentials.
    """
    env = setup(serve, max_lifetime=1)
    ws, upstream = await env.session()
    assert await aio(server_close(ws)) == (3000, "credentials expired")
    assert await upstream_closed(upstream) == GOING_AWAY
    assert env.factory.counters["session.expired"] == 1


@pytest_twisted.ensureDeferred
async def test_revocation_ends_both_legs(serve: Serve) -> None:
    env = setup(serve)
    ws, upstream = await env.session()
    assert env.factory.revoke("jack") == 1
    assert await aio(server_close(ws)) == (3003, "credentials revoked")
    assert await upstream_closed(upstream) == GOING_AWAY


@pytest_twisted.ensureDeferred
async def test_idle_timeout_ends_both_legs(serve: Serve) -> None:
    env = setup(serve, idle_timeout=1)
    ws, upstream = await env.session()
    assert await aio(server_close(ws)) == (3008, "idle timeout")
    assert await upstream_closed(upstream) == GOING_AWAY
    assert upstream.messages == []


@pytest_twisted.ensureDeferred
async def test_rate_limit_ends_both_legs(serve: Serve) -> None:
    """
    A flood past the message rate: 1008 to the client, 1001 to the upstream,
    which got only messages from before the limit, in order.
    """
    env = setup(serve, limits=RouteLimits(messages_per_second=2, burst=2))
    ws, upstream = await env.session()
    sent = [f"m{i}".encode() for i in range(10)]

    async def flood() -> tuple[int | None, str | None]:
        try:
            for message in sent:
                await ws.send(message)
        except ConnectionClosed:
            pass  # the close can arrive before the last sends
        return await server_close(ws)

    assert await aio(flood()) == (1008, "message rate exceeded")
    assert await upstream_closed(upstream) == GOING_AWAY
    assert 2 <= len(upstream.messages) < len(sent)
    assert upstream.messages == sent[: len(upstream.messages)]
    assert env.factory.counters["limit.message_rate"] == 1


@pytest_twisted.ensureDeferred
async def test_max_message_size_applies_to_the_client_leg(serve: Serve) -> None:
    """A message of the limit passes; one byte more: 1009, and 1001 upstream."""
    env = setup(serve, max_message_size=1024)
    ws, upstream = await env.session()
    await aio(ws.send(b"a" * 1024))
    assert await aio(ws.recv()) == b"a" * 1024
    await aio(ws.send(b"b" * 1025))
    assert await aio(server_close(ws)) == (1009, "message too big")
    assert await upstream_closed(upstream) == GOING_AWAY
    assert upstream.messages == [b"a" * 1024]
    assert env.factory.counters["limit.max_message_size"] == 1


# -- one side goes away without closing ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upstream_dies_client_gets_1014(serve: Serve, captured_log: CapturedLog) -> None:
    """
    The upstream's TCP connection drops without a close frame: the client
    gets 1014 "upstream failed". The client's echo of 1014 completes a
    clean closing handshake: no protocol error, and no close timer left.
    """
    env = setup(serve)
    ws, upstream = await env.session()
    leg = env.gateway_leg()
    upstream.abort()
    assert await aio(server_close(ws)) == (1014, "upstream failed")
    assert env.factory.counters["gateway.upstream_lost"] == 1
    await aio(ws.wait_closed())
    await until(lambda: not env.factory.sessions, "the session ended")
    assert (leg.wasClean, leg.remoteCloseCode) == (True, 1014)
    assert leg.closeHandshakeTimeoutCall is None
    assert "invalid close code" not in captured_log.text()


@pytest.mark.parametrize("how", ["reset", "abort"])
@pytest_twisted.ensureDeferred
async def test_client_vanishes_upstream_is_closed(serve: Serve, how: str) -> None:
    """
    The client's TCP connection ends without a close frame: reset (RST,
    SO_LINGER 0) or aborted (FIN, by websockets' transport). The gateway's
    upstream leg is still open then, so it closes it with a full closing
    handshake: the upstream sees a clean 1001 "going away" (1006 would mean
    its TCP connection was dropped without a close frame).
    """
    env = setup(serve)
    if how == "reset":
        client = await aio(wsframes.connect(env.port, "/ws", f"apikey: {KEY}"))
        upstream = await env.upstream.next_open()
        await aio(reset(client))
    else:
        ws, upstream = await env.session()
        ws.transport.abort()
    assert await upstream_closed(upstream) == GOING_AWAY
    await until(lambda: not env.upstream.connected, "the upstream connection closed")
    await until(lambda: env.factory.connections.total == 0, "the client connection released")
    assert env.factory.sessions == {}
    assert env.factory.counters["gateway.upstream_lost"] == 0


# -- no leaks ----------------------------------------------------------------------------

#: How the sessions of the leak test end, one in five each.
ENDINGS = ("client-close", "client-reset", "upstream-close", "upstream-abort", "expiry")


async def one_session(env: Setup, index: int) -> str:
    """
    Open session C{index} and end it the way C{ENDINGS} says, checking what
    each side saw. Expiring sessions use the C{/expiring} route.
    """
    ending = ENDINGS[index % len(ENDINGS)]
    tag = f"s{index}"
    path = f"/expiring?tag={tag}" if ending == "expiry" else f"/ws?tag={tag}"
    if ending == "client-reset":
        client = await aio(wsframes.connect(env.port, path, f"apikey: {KEY}"))
        upstream = await env.upstream.tagged(tag)
        await aio(reset(client))
        assert await upstream_closed(upstream) == GOING_AWAY
        return ending
    ws = await aio(connect(env.url(path)))
    upstream = await env.upstream.tagged(tag)
    await aio(ws.send(tag))
    assert await aio(ws.recv()) == tag
    if ending == "client-close":
        await aio(ws.close(1000, "bye"))
        assert await upstream_closed(upstream) == Closed(True, 1000, "bye")
    elif ending == "upstream-close":
        upstream.closeWith(1000, "done")
        assert await aio(server_close(ws)) == (1000, "done")
    elif ending == "upstream-abort":
        upstream.abort()
        assert await aio(server_close(ws)) == (1014, "upstream failed")
    else:
        assert await aio(server_close(ws)) == (3000, "credentials expired")
        assert await upstream_closed(upstream) == GOING_AWAY
    await aio(ws.wait_closed())
    return ending


@pytest_twisted.ensureDeferred
async def test_no_leaks_after_many_sessions(serve: Serve) -> None:
    """
    50 concurrent sessions ending five ways (client close, client reset,
    upstream close, upstream abort, expiry): afterwards no session, no
    admitted connection, no client or upstream connection, and, once the
    reactor has turned, no timer that was not already scheduled before the
    sessions (a close-handshake timer outliving its connection, as when a
    client's echo of 1014 was failed as a protocol error, shows up here).
    """
    upstream = UpstreamServer()
    upstream_port = serve(upstream)
    policy = ServerPolicy(
        routes=(
            gateway_route(upstream_port, "/ws"),
            gateway_route(upstream_port, "/expiring", max_lifetime=1),
        )
    )
    factory = SecureServerFactory(policy)
    env = Setup(upstream, factory, serve(factory))
    timers_before = set(reactor().getDelayedCalls())

    results = await DeferredList(
        [Deferred.fromCoroutine(one_session(env, index)) for index in range(50)],
        fireOnOneErrback=True,
        consumeErrors=True,
    )
    endings = [ending for _, ending in results]
    assert sorted(endings) == sorted(ENDINGS * 10)
    await until(lambda: not factory.sessions, "no session left")
    await until(lambda: factory.connections.total == 0, "no admitted connection left")
    await until(lambda: factory.countConnections == 0, "no client connection left")
    await until(lambda: not upstream.connected, "no upstream connection left")
    await deferLater(reactor(), 0.05)  # let the reactor turn
    left = [call for call in reactor().getDelayedCalls() if call not in timers_before]
    assert left == []
    assert factory.counters["session.opened"] == 50
    assert factory.counters["session.expired"] == 10
    assert factory.counters["gateway.upstream_lost"] == 10


# -- backpressure ----------------------------------------------------------------------


class Memory:
    """The growth of this process's peak RSS (or RSS) since it was created."""

    def __init__(self) -> None:
        self.peak = reset_peak_rss()
        self.before_kib = memory_kib("VmRSS")

    def growth_kib(self) -> int:
        return memory_kib("VmHWM" if self.peak else "VmRSS") - self.before_kib


def reading(transport: Any) -> bool:
    """Whether the reactor reads from C{transport}."""
    return transport in reactor().getReaders()


async def stalled(progress: Callable[[], int], blocked: Callable[[], bool], what: str) -> None:
    """
    Wait until the flow is stuck: C{blocked()} holds and C{progress()} has
    not moved, over several turns of the reactor in a row.
    """
    last, steady = -1, 0
    deadline = reactor().seconds() + SANITY_TIMEOUT
    while steady < 5:
        await deferLater(reactor(), 0.05)
        now = progress()
        steady = steady + 1 if blocked() and now == last else 0
        last = now
        if reactor().seconds() > deadline:
            raise AssertionError(f"never stalled: {what} (progress {now})")


#: The most this process's peak memory may grow while a 19 MiB flood cannot
#: be delivered: the route's max_buffered_bytes (4 MiB by default), the
#: memory a route allows for a peer that does not read. The gateway holds
#: a few 64 KiB messages at most (its transports' buffers, one read);
#: holding the flood would take 19 MiB.
MEMORY_BOUND_KIB = 4 * 1024


@pytest_twisted.ensureDeferred
async def test_slow_client_pauses_the_upstream(serve: Serve) -> None:
    """
    A client that stops reading (raw socket, small receive buffer) while the
    upstream floods 300 x 64 KiB: the gateway stops reading from the
    upstream, the upstream's transport pauses it (it has written only part
    of the flood), the gateway's memory does not hold the flood, and
    nothing is dropped or closed: once the client reads again it gets every
    message, in order.

    Gateway, upstream and client share this process: its peak RSS bounds
    what the gateway holds (kernel socket buffers do not count).
    """
    env = setup(serve, UpstreamServer(echo=False))
    client = await aio(
        wsframes.connect(env.port, "/ws", f"apikey: {KEY}", rcvbuf=4 * KIB, limit=FLOOD_SIZE)
    )
    upstream = await env.upstream.next_open()
    leg = env.gateway_leg()
    assert leg.upstream is not None
    upstream_leg = leg.upstream.transport
    memory = Memory()

    upstream.flood(FLOOD_COUNT)
    await stalled(
        lambda: upstream.sent,
        lambda: upstream.paused and not reading(upstream_leg),
        "the upstream paused, the gateway not reading from it",
    )
    assert upstream.sent < FLOOD_COUNT
    assert memory.growth_kib() < MEMORY_BOUND_KIB, memory.growth_kib()
    assert leg.state == leg.STATE_OPEN
    assert reading(leg.transport)  # the client leg itself is still read

    async def read_all() -> list[int]:
        indexes = []
        for index in range(FLOOD_COUNT):
            message = await wsframes.read_message(client.reader, SANITY_TIMEOUT)
            assert message.opcode == wsframes.BINARY
            assert message.payload == numbered(index)
            indexes.append(index)
        await client.send(wsframes.close_frame(1000, "read it all"))
        return indexes

    assert await aio(read_all()) == list(range(FLOOD_COUNT))
    assert upstream.sent == FLOOD_COUNT
    assert await upstream_closed(upstream) == Closed(True, 1000, "read it all")
    client.close()
    assert memory.growth_kib() < MEMORY_BOUND_KIB, memory.growth_kib()
    assert env.factory.counters["limit.max_buffered_bytes"] == 0


@pytest_twisted.ensureDeferred
async def test_slow_upstream_pauses_the_client(serve: Serve) -> None:
    """
    An upstream that stops reading (its transport paused) while the client
    floods 300 x 64 KiB: the gateway stops reading from the client, whose
    sends block (websockets' send() waits for its buffer to drain), memory
    stays bounded; once the upstream reads again, every message arrives,
    in order.
    """
    env = setup(serve, UpstreamServer(echo=False))
    ws, upstream = await env.session()
    leg = env.gateway_leg()
    upstream.stopReading()
    memory = Memory()
    sent = 0

    async def flood() -> None:
        nonlocal sent
        for index in range(FLOOD_COUNT):
            await ws.send(numbered(index))
            sent += 1

    flooding = asyncio.ensure_future(flood())
    await stalled(lambda: sent, lambda: not reading(leg.transport), "the client not read")
    assert sent < FLOOD_COUNT
    assert not flooding.done()
    assert len(upstream.messages) < sent
    assert memory.growth_kib() < MEMORY_BOUND_KIB, memory.growth_kib()
    assert leg.state == leg.STATE_OPEN

    upstream.startReading()
    await aio(asyncio.wait_for(flooding, SANITY_TIMEOUT))
    await until(lambda: len(upstream.messages) == FLOOD_COUNT, "every message upstream")
    assert all(message == numbered(i) for i, message in enumerate(upstream.messages))
    await aio(ws.close(1000, "sent it all"))
    assert await upstream_closed(upstream) == Closed(True, 1000, "sent it all")
    assert env.factory.counters["limit.max_buffered_bytes"] == 0
