"""
Timers, reactor turns and Deferreds per proxied handshake (issue 19, round 5,
bench/RESULTS.md "Round 5: gateway handshake"): what the gateway no longer
arms or waits for, and that the outcomes are the same.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import websockets
import wsframes
from conftest import CapturedLog, aio, upgrade_request
from test_gateway import RawFactory, closed_port, eventually, refused, ws_url
from test_gateway import gateway as old_gateway
from test_gateway_relay import Serve, gateway
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec.client import SecureClientFactory
from txwssec.gateway import held
from txwssec.gateway.upstream import (
    GatewayTimeout,
    UpstreamProtocol,
    _Attempt,
    upstream_endpoint,
)
from txwssec.proxy import GatewayProtocol, Upstream
from txwssec.types import Accept, Credential, HandshakeRequest, Principal


def accept_for(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept of a Sec-WebSocket-Key (RFC 6455, section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


def accept_of_request(data: bytes) -> str:
    """The Sec-WebSocket-Accept answering the upgrade request C{data}."""
    key = next(
        line.split(":", 1)[1].strip()
        for line in data.decode("latin-1").split("\r\n")
        if line.lower().startswith("sec-websocket-key:")
    )
    return accept_for(key.encode()).decode()


class Silent(Protocol):
    """An upstream that accepts the connection and never answers."""


def run_until(reactor: Any, done: Any, seconds: float = 5) -> None:
    end = time.monotonic() + seconds
    while not done() and time.monotonic() < end:
        reactor.iterate(0.01)
    assert done()


# -- the upstream leg's opening-handshake timer ---------------------------------------


@pytest.mark.parametrize(
    ("leg_timeout", "armed"),
    [(None, False), (0.3, False), (0.2, True), (0, False)],
)
def test_no_open_timer_under_the_attempts(leg_timeout: float | None, armed: bool) -> None:
    """
    The upstream leg's opening-handshake timer is not armed when the
    attempt's own timer (armed first, with the route's upstream_timeout)
    is not later: the attempt abandons the connection first, so it could
    never fire. A shorter one (a subclass's or the factory's option) is
    still armed. A silent upstream still ends in the attempt's 504.
    """
    reactor = EPollReactor()
    silent = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    try:
        url = f"ws://127.0.0.1:{silent.getHost().port}/"
        factory = SecureClientFactory(url, handshake_timeout=0.3, reactor=reactor)
        if leg_timeout is not None:
            factory.setProtocolOptions(openHandshakeTimeout=leg_timeout)
        factory.protocol = UpstreamProtocol
        endpoint = upstream_endpoint(factory, 0.3)
        attempt = _Attempt(factory, lambda: endpoint, 0.3, reactor)
        run_until(reactor, lambda: attempt._protocol is not None)
        protocol = attempt._protocol
        assert (protocol.openHandshakeTimeoutCall is not None) is armed
        results: list[Any] = []
        attempt.result.addBoth(results.append)
        run_until(reactor, lambda: bool(results))
        if not armed:
            assert results[0].check(GatewayTimeout)
            assert results[0].value.reason == f"{url}: no handshake within 0.3 s"
        reactor.runUntilCurrent()
    finally:
        silent.stopListening()
        for selectable in reactor.removeAll():
            selectable.connectionLost(Failure(error.ConnectionDone()))
        reactor.waker.connectionLost(None)


def test_an_upstream_leg_without_an_attempt_keeps_its_timer() -> None:
    """Outside an attempt (the factory used directly), Autobahn's timer as before."""
    from twisted.internet.testing import StringTransport

    factory = SecureClientFactory("ws://127.0.0.1:9/", handshake_timeout=3)
    factory.protocol = UpstreamProtocol
    protocol: Any = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    assert protocol.openHandshakeTimeoutCall is not None
    protocol.openHandshakeTimeoutCall.cancel()


# -- the client leg's writes: no turn timer for the 101 or the close reply -------------


@pytest.fixture
def holds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The client legs' writes held until the end of a reactor turn."""
    seen: list[str] = []
    hold = held.TurnWrites.hold

    def counted(self: held.TurnWrites, leg: Any) -> None:
        if isinstance(leg, GatewayProtocol):
            seen.append(type(leg).__name__)
        hold(self, leg)

    monkeypatch.setattr(held.TurnWrites, "hold", counted)
    return seen


