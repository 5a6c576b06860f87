"""
Connection admission: the global cap (503), the per-address cap (429), the
per-consumer cap (429), the failed-authentication window (429 with
C{Retry-After}) and C{X-Forwarded-For} trust.

Every refusal is checked on the wire: the exact status, the fixed body, and
that no C{101} was sent. Every cap is checked to be released when a
connection ends, however it ends: client close, server close, refused
handshake, abrupt TCP reset. A second client address is 127.0.0.2 (the
client socket is bound to it), to show that per-address limits leave other
clients alone.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
import websockets
from conftest import aio, raw_exchange, upgrade_request
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from txwssec import (
    Accept,
    Consumer,
    ConsumerDirectory,
    Deny,
    HandshakeRequest,
    KeyAuthenticator,
    OriginPolicy,
    Principal,
    RoutePolicy,
    SecureServerFactory,
    ServerPolicy,
)
from txwssec.apps.echo import EchoProtocol
from txwssec.consumers import key_digest
from txwssec.limits import FailureWindow
from txwssec.policy import RouteLimits

JOHN_KEY = "conn-john-key"
MARY_KEY = "conn-mary-key"
BAD_KEY = "conn-wrong-key"
OTHER_HOST = "127.0.0.2"

#: A missing answer fails the test after this long instead of hanging.
SANITY_TIMEOUT = 10.0

Serve = Callable[[Any], int]


# -- helpers ----------------------------------------------------------------


class GatedAuthenticator:
    """
    Accepts C{x-gate: <consumer>} requests, but only when the test fires
    the L{Deferred} it handed out: an authentication still running when the
    client goes away.
    """

    name = "gated"
    challenge = ""

    def __init__(self) -> None:
        self.pending: list[tuple[str, Deferred[Accept | Deny]]] = []

    def authenticate(self, request: HandshakeRequest) -> Deferred[Accept | Deny] | None:
        values = request.header_values("x-gate")
        if not values:
            return None
        d: Deferred[Accept | Deny] = Deferred()
        self.pending.append((values[0], d))
        return d


def make_factory(
    limits: RouteLimits | None = None,
    *,
    clock: Clock | None = None,
    gate: GatedAuthenticator | None = None,
    **server_options: Any,
) -> SecureServerFactory:
    """An echo route C{/echo} for john and mary (API keys)."""
    directory = ConsumerDirectory(
        [Consumer("john", (key_digest(JOHN_KEY),)), Consumer("mary", (key_digest(MARY_KEY),))]
    )
    authenticators: list[Any] = [KeyAuthenticator(directory)]
    if gate is not None:
        authenticators.insert(0, gate)
    route = RoutePolicy(
        "/echo",
        authenticators,
        protocol=EchoProtocol,
        limits=limits or RouteLimits(),
        origins=OriginPolicy.from_list(["https://app.example"]),
    )
    return SecureServerFactory(ServerPolicy.single(route, **server_options), reactor=clock)


def connect(
    port: int,
    key: str | None = JOHN_KEY,
    *,
    host: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
    path: str = "/echo",
) -> Any:
    """A C{websockets} client from address C{host}."""
    extra = dict(headers or {})
    if key is not None:
        extra["apikey"] = key
    return websockets.connect(
        f"ws://127.0.0.1:{port}{path}",
        additional_headers=extra,
        compression=None,
        open_timeout=SANITY_TIMEOUT,
        local_addr=(host, 0),
    )


async def refused(
    port: int,
    key: str | None = JOHN_KEY,
    *,
    host: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
    path: str = "/echo",
) -> Any:
    """Connect, expecting a refusal; return the HTTP response."""
    with pytest.raises(InvalidStatus) as caught:
        async with connect(port, key, host=host, headers=headers, path=path):
            pass
    return caught.value.response


async def echo(ws: ClientConnection, message: str = "ping?") -> None:
    await ws.send(message)
    assert await asyncio.wait_for(ws.recv(), SANITY_TIMEOUT) == message


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait until C{predicate()} holds (the server noticing a close)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SANITY_TIMEOUT
    while not predicate():
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0.005)


def all_released(factory: SecureServerFactory) -> bool:
    """Nothing counted: no connection, no consumer, no session."""
    admission = factory.admission
    return (
        factory.connections.total == 0
        and len(factory.connections) == 0
        and admission.consumers.total == 0
        and len(admission.consumers) == 0
        and not factory.sessions
    )


class RawClient:
    """A raw TCP client, so that it can be reset (RST) instead of closed."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sock: socket.socket
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.sock = sock

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((host, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer, sock)

    async def handshake(self, *headers: str) -> bytes:
        """Send an upgrade request; return the response head."""
        self.writer.write(upgrade_request("/echo", "Origin: https://app.example", *headers))
        await self.writer.drain()
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), SANITY_TIMEOUT)

    def reset(self) -> None:
        """Abort with SO_LINGER 0: the kernel sends RST, no FIN, no close frame."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


def status_line(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


def body(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]


def header(response: bytes, name: bytes) -> list[bytes]:
    head = response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return [
        line.split(b":", 1)[1].strip()
        for line in head
        if line.split(b":", 1)[0].strip().lower() == name.lower()
    ]


def good_request(*headers: str) -> bytes:
    return upgrade_request("/echo", "Origin: https://app.example", f"apikey: {JOHN_KEY}", *headers)


# -- max_connections (503) --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_max_connections_503_before_101(serve: Serve) -> None:
    """
    Two connections fill C{max_connections=2}: the third is refused with
    503 and the fixed body, never upgraded; when one ends, a new one fits.
    """
    factory = make_factory(max_connections=2)
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as first:
            async with connect(port, MARY_KEY, host=OTHER_HOST) as second:
                response = await refused(port)
                assert response.status_code == 503
                assert response.body == b"service unavailable\n"
                # On the wire: a 503 and nothing else, no 101 first.
                raw = await raw_exchange(port, good_request())
                assert status_line(raw) == b"HTTP/1.1 503 Service Unavailable"
                assert b"101" not in raw
                assert body(raw) == b"service unavailable\n"
                await echo(first)
                await echo(second)
            await eventually(lambda: factory.connections.total == 1)
            async with connect(port, MARY_KEY) as third:
                await echo(third)
        await eventually(lambda: all_released(factory))

    await aio(client())
    assert factory.counters["limit.max_connections"] == 2
    assert factory.counters["handshake.refused.503"] == 2
    assert factory.counters["session.opened"] == 3


@pytest_twisted.ensureDeferred
async def test_refused_handshakes_hold_no_slot(
    serve: Serve,
) -> None:
    """
    Refused handshakes (404, 401) hold no slot: after many of them, both
    slots of C{max_connections=2} are still free.
    """
    factory = make_factory(max_connections=2, auth_failures_per_minute=0)
    port = serve(factory)

    async def client() -> None:
        for _ in range(5):
            assert (await refused(port, path="/nowhere")).status_code == 404
            assert (await refused(port, BAD_KEY)).status_code == 401
        await eventually(lambda: all_released(factory))
        async with connect(port) as first, connect(port) as second:
            await echo(first)
            await echo(second)

    await aio(client())


# -- max_connections_per_ip (429) -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_max_connections_per_ip(serve: Serve) -> None:
    """
    C{max_connections_per_ip=2}: a third connection from 127.0.0.1 gets
    429; 127.0.0.2 still connects (twice), and 127.0.0.1 may connect again
    once one of its connections ends.
    """
    factory = make_factory(max_connections_per_ip=2)
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as a1, connect(port, MARY_KEY) as a2:
            response = await refused(port, MARY_KEY)
            assert response.status_code == 429
            assert response.body == b"too many requests\n"
            assert "Retry-After" not in response.headers
            raw = await raw_exchange(port, good_request())
            assert status_line(raw) == b"HTTP/1.1 429 Too Many Requests"
            assert b"101" not in raw
            assert body(raw) == b"too many requests\n"

            async with connect(port, host=OTHER_HOST) as b1, connect(port, host=OTHER_HOST) as b2:
                await echo(b1)
                await echo(b2)
                assert factory.connections.count(OTHER_HOST) == 2
                assert (await refused(port, host=OTHER_HOST)).status_code == 429
            await echo(a1)
            await echo(a2)
            assert factory.connections.count("127.0.0.1") == 2
        await eventually(lambda: all_released(factory))
        async with connect(port) as again:
            await echo(again)

    await aio(client())
    assert factory.counters["limit.max_connections_per_ip"] == 3
    assert factory.counters["handshake.refused.429"] == 3


# -- connections_per_consumer (429) and release on every ending -------------


@pytest_twisted.ensureDeferred
async def test_connections_per_consumer(serve: Serve) -> None:
    """
    C{connections_per_consumer=2}: john's third connection gets 429 with
    the fixed body, from any address; mary is unaffected.
    """
    factory = make_factory(RouteLimits(connections_per_consumer=2))
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as j1, connect(port, host=OTHER_HOST) as j2:
            for host in ("127.0.0.1", OTHER_HOST):
                response = await refused(port, host=host)
                assert response.status_code == 429
                assert response.body == b"too many requests\n"
            async with connect(port, MARY_KEY) as m1, connect(port, MARY_KEY) as m2:
                await echo(m1)
                await echo(m2)
                assert (await refused(port, MARY_KEY)).status_code == 429
            await echo(j1)
            await echo(j2)
        await eventually(lambda: all_released(factory))

    await aio(client())
    assert factory.counters["limit.connections_per_consumer"] == 3


@pytest_twisted.ensureDeferred
async def test_consumer_counter_released_however_connections_end(serve: Serve) -> None:
    """
    Twenty rounds: john fills his two slots (one C{websockets} client, one
    raw socket), is refused a third, then one connection ends by a client
    close and the other by an abrupt TCP reset. Every round ends with
    nothing counted, and the next round admits john again. A server-side
    close (rate limit) and a connection reset mid-frame are mixed in.
    """
    factory = make_factory(
        RouteLimits(connections_per_consumer=2, messages_per_second=100, burst=3),
        max_connections_per_ip=3,
    )
    port = serve(factory)

    async def one_round(i: int) -> None:
        raw = await RawClient.open(port)
        head = await raw.handshake(f"apikey: {JOHN_KEY}")
        assert status_line(head) == b"HTTP/1.1 101 Switching Protocols"
        async with connect(port) as ws:
            await echo(ws, f"round {i}")
            response = await refused(port)
            assert response.status_code == 429
            assert response.body == b"too many requests\n"
            assert factory.admission.consumers.count("/echo\x00john") == 2
            if i % 2:
                # Reset in the middle of a frame the server is reading.
                raw.writer.write(b"\x81\xfe\x10\x00\x00\x00\x00\x00partial")
                await raw.writer.drain()
            raw.reset()
            if i % 5 == 4:
                # The server closes this one (1008): also a way to end.
                for n in range(5):
                    try:
                        await ws.send(str(n))
                    except ConnectionClosed:
                        break
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await asyncio.wait_for(ws.recv(), SANITY_TIMEOUT)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 1008
        await eventually(lambda: all_released(factory))
        assert factory.admission.consumers.count("/echo\x00john") == 0

    async def client() -> None:
        for i in range(20):
            await one_round(i)
        async with connect(port) as first, connect(port) as second:
            await echo(first)
            await echo(second)

    await aio(client())
    assert factory.counters["limit.connections_per_consumer"] == 20
    assert factory.counters["limit.message_rate"] == 4
    assert factory.counters["session.opened"] == 42


async def reset_while_authenticating(
    port: int, factory: SecureServerFactory, gate: GatedAuthenticator, verdict: Accept | Deny
) -> None:
    """
    Send an upgrade request for the gated method, reset the connection
    while the method runs, and only then let it answer C{verdict}.
    """
    raw = await RawClient.open(port)
    raw.writer.write(upgrade_request("/echo", "Origin: https://app.example", "x-gate: john"))
    await raw.writer.drain()
    await eventually(lambda: len(gate.pending) == 1)
    raw.reset()
    await eventually(lambda: factory.connections.total == 0)
    _, pending = gate.pending.pop()
    pending.callback(verdict)


@pytest_twisted.ensureDeferred
async def test_reset_while_authenticating_releases_everything(serve: Serve) -> None:
    """
    A client that resets while an asynchronous authentication (such as
    Basic, verified in a thread) is still running must leave no consumer
    slot and no session behind when the authentication then succeeds.
    """
    gate = GatedAuthenticator()
    factory = make_factory(RouteLimits(connections_per_consumer=1), gate=gate)
    port = serve(factory)

    async def client() -> None:
        for _ in range(3):
            await reset_while_authenticating(
                port, factory, gate, Accept(Principal("john", "gated"))
            )
            # Nothing to wait for: the verdict was handled synchronously.
            assert all_released(factory)
        async with connect(port) as ws:
            await echo(ws)

    await aio(client())
    assert factory.counters["session.opened"] == 1


async def _start_of_a_minute(margin: float) -> None:
    """Wait, if need be, until at least C{margin} s remain in this minute."""
    remaining = 60 - time.time() % 60
    if remaining < margin:
        await deferLater(reactor, remaining + 0.05)


@pytest_twisted.ensureDeferred
async def test_reset_while_authenticating_still_counts_failures(serve: Serve) -> None:
    """
    A failed authentication counts against the address even when the client
    reset the connection before the verdict: otherwise resetting would buy
    unlimited (and costly) password checks.
    """
    gate = GatedAuthenticator()
    # A reset is noticed at the handshake timeout (reading is paused while
    # the method runs): 1 s each, all three within one minute of the
    # failure window, whose estimate weighs the previous minute down.
    factory = make_factory(auth_failures_per_minute=3, gate=gate, handshake_timeout=1)
    port = serve(factory)
    await _start_of_a_minute(margin=8)

    async def client() -> None:
        for _ in range(3):
            await reset_while_authenticating(port, factory, gate, Deny("wrong password"))
        response = await refused(port)
        assert response.status_code == 429
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        async with connect(port, host=OTHER_HOST) as ws:
            await echo(ws)

    await aio(client())
    assert factory.counters["limit.auth_failures"] == 1
    assert all_released(factory)


# -- auth_failures_per_minute (429 + Retry-After) ---------------------------


@pytest_twisted.ensureDeferred
async def test_auth_failures_block_the_address(serve: Serve) -> None:
    """
    Three failed keys from 127.0.0.1: the fourth attempt, even with a valid
    key, gets 429 with an integer C{Retry-After} (1..60 s). 127.0.0.2 with a
    valid key is unaffected, and so are connections already open.
    """
    factory = make_factory(auth_failures_per_minute=3)
    port = serve(factory)
    await _start_of_a_minute(margin=5)

    async def client() -> None:
        async with connect(port, host="127.0.0.1") as before:
            for _ in range(3):
                response = await refused(port, BAD_KEY)
                assert response.status_code == 401
            for key in (JOHN_KEY, BAD_KEY, None):
                response = await refused(port, key)
                assert response.status_code == 429
                assert response.body == b"too many requests\n"
                retry_after = response.headers["Retry-After"]
                assert retry_after.isdigit()
                assert 1 <= int(retry_after) <= 60
            async with connect(port, host=OTHER_HOST) as other:
                await echo(other)
            await echo(before)

    await aio(client())
    assert factory.counters["handshake.refused.401"] == 3
    assert factory.counters["limit.auth_failures"] == 3
    assert factory.counters["handshake.refused.429"] == 3


@pytest_twisted.ensureDeferred
async def test_auth_failures_retry_after_exact_and_lifted(serve: Serve) -> None:
    """
    On a L{Clock} at t=100 s (40 s into a minute), the block lasts until the
    minute ends: C{Retry-After: 20}. Refused attempts while blocked do not
    count as failures. Once the sliding window has let go, the valid key
    connects; the raw response is checked byte for byte.
    """
    clock = Clock()
    clock.advance(100)
    factory = make_factory(auth_failures_per_minute=3, clock=clock)
    port = serve(factory)

    async def client() -> None:
        for _ in range(3):
            assert (await refused(port, BAD_KEY)).status_code == 401
        raw = await raw_exchange(port, good_request())
        assert raw == (
            b"HTTP/1.1 429 Too Many Requests\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: 18\r\n"
            b"Connection: close\r\n"
            b"Cache-Control: no-store\r\n"
            b"Retry-After: 20\r\n"
            b"\r\n"
            b"too many requests\n"
        )
        clock.advance(15)
        assert (await refused(port)).headers["Retry-After"] == "5"
        # Next minute, a quarter in: 3 * 0.75 < 3, the address may try again.
        clock.advance(20)
        async with connect(port) as ws:
            await echo(ws)
        # One more failure brings the estimate back to the limit.
        assert (await refused(port, BAD_KEY)).status_code == 401
        assert (await refused(port)).headers["Retry-After"] == "45"

    await aio(client())
    assert factory.counters["handshake.refused.401"] == 4
    assert factory.counters["limit.auth_failures"] == 3


@pytest_twisted.ensureDeferred
async def test_only_authentication_failures_count(serve: Serve) -> None:
    """
    404 (unknown path) and 403 (origin refused) are not authentication
    failures: many of them leave the address unblocked.
    """
    factory = make_factory(auth_failures_per_minute=3)
    port = serve(factory)
    await _start_of_a_minute(margin=5)

    async def client() -> None:
        for _ in range(5):
            assert (await refused(port, BAD_KEY, path="/nowhere")).status_code == 404
            forbidden = await refused(port, BAD_KEY, headers={"Origin": "https://evil.example"})
            assert forbidden.status_code == 403
        # Two real failures stay under the limit of three.
        for _ in range(2):
            assert (await refused(port, BAD_KEY)).status_code == 401
        async with connect(port) as ws:
            await echo(ws)
        assert (await refused(port, BAD_KEY)).status_code == 401
        assert (await refused(port)).status_code == 429

    await aio(client())
    assert factory.counters["limit.auth_failures"] == 1


@pytest_twisted.ensureDeferred
async def test_auth_failures_zero_disables(serve: Serve) -> None:
    factory = make_factory(auth_failures_per_minute=0)
    port = serve(factory)

    async def client() -> None:
        for _ in range(20):
            assert (await refused(port, BAD_KEY)).status_code == 401
        async with connect(port) as ws:
            await echo(ws)

    await aio(client())
    assert len(factory.admission.auth_failures) == 0
    assert factory.counters["limit.auth_failures"] == 0


def test_auth_failures_default_is_ten() -> None:
    route = RoutePolicy("/echo", [KeyAuthenticator(ConsumerDirectory([]))])
    assert ServerPolicy.single(route).auth_failures_per_minute == 10


# -- FailureWindow arithmetic -----------------------------------------------


def test_failure_window_blocks_at_limit_until_minute_ends() -> None:
    window = FailureWindow(3)
    assert window.blocked_for("a", 10.0) == 0
    window.record("a", 10.0)
    window.record("a", 10.0)
    assert window.blocked_for("a", 10.0) == 0
    window.record("a", 10.0)
    assert window.blocked_for("a", 10.0) == 50.0
    assert window.blocked_for("a", 45.0) == 15.0
    assert window.blocked_for("b", 45.0) == 0
    # At the very start of the next minute the previous one weighs fully.
    assert window.blocked_for("a", 60.0) == 60.0


def test_failure_window_next_minute_partially_forgets() -> None:
    window = FailureWindow(3)
    for _ in range(4):
        window.record("a", 30.0)
    # 15 s into the next minute: 4 * 0.75 = 3, still at the limit.
    assert window.blocked_for("a", 75.0) == 45.0
    # 30 s in: 4 * 0.5 = 2 < 3.
    assert window.blocked_for("a", 90.0) == 0
    # A new failure now: 1 + 2 = 3, at the limit again.
    window.record("a", 90.0)
    assert window.blocked_for("a", 90.0) == 30.0
    # 45 s in: 1 + 4 * 0.25 = 2.
    assert window.blocked_for("a", 105.0) == 0


def test_failure_window_two_minutes_later_forgets() -> None:
    window = FailureWindow(3)
    for _ in range(1000):
        window.record("a", 59.0)
    # 59 s into the next minute: 1000 / 60 is still over the limit.
    assert window.blocked_for("a", 119.0) == 1.0
    assert window.blocked_for("a", 120.0) == 0
    # Counting starts again from one.
    window.record("a", 120.0)
    window.record("a", 121.0)
    assert window.blocked_for("a", 121.0) == 0
    window.record("a", 122.0)
    assert window.blocked_for("a", 122.0) == 58.0


def test_failure_window_evicts_least_recently_failed_key() -> None:
    """
    At max_keys, the key that failed least recently is forgotten: an
    address that keeps failing cannot be flushed out by many new ones.
    """
    window = FailureWindow(1, max_keys=2)
    window.record("a", 1.0)
    window.record("b", 1.0)
    window.record("a", 2.0)
    assert len(window) == 2
    window.record("c", 3.0)
    assert len(window) == 2
    assert window.blocked_for("a", 3.0) > 0
    assert window.blocked_for("b", 3.0) == 0
    assert window.blocked_for("c", 3.0) > 0
    for key in "defgh":
        window.record(key, 4.0)
    assert len(window) == 2


# -- X-Forwarded-For --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_forwarded_for_trusted_counts_forwarded_address(serve: Serve) -> None:
    """
    C{trust_forwarded_for=1}, C{max_connections_per_ip=1}: from the same
    socket address, two different forwarded addresses are two clients; the
    same forwarded address twice is refused. Only the last hop is believed:
    a client-supplied address further left changes nothing.
    """
    factory = make_factory(
        max_connections_per_ip=1, trust_forwarded_for=1, trusted_proxies=("127.0.0.1",)
    )
    port = serve(factory)

    async def client() -> None:
        xff = "X-Forwarded-For"
        async with (
            connect(port, headers={xff: "10.0.0.1"}) as a,
            connect(port, headers={xff: "10.0.0.2"}) as b,
        ):
            await echo(a)
            await echo(b)
            assert factory.connections.count("10.0.0.1") == 1
            assert factory.connections.count("10.0.0.2") == 1
            assert factory.connections.count("127.0.0.1") == 0
            response = await refused(port, headers={xff: "10.0.0.1"})
            assert response.status_code == 429
            assert response.body == b"too many requests\n"
            spoofed = await refused(port, headers={xff: "6.6.6.6, 10.0.0.2"})
            assert spoofed.status_code == 429
            # Without the header, the socket address counts.
            async with connect(port) as c:
                await echo(c)
                assert factory.connections.count("127.0.0.1") == 1

    await aio(client())
    assert factory.counters["limit.max_connections_per_ip"] == 2


@pytest_twisted.ensureDeferred
async def test_forwarded_for_ignored_when_untrusted(serve: Serve) -> None:
    """C{trust_forwarded_for=0}: the header is ignored; the socket address counts."""
    factory = make_factory(max_connections_per_ip=1)
    port = serve(factory)

    async def client() -> None:
        xff = "X-Forwarded-For"
        async with connect(port, headers={xff: "10.0.0.1"}) as a:
            await echo(a)
            assert factory.connections.count("127.0.0.1") == 1
            assert factory.connections.count("10.0.0.1") == 0
            assert (await refused(port, headers={xff: "10.0.0.2"})).status_code == 429

    await aio(client())


@pytest_twisted.ensureDeferred
async def test_forwarded_for_two_hops(serve: Serve) -> None:
    """
    C{trust_forwarded_for=2}: the second address from the right is the
    client, when the first is a trusted proxy too.
    """
    factory = make_factory(
        max_connections_per_ip=1,
        trust_forwarded_for=2,
        trusted_proxies=("127.0.0.1", "192.168.0.0/16"),
    )
    port = serve(factory)

    async def client() -> None:
        xff = "X-Forwarded-For"
        async with connect(port, headers={xff: "6.6.6.6, 10.0.0.1, 192.168.0.1"}):
            assert factory.connections.count("10.0.0.1") == 1
            async with connect(port, headers={xff: "10.0.0.2, 192.168.0.1"}) as b:
                await echo(b)
            response = await refused(port, headers={xff: "7.7.7.7, 10.0.0.1, 192.168.0.1"})
            assert response.status_code == 429

    await aio(client())


@pytest_twisted.ensureDeferred
async def test_auth_failures_keyed_on_forwarded_address(serve: Serve) -> None:
    """
    Behind a trusted proxy the failure window keys on the forwarded
    address: one client's failures block it, not the proxy's other clients.
    """
    factory = make_factory(
        auth_failures_per_minute=2, trust_forwarded_for=1, trusted_proxies=("127.0.0.1",)
    )
    port = serve(factory)
    await _start_of_a_minute(margin=5)

    async def client() -> None:
        attacker = {"X-Forwarded-For": "10.0.0.9"}
        for _ in range(2):
            assert (await refused(port, BAD_KEY, headers=attacker)).status_code == 401
        blocked = await refused(port, headers=attacker)
        assert blocked.status_code == 429
        assert 1 <= int(blocked.headers["Retry-After"]) <= 60
        async with connect(port, headers={"X-Forwarded-For": "10.0.0.8"}) as other:
            await echo(other)
        async with connect(port) as direct:
            await echo(direct)

    await aio(client())
    assert factory.counters["limit.auth_failures"] == 1