@pytest_twisted.ensureDeferred
async def test_the_101_and_the_close_reply_need_no_turn_timer(
    serve: Serve, holds: list[str]
) -> None:
    """
    The client's 101 leaves at the end of the upstream's read that carried
    the upstream's 101, and the close reply once the client's close frame
    is processed: no end-of-turn call for either. A message relayed from
    the upstream later still waits for the turn's end (as before).
    """
    env = gateway(serve)

    async def run() -> tuple[list[str], str | bytes]:
        async with websockets.connect(f"ws://127.0.0.1:{env.port}/ws") as ws:
            before = list(holds)
            await ws.send("hello")
            echo = await ws.recv()
        return before, echo

    before, echo = await aio(run())
    assert before == []
    assert echo == "hello"
    assert holds == ["GatewayProtocol"]  # the echo's relay, as before
    assert env.upstream.closes == [1000]


class Eager(Protocol):
    """
    An upstream that answers the upgrade with its 101 and, in the same
    write, a text frame (and a second one after a turn).
    """

    def dataReceived(self, data: bytes) -> None:
        accept = accept_of_request(data)
        transport: Any = self.transport
        transport.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode()
            + b"\x81\x05first"
        )
        from twisted.internet import reactor

        reactor.callLater(0, transport.write, b"\x81\x06second")  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_frames_sent_with_the_upstreams_101_follow_the_clients_101(
    serve: Serve,
) -> None:
    """
    What the upstream sent in the same write as its 101 reaches the client
    right after the client's 101, in order, then what it sent later.
    """
    upstream_port = serve(Factory.forProtocol(Eager))
    policy = ServerPolicy.single(
        RoutePolicy(
            "/ws",
            [AnonymousAuthenticator()],
            upstream=Upstream((f"ws://127.0.0.1:{upstream_port}/",)),
        ),
        ping_interval=0,
    )
    port = serve(SecureServerFactory(policy))

    async def run() -> tuple[bytes, list[Any]]:
        client = await wsframes.connect(port, "/ws")
        try:
            frames = [await wsframes.read_frame(client.reader) for _ in range(2)]
        finally:
            client.close()
        return client.response, frames

    response, frames = await aio(run())
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert [(frame.opcode, frame.payload) for frame in frames] == [(1, b"first"), (1, b"second")]


# -- the upstream attempts: plain callbacks, no coroutine ------------------------------


@pytest.fixture
def silent() -> Iterator[RawFactory]:
    """An upstream that never answers; its connections aborted afterwards."""
    factory = RawFactory()
    yield factory
    for connection in factory.connections:
        transport: Any = connection.transport
        transport.abortConnection()


def test_negotiate_is_no_coroutine() -> None:
    """
    The upstream's URLs are tried with callbacks on each attempt's
    Deferred: no coroutine, nor the Deferred and inlineCallbacks that
    ensureDeferred wraps it in, per handshake.
    """
    assert not inspect.iscoroutinefunction(GatewayProtocol.negotiate)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(("order", "status"), [("down, silent", 504), ("silent, down", 502)])
async def test_the_last_urls_failure_is_the_answer(
    serve: Any, silent: RawFactory, captured_log: CapturedLog, order: str, status: int
) -> None:
    """
    Every URL failing: each is tried in turn (an upstream.failed event
    each), and the answer is the last one's refusal: 502 when it refused,
    504 when it timed out.
    """
    urls = {"down": ws_url(closed_port()), "silent": ws_url(serve(silent))}
    factory = old_gateway(*(urls[name] for name in order.split(", ")), timeout=0.5)
    port = serve(factory)
    body = b"gateway timeout\n" if status == 504 else b"bad gateway\n"
    assert await aio(refused(port)) == (status, body)
    assert len(silent.connections) == 1
    said = {
        name: [e["log_format"] for e in captured_log.matching(url=url)]
        for name, url in urls.items()
    }
    assert said == {
        "down": ["upstream {url} failed: {reason}"],
        "silent": ["upstream {url} timed out"],
    }
    assert factory.counters[f"handshake.refused.{status}"] == 1


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_during_the_second_attempt_closes_it(
    serve: Any, silent: RawFactory, captured_log: CapturedLog
) -> None:
    """
    The first URL refused, the second one connected and silent: the
    client leaving closes the second upstream connection at once.
    """
    down, second = ws_url(closed_port()), ws_url(serve(silent))
    factory = old_gateway(down, second, timeout=30)
    port = serve(factory)

    async def leave() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(upgrade_request("/echo?apikey=john-key"))
        await writer.drain()
        for _ in range(500):
            if silent.connections:
                break
            await asyncio.sleep(0.01)
        writer.close()

    await aio(leave())
    assert len(silent.connections) == 1
    await eventually(
        lambda: not getattr(silent.connections[0].transport, "connected", True),
        "the gateway to close the second upstream connection",
    )
    assert len(captured_log.matching(url=down)) == 1
    assert captured_log.matching(url=second) == []


# -- what is stripped of a route's requests: found once per route and policy -----------


def names_policy(forward: bool = False) -> ServerPolicy:
    from test_gateway import CONSUMERS, JWT_SECRET

    from txwssec import BasicAuthenticator, JWTAuthenticator, KeyAuthenticator

    upstream = Upstream(("ws://127.0.0.1:9/",))
    key = KeyAuthenticator(CONSUMERS, header="x-api-key", query="apikey")
    jwt = JWTAuthenticator(CONSUMERS, JWT_SECRET, query="access_token")
    return ServerPolicy(
        routes=(
            RoutePolicy(
                "/a",
                [key],
                upstream=upstream,
                forward_cookie=forward,
                forward_authorization=forward,
            ),
            RoutePolicy("/b", [jwt, key], upstream=upstream),
            RoutePolicy("/c", [BasicAuthenticator(CONSUMERS)], upstream=upstream),
        )
    )


REQUESTS = [
    (
        (
            ("host", "gw"),
            ("x-api-key", "secret"),
            ("authorization", "Bearer x"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("x-keep", "1"),
            ("connection", "Upgrade, X-Keep"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x_consumer_username", "root"),
            ("apikey", "other"),
        ),
        ("chat", "token", "secret", "bearer", "jwt", "v2"),
        "/a?apikey=k&x=1&access_token=t&ticket=z&y=%20",
    ),
    ((("origin", "https://a.example"), ("x-one", "a"), ("x-one", "b")), (), "/b"),
    ((("x-other", "v"),), ("token",), "/c?access_token=&&x=y"),
]


@pytest.mark.parametrize("forward", [False, True])
@pytest.mark.parametrize("index", range(3))
@pytest.mark.parametrize(
    "credential",
    [
        Credential(),
        Credential(header="x-api-key"),
        Credential(query="apikey"),
        Credential(subprotocols=("token", "secret"), marker="token"),
        Credential(header="x-other", query="x"),
    ],
)
def test_stripped_names_strip_what_the_functions_strip(
    forward: bool, index: int, credential: Credential
) -> None:
    """
    Differential: the headers, target and subprotocols the gateway
    forwards with the names found once per route (stripped_names) are
    the ones forwarded_headers, forwarded_target and without_credentials
    give, for every route of a policy, with and without forward_cookie /
    forward_authorization, whichever credential the request carried.
    """
    from txwssec.credentials import without_credentials, without_markers
    from txwssec.gateway.forwarding import (
        forwarded_headers,
        forwarded_target,
        headers_without,
        stripped_names,
        target_without,
    )

    policy = names_policy(forward)
    headers, subprotocols, uri = REQUESTS[index]
    request = HandshakeRequest(
        peer="tcp4:10.0.0.1:5",
        host="10.0.0.1",
        path=uri.partition("?")[0],
        query={},
        headers=headers,
        subprotocols=subprotocols,
    )
    accept = Accept(Principal("john", "key"), credential=credential)
    known = [method for route in policy.routes for method in route.authenticators]
    for route in policy.routes:
        names = stripped_names(route, policy)
        for trust in (False, True):
            assert headers_without(
                request, names.headers, accept, "10.0.0.2", trust
            ) == forwarded_headers(
                request,
                route.authenticators,
                accept,
                "10.0.0.2",
                trust,
                known_authenticators=known,
                forward_cookie=route.forward_cookie,
                forward_authorization=route.forward_authorization,
            )
        assert target_without(uri, names.queries, accept) == forwarded_target(
            uri, route.authenticators, accept, known
        )
        assert without_markers(subprotocols, names.markers) == without_credentials(
            subprotocols, route.authenticators
        )


def test_stripped_names_are_found_again_for_a_new_policy() -> None:
    """Kept per route and policy: a reloaded policy's routes get their own."""
    from txwssec.gateway.forwarding import stripped_names

    first, second = names_policy(False), names_policy(True)
    route = first.routes[0]
    assert stripped_names(route, first) is stripped_names(route, first)
    assert "cookie" in stripped_names(route, first).headers
    assert "cookie" not in stripped_names(second.routes[0], second).headers
    # the same route object under another policy: the other routes' methods differ
    other = stripped_names(route, second)
    assert other is not stripped_names(route, first)


# -- the upstream leg's Autobahn Deferreds: made when first read ----------------------


def open_leg() -> Any:
    """An upstream leg on a StringTransport, opened by a plain 101."""
    from twisted.internet.testing import StringTransport

    factory = SecureClientFactory("ws://127.0.0.1:9/", handshake_timeout=0)
    factory.protocol = UpstreamProtocol
    protocol: Any = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    accept = accept_for(protocol.websocket_key)
    protocol.dataReceived(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    assert protocol.state == protocol.STATE_OPEN
    return protocol


def test_is_open_and_is_closed_are_made_when_first_read() -> None:
    """
    The upstream leg makes no txaio future for is_open and is_closed
    (nothing in the gateway reads them); read, they behave as Autobahn's:
    is_open fired once the 101 was read, is_closed with the protocol once
    the connection is lost.
    """
    from twisted.internet.error import ConnectionDone

    protocol = open_leg()
    assert not isinstance(vars(protocol).get("is_open"), Deferred)
    assert not isinstance(vars(protocol).get("is_closed"), Deferred)
    opened: list[Any] = []
    protocol.is_open.addCallback(opened.append)
    assert opened == [None]
    closed: list[Any] = []
    protocol.is_closed.addCallback(closed.append)
    assert closed == []
    protocol.connectionLost(Failure(ConnectionDone()))
    assert closed == [protocol]


def test_is_open_read_before_the_101_fires_with_it() -> None:
    from twisted.internet.testing import StringTransport

    factory = SecureClientFactory("ws://127.0.0.1:9/", handshake_timeout=0)
    factory.protocol = UpstreamProtocol
    protocol: Any = factory.buildProtocol(None)
    early = protocol.is_open
    assert not early.called
    protocol.makeConnection(StringTransport())
    accept = accept_for(protocol.websocket_key)
    protocol.dataReceived(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    assert early.called
    protocol.transport.loseConnection()


# -- unhappy upstream answers, through the release at the end of the upstream's read -----


class Answering(Protocol):
    """An upstream that answers the upgrade with C{factory.reply(accept)}, then maybe closes."""

    factory: Any

    def dataReceived(self, data: bytes) -> None:
        accept = accept_of_request(data)
        transport: Any = self.transport
        transport.write(self.factory.reply(accept))
        if self.factory.close:
            transport.loseConnection()


def answering_gateway(serve: Serve, reply: Any, close: bool) -> int:
    upstream = Factory.forProtocol(Answering)
    upstream.reply = reply  # type: ignore[attr-defined]
    upstream.close = close  # type: ignore[attr-defined]
    policy = ServerPolicy.single(
        RoutePolicy(
            "/ws",
            [AnonymousAuthenticator()],
            upstream=Upstream((f"ws://127.0.0.1:{serve(upstream)}/",)),
        ),
        ping_interval=0,
    )
    return serve(SecureServerFactory(policy))


SWITCHED = (
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Accept: {accept}\r\n\r\n"
)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "reply",
    [
        "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n",  # then closes
        "",  # closes without a word
    ],
)
async def test_upstream_refusing_or_closing_mid_handshake_is_502(serve: Serve, reply: str) -> None:
    port = answering_gateway(serve, lambda accept: reply.encode(), close=True)

    async def run() -> tuple[int, bytes]:
        try:
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws"):
                pass
        except websockets.InvalidStatus as error:
            return error.response.status_code, bytes(error.response.body or b"")
        raise AssertionError("the handshake succeeded")

    assert await aio(run()) == (502, b"bad gateway\n")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("frames", [b"", b"\x81\x02hi"])
async def test_upstream_closing_right_after_its_101(serve: Serve, frames: bytes) -> None:
    """
    An upstream that sends its 101 (and maybe a message) and drops the
    connection at once: the client gets its 101, what came with the
    upstream's, then a close 1014.
    """
    port = answering_gateway(
        serve, lambda accept: SWITCHED.format(accept=accept).encode() + frames, close=True
    )

    async def run() -> tuple[bytes, list[Any], Any]:
        client = await wsframes.connect(port, "/ws")
        try:
            before, close = await wsframes.read_until_close(client.reader)
        finally:
            client.close()
        return client.response, before, close

    response, before, close = await aio(run())
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert [frame.payload for frame in before] == ([b"hi"] if frames else [])
    assert close.close_code == 1014
