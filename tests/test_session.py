"""
Session lifetime: credential expiry (JWT C{exp}, route C{max_lifetime}), idle
timeouts, revocation, refresh, and that nothing outlives a connection.

Every end-to-end test runs a real L{SecureServerFactory} on 127.0.0.1 and a
real client (C{websockets}, or a raw socket for abrupt resets). Timing checks
are lower bounds only ("not before the expiry instant"), plus a generous
sanity timeout so a missing close fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import struct
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jwt
import pytest
import pytest_twisted
import websockets
from conftest import CapturedLog, aio, upgrade_request
from twisted.internet.task import Clock
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from txwssec import (
    Consumer,
    ConsumerDirectory,
    JWTAuthenticator,
    KeyAuthenticator,
    Principal,
    RoutePolicy,
    SecureServerFactory,
    SecureServerProtocol,
    ServerPolicy,
    Session,
)
from txwssec.apps.echo import EchoProtocol
from txwssec.consumers import key_digest
from txwssec.deadlines import Deadlines

JWT_SECRET = "session-tests-hmac-secret-of-at-least-32-bytes"
JOHN_KEY = "john-session-key"
JOHN_KEY_2 = "john-second-key"
MARY_KEY = "mary-session-key"

#: A missing close fails the test after this long instead of hanging it.
SANITY_TIMEOUT = 15.0

Serve = Callable[[Any], int]


# -- helpers ----------------------------------------------------------------


def consumers() -> ConsumerDirectory:
    return ConsumerDirectory(
        [
            Consumer("john", (key_digest(JOHN_KEY), key_digest(JOHN_KEY_2))),
            Consumer("mary", (key_digest(MARY_KEY),)),
        ]
    )


def make_factory(
    *,
    protocol: type[SecureServerProtocol] = EchoProtocol,
    max_lifetime: float = 0,
    idle_timeout: float = 0,
) -> SecureServerFactory:
    """One C{/echo} route accepting API keys, then JWTs (HS256)."""
    directory = consumers()
    route = RoutePolicy(
        "/echo",
        [KeyAuthenticator(directory), JWTAuthenticator(directory, JWT_SECRET)],
        protocol=protocol,
        max_lifetime=max_lifetime,
        idle_timeout=idle_timeout,
    )
    return SecureServerFactory(ServerPolicy.single(route))


def token(sub: str = "john", exp: float | None = None, **claims: Any) -> str:
    payload: dict[str, Any] = {"sub": sub, **claims}
    payload["exp"] = time.time() + 60 if exp is None else exp
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


def key_headers(key: str = JOHN_KEY) -> dict[str, str]:
    return {"apikey": key}


def bearer_headers(jwt_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {jwt_token}"}


async def connect(port: int, headers: Mapping[str, str]) -> ClientConnection:
    return await websockets.connect(
        f"ws://127.0.0.1:{port}/echo", additional_headers=dict(headers), open_timeout=5
    )


async def echo(ws: ClientConnection, text: str) -> None:
    """Send C{text} and check that it comes back."""
    await ws.send(text)
    assert await asyncio.wait_for(ws.recv(), SANITY_TIMEOUT) == text


async def wait_closed(ws: ClientConnection) -> tuple[int, str, float]:
    """
    Read until the server closes; return its close code, reason, and the
    wall-clock time at which the client saw the close.
    """
    try:
        async with asyncio.timeout(SANITY_TIMEOUT):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        seen = time.time()
        assert closed.rcvd is not None, "connection ended without a close frame"
        return closed.rcvd.code, closed.rcvd.reason, seen
    raise AssertionError("unreachable")


async def settle(condition: Callable[[], bool], timeout: float = SANITY_TIMEOUT) -> None:
    """Let the reactor turn until C{condition()} holds (or fail)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


class ReportingEcho(SecureServerProtocol):
    """
    On open, sends what the application sees of its session as JSON; then
    echoes. On the text message C{"refresh"}, moves the expiry 3 s ahead and
    answers with the new expiry.
    """

    def onOpen(self) -> None:
        session = self.session
        assert session is not None
        report = {
            "consumer": session.principal.consumer,
            "method": session.principal.method,
            "claims": dict(session.principal.claims),
            "expires_at": session.expires_at,
            "route": session.route,
        }
        self.sendMessage(json.dumps(report).encode("utf-8"), False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary and payload == b"refresh":
            assert self.session is not None
            self.session.refresh(time.time() + 3)
            reply = {"refreshed": self.session.expires_at}
            self.sendMessage(json.dumps(reply).encode("utf-8"), False)
            return
        self.sendMessage(payload, isBinary)


async def open_report(port: int, headers: Mapping[str, str]) -> tuple[ClientConnection, Any]:
    ws = await connect(port, headers)
    report = json.loads(await asyncio.wait_for(ws.recv(), SANITY_TIMEOUT))
    return ws, report


# -- credential expiry ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_jwt_exp_closes_with_3000_not_before_exp(serve: Serve) -> None:
    """
    A session authenticated by a JWT echoes until the token's C{exp}, then
    the server closes it with 3000 "credentials expired", never earlier.
    """
    factory = make_factory()
    port = serve(factory)
    exp = time.time() + 1.5

    async def client() -> tuple[int, str, float]:
        ws = await connect(port, bearer_headers(token(exp=exp)))
        await echo(ws, "before exp")
        assert time.time() < exp
        return await wait_closed(ws)

    code, reason, seen = await aio(client())
    assert (code, reason) == (3000, "credentials expired")
    assert seen >= exp
    await aio(settle(lambda: factory.connections.total == 0))
    assert factory.sessions == {}


@pytest_twisted.ensureDeferred
async def test_jwt_exp_through_subprotocol(serve: Serve) -> None:
    """The expiry applies whichever way the JWT was carried."""
    factory = make_factory()
    port = serve(factory)
    exp = time.time() + 1.2

    async def client() -> tuple[str | None, tuple[int, str, float]]:
        ws = await websockets.connect(
            f"ws://127.0.0.1:{port}/echo",
            subprotocols=[Subprotocol("bearer"), Subprotocol(token(exp=exp))],
        )
        await echo(ws, "hi")
        return ws.subprotocol, await wait_closed(ws)

    subprotocol, (code, reason, seen) = await aio(client())
    assert subprotocol == "bearer"
    assert (code, reason) == (3000, "credentials expired")
    assert seen >= exp


@pytest_twisted.ensureDeferred
async def test_max_lifetime_with_key(serve: Serve) -> None:
    """An API key does not expire; the route's max_lifetime=1 does (3000)."""
    factory = make_factory(protocol=ReportingEcho, max_lifetime=1)
    port = serve(factory)

    async def client() -> tuple[Any, float, tuple[int, str, float]]:
        before = time.time()
        ws, report = await open_report(port, key_headers())
        await echo(ws, "alive")
        return report, before, await wait_closed(ws)

    report, before, (code, reason, seen) = await aio(client())
    assert (code, reason) == (3000, "credentials expired")
    assert report["method"] == "key"
    assert report["expires_at"] is not None
    assert report["expires_at"] >= before + 1
    assert seen >= report["expires_at"]
    assert seen >= before + 1


@pytest_twisted.ensureDeferred
async def test_max_lifetime_shorter_than_jwt_exp_wins(serve: Serve) -> None:
    """max_lifetime=1 with a JWT valid for a minute: closed after ~1 s."""
    factory = make_factory(protocol=ReportingEcho, max_lifetime=1)
    port = serve(factory)
    exp = time.time() + 60

    async def client() -> tuple[Any, float, tuple[int, str, float]]:
        before = time.time()
        ws, report = await open_report(port, bearer_headers(token(exp=exp)))
        return report, before, await wait_closed(ws)

    report, before, (code, reason, seen) = await aio(client())
    assert (code, reason) == (3000, "credentials expired")
    assert report["method"] == "jwt"
    assert before + 1 <= report["expires_at"] < exp
    assert seen >= report["expires_at"]
    # Closed by the lifetime, well before the token's own expiry.
    assert seen < exp


@pytest_twisted.ensureDeferred
async def test_jwt_exp_shorter_than_max_lifetime_wins(serve: Serve) -> None:
    """A JWT expiring in 1.2 s on a route with max_lifetime=30: exp wins."""
    factory = make_factory(protocol=ReportingEcho, max_lifetime=30)
    port = serve(factory)
    exp = time.time() + 1.2

    async def client() -> tuple[Any, float, tuple[int, str, float]]:
        before = time.time()
        ws, report = await open_report(port, bearer_headers(token(exp=exp)))
        return report, before, await wait_closed(ws)

    report, before, (code, reason, seen) = await aio(client())
    assert (code, reason) == (3000, "credentials expired")
    assert report["expires_at"] == exp
    assert seen >= exp
    assert seen < before + 30


# -- idle timeout -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_idle_silent_client_closed_3008(serve: Serve) -> None:
    factory = make_factory(idle_timeout=1)
    port = serve(factory)

    async def client() -> tuple[float, tuple[int, str, float]]:
        ws = await connect(port, key_headers())
        opened = time.time()
        return opened, await wait_closed(ws)

    opened, (code, reason, seen) = await aio(client())
    assert (code, reason) == (3008, "idle timeout")
    assert seen >= opened + 1
    await aio(settle(lambda: factory.connections.total == 0))
    assert factory.sessions == {}


@pytest_twisted.ensureDeferred
async def test_idle_active_client_stays_open_then_closed_when_silent(serve: Serve) -> None:
    """
    A message every 0.4 s keeps a 1 s idle timeout at bay for more than
    1.5 s; once the client goes silent it is closed with 3008, no sooner than
    1 s after its last message.
    """
    factory = make_factory(idle_timeout=1)
    port = serve(factory)

    async def client() -> tuple[float, float, tuple[int, str, float]]:
        ws = await connect(port, key_headers())
        opened = time.time()
        last = opened
        while time.time() - opened < 1.6:
            await asyncio.sleep(0.4)
            last = time.time()
            await echo(ws, f"tick {last}")
        # Past 1.5 s and still open.
        assert ws.close_code is None
        return opened, last, await wait_closed(ws)

    opened, last, (code, reason, seen) = await aio(client())
    assert last - opened >= 1.5
    assert (code, reason) == (3008, "idle timeout")
    assert seen >= last + 1


@pytest_twisted.ensureDeferred
async def test_idle_timeout_does_not_affect_credential_expiry(serve: Serve) -> None:
    """With both timers, the earlier one decides: here the JWT exp (3000)."""
    factory = make_factory(idle_timeout=5)
    port = serve(factory)
    exp = time.time() + 1

    async def client() -> tuple[int, str, float]:
        ws = await connect(port, bearer_headers(token(exp=exp)))
        return await wait_closed(ws)

    code, reason, seen = await aio(client())
    assert (code, reason) == (3000, "credentials expired")
    assert seen >= exp


async def open_raw(port: int, headers: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An open WebSocket on a raw socket (which never answers a close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request("/echo", headers))
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SANITY_TIMEOUT)
    assert response.startswith(b"HTTP/1.1 101 "), response
    return reader, writer


@pytest_twisted.ensureDeferred
async def test_no_idle_close_while_closing(serve: Serve, captured_log: CapturedLog) -> None:
    """
    A session that expired is closing; its peer does not answer the close
    frame. The idle timeout falling during the close handshake is not a
    second event: one close frame (3000), one "expired", no "idle".
    """
    directory = consumers()
    route = RoutePolicy("/echo", [KeyAuthenticator(directory)], max_lifetime=0.2, idle_timeout=0.5)
    factory = SecureServerFactory(ServerPolicy.single(route, close_timeout=1.5))
    port = serve(factory)

    async def client() -> bytes:
        reader, writer = await open_raw(port, f"apikey: {JOHN_KEY}")
        received = b""
        try:
            async with asyncio.timeout(SANITY_TIMEOUT):
                while chunk := await reader.read(4096):
                    received += chunk
        except ConnectionResetError:
            pass  # the close timeout aborts the connection
        finally:
            writer.close()
        return received

    received = await aio(client())
    # One close frame, 3000 "credentials expired", then the TCP close (by
    # the close timeout).
    assert received == b"\x88\x15\x0b\xb8credentials expired"
    assert factory.counters["session.expired"] == 1
    assert factory.counters["session.idle"] == 0
    assert captured_log.matching(event="idle") == []


# -- revocation -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_revoke_closes_every_session_of_consumer(serve: Serve) -> None:
    """
    revoke("john") closes john's two sessions (one per key and one JWT) with
    3003 and returns 3; mary's session stays open and keeps echoing.
    """
    factory = make_factory()
    port = serve(factory)

    async def client() -> tuple[int, list[tuple[int, str, float]], int]:
        johns = [
            await connect(port, key_headers(JOHN_KEY)),
            await connect(port, key_headers(JOHN_KEY_2)),
            await connect(port, bearer_headers(token("john"))),
        ]
        mary = await connect(port, key_headers(MARY_KEY))
        for ws in [*johns, mary]:
            await echo(ws, "ready")
        assert {k: len(v) for k, v in factory.sessions.items()} == {"john": 3, "mary": 1}
        assert factory.revoke("nobody") == 0
        count = factory.revoke("john")
        closes = [await wait_closed(ws) for ws in johns]
        await echo(mary, "still here")
        await settle(lambda: "john" not in factory.sessions)
        remaining = len(factory.sessions["mary"])
        await mary.close()
        return count, closes, remaining

    count, closes, mary_sessions = await aio(client())
    assert count == 3
    assert [(code, reason) for code, reason, _ in closes] == [(3003, "credentials revoked")] * 3
    assert mary_sessions == 1
    await aio(settle(lambda: factory.connections.total == 0))
    assert factory.sessions == {}
    # Revoking again finds nothing.
    assert factory.revoke("john") == 0


# -- refresh ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_refresh_moves_the_expiry(serve: Serve) -> None:
    """
    A session that would expire in 1 s is refreshed by the application to
    now + 3 s: it is still open after the original expiry and closes with
    3000 no earlier than the new one.
    """
    factory = make_factory(protocol=ReportingEcho)
    port = serve(factory)
    exp = time.time() + 1

    async def client() -> tuple[float, tuple[int, str, float]]:
        ws, report = await open_report(port, bearer_headers(token(exp=exp)))
        assert report["expires_at"] == exp
        await ws.send("refresh")
        reply = json.loads(await asyncio.wait_for(ws.recv(), SANITY_TIMEOUT))
        refreshed = float(reply["refreshed"])
        await asyncio.sleep(max(0.0, exp - time.time()) + 0.3)
        await echo(ws, "after the original expiry")
        return refreshed, await wait_closed(ws)

    refreshed, (code, reason, seen) = await aio(client())
    assert refreshed > exp
    assert (code, reason) == (3000, "credentials expired")
    assert seen >= refreshed
    assert seen > exp


# -- the Python API ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_protocol_sees_principal_and_expiry_jwt(serve: Serve) -> None:
    factory = make_factory(protocol=ReportingEcho)
    port = serve(factory)
    exp = float(int(time.time()) + 120)

    async def client() -> Any:
        ws, report = await open_report(port, bearer_headers(token(exp=exp, role="admin")))
        await echo(ws, "x")
        await ws.close()
        return report

    report = await aio(client())
    assert report == {
        "consumer": "john",
        "method": "jwt",
        "claims": {"sub": "john", "exp": exp, "role": "admin"},
        "expires_at": exp,
        "route": "/echo",
    }


@pytest_twisted.ensureDeferred
async def test_protocol_sees_principal_key_no_expiry(serve: Serve) -> None:
    """A key session has no claims and, without max_lifetime, no expiry."""
    factory = make_factory(protocol=ReportingEcho)
    port = serve(factory)

    async def client() -> Any:
        ws, report = await open_report(port, key_headers(MARY_KEY))
        await ws.close()
        return report

    report = await aio(client())
    assert report == {
        "consumer": "mary",
        "method": "key",
        "claims": {},
        "expires_at": None,
        "route": "/echo",
    }


@pytest_twisted.ensureDeferred
async def test_factory_protocol_subclass_without_route_protocol(serve: Serve) -> None:
    """
    The subclass may also be the factory's C{protocol} (the route naming
    none); it sees the same session.
    """
    directory = consumers()
    factory = SecureServerFactory(RoutePolicy("/echo", [KeyAuthenticator(directory)]))
    factory.protocol = ReportingEcho
    port = serve(factory)

    async def client() -> Any:
        ws, report = await open_report(port, key_headers())
        await echo(ws, "y")
        await ws.close()
        return report

    report = await aio(client())
    assert (report["consumer"], report["method"]) == ("john", "key")


# -- no leaks ---------------------------------------------------------------


async def raw_handshake_then_reset(port: int) -> None:
    """
    Complete an opening handshake on a raw socket, then abort the TCP
    connection with a reset (SO_LINGER 0) instead of a close frame.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, upgrade_request("/echo", f"apikey: {JOHN_KEY}"))
        response = b""
        async with asyncio.timeout(SANITY_TIMEOUT):
            while b"\r\n\r\n" not in response:
                chunk = await loop.sock_recv(sock, 4096)
                assert chunk, "server closed before answering"
                response += chunk
        assert response.startswith(b"HTTP/1.1 101 "), response
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


def session_delayed_calls() -> list[Any]:
    """
    Pending reactor calls whose target is a session, a server protocol or
    a heap of deadlines (which holds their timers).
    """
    from twisted.internet import reactor

    owned = []
    for call in reactor.getDelayedCalls():
        owner = getattr(getattr(call, "func", None), "__self__", None)
        if isinstance(owner, Session | SecureServerProtocol | Deadlines):
            owned.append(call)
    return owned


@pytest_twisted.ensureDeferred
async def test_no_leaks_after_50_sessions(serve: Serve) -> None:
    """
    50 sessions, each with an expiry timer (max_lifetime) and an idle timer,
    half closed normally by the client and half reset at the TCP level: once
    they are gone, no session, connection count or delayed call remains.
    """
    from twisted.internet import reactor

    factory = make_factory(max_lifetime=30, idle_timeout=30)
    port = serve(factory)
    await aio(asyncio.sleep(0.05))
    calls_before = len(reactor.getDelayedCalls())

    async def normal(index: int) -> None:
        headers = bearer_headers(token()) if index % 2 else key_headers()
        ws = await connect(port, headers)
        await echo(ws, f"n{index}")
        await ws.close()

    async def clients() -> int:
        await asyncio.gather(*(normal(i) for i in range(25)))
        await asyncio.gather(*(raw_handshake_then_reset(port) for _ in range(25)))
        await settle(lambda: factory.connections.total == 0 and not factory.sessions)
        # A few more turns, for anything scheduled by the last disconnects.
        await asyncio.sleep(0.2)
        return factory.connections.total

    assert await aio(clients()) == 0
    assert factory.sessions == {}
    assert len(factory.connections) == 0
    assert len(factory.deadlines) == 0
    assert session_delayed_calls() == []
    assert len(reactor.getDelayedCalls()) == calls_before


async def end_sessions_every_way(
    factory: SecureServerFactory, port: int, each: int, expires_in: float
) -> int:
    """
    Open C{3 * each} sessions and end them every way: C{each} closed by the
    client after an echo, C{each} reset at the TCP level, C{each} expired by
    the server (JWT C{exp} C{expires_in} seconds away). Return how many
    sessions opened, once every connection is gone.
    """

    async def normal(index: int) -> None:
        ws = await connect(port, key_headers())
        await echo(ws, f"n{index}")
        await ws.close()

    async def expiring() -> None:
        ws = await connect(port, bearer_headers(token(exp=time.time() + expires_in)))
        code, _, _ = await wait_closed(ws)
        assert code == 3000

    opened_before = factory.counters["session.opened"]
    await asyncio.gather(
        *(normal(i) for i in range(each)),
        *(raw_handshake_then_reset(port) for _ in range(each)),
        *(expiring() for _ in range(each)),
    )
    await settle(lambda: factory.connections.total == 0 and not factory.sessions)
    await asyncio.sleep(0.1)
    return factory.counters["session.opened"] - opened_before


class Tracked(EchoProtocol):
    """An echo whose instances can be counted after they are gone."""

    alive: weakref.WeakSet[Tracked] = weakref.WeakSet()

    def onOpen(self) -> None:
        Tracked.alive.add(self)


@pytest_twisted.ensureDeferred
async def test_closed_connections_are_freed(serve: Serve) -> None:
    """
    120 sessions with every timer armed (expiry, idle, auto-ping), ended
    every way: closed by the client, reset, expired by the server: none
    stays reachable (the shared heap of timers holds no connection), and
    the heap is empty.
    """
    factory = make_factory(protocol=Tracked, max_lifetime=30, idle_timeout=30)
    port = serve(factory)
    assert await aio(end_sessions_every_way(factory, port, 40, expires_in=2.5)) == 120
    gc.collect()
    assert len(Tracked.alive) == 0
    assert len(factory.deadlines) == 0
    assert factory.deadlines._heap == []
    assert session_delayed_calls() == []


@pytest_twisted.ensureDeferred
async def test_closed_connections_are_freed_without_the_cycle_collector(
    serve: Serve,
) -> None:
    """
    A closed connection is freed by reference counting as soon as it is
    lost, however it ended: no reference cycle (Autobahn's C{is_closed}
    fired with the protocol, the session's expiry callback) leaves it for
    the garbage collector, whose full passes over thousands of connections
    stall the reactor.
    """
    factory = make_factory(protocol=Tracked, max_lifetime=30, idle_timeout=30)
    port = serve(factory)
    gc.collect()
    gc.disable()
    try:
        assert await aio(end_sessions_every_way(factory, port, 10, expires_in=1.5)) == 30
        assert len(Tracked.alive) == 0
    finally:
        gc.enable()
    assert factory.countConnections == 0


@pytest_twisted.ensureDeferred
async def test_is_closed_fires_with_the_protocol_before_and_after_the_close(
    serve: Serve,
) -> None:
    """
    Autobahn's C{is_closed} still fires with the protocol: for a callback
    added while the connection is open, and for one added once it is gone
    (the protocol then forgets the fired Deferred, see L{FiredWithProtocol}).
    """
    factory = make_factory(protocol=Tracked)
    port = serve(factory)

    async def client() -> tuple[Any, list[Any], list[Any]]:
        ws = await connect(port, key_headers())
        await echo(ws, "x")
        (protocol,) = Tracked.alive
        before: list[Any] = []
        protocol.is_closed.addCallback(lambda result: before.append(result) or result)
        await ws.close()
        await settle(lambda: factory.connections.total == 0)
        after: list[Any] = []
        protocol.is_closed.addCallback(after.append)
        return protocol, before, after

    protocol, before, after = await aio(client())
    assert before == [protocol]
    assert after == [protocol]
    assert protocol.__dict__["_is_closed_deferred"] is None


@pytest_twisted.ensureDeferred
async def test_timers_armed_while_open_then_released(serve: Serve) -> None:
    """
    While sessions are open their expiry and idle timers are pending (so
    the leak test above measures something); they are cancelled on close.
    """
    factory = make_factory(max_lifetime=30, idle_timeout=30)
    port = serve(factory)

    async def client() -> tuple[int, int, int]:
        sockets = [await connect(port, key_headers()) for _ in range(3)]
        for ws in sockets:
            await echo(ws, "armed")
        while_open = len(factory.deadlines)
        reactor_calls = len(session_delayed_calls())
        for ws in sockets:
            await ws.close()
        await settle(lambda: factory.connections.total == 0)
        await asyncio.sleep(0.05)
        return while_open, reactor_calls, len(factory.deadlines)

    while_open, reactor_calls, after = await aio(client())
    # Per connection: the expiry timer, the idle timer, and Autobahn's
    # auto-ping timer (ServerPolicy.ping_interval is on by default), all in
    # the factory's heap, served by one reactor call.
    assert while_open == 9
    assert reactor_calls == 1
    assert after == 0
    assert session_delayed_calls() == []


# -- Session with a fake clock ----------------------------------------------


def clock_session(expires_at: float | None, clock: Clock) -> Session:
    return Session(Principal("john", "key"), expires_at, "/echo", clock)


def test_session_expires_at_instant() -> None:
    clock = Clock()
    clock.advance(100)
    expired: list[float] = []
    session = clock_session(110, clock)
    assert session.consumer == "john"
    assert session.remaining() == 10
    session.start(lambda: expired.append(clock.seconds()))
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(9.999)
    assert expired == []
    assert session.remaining() == pytest.approx(0.001)
    clock.advance(0.001)
    assert expired == [110]
    assert clock.getDelayedCalls() == []
    assert session.remaining() == 0
    clock.advance(100)
    assert session.remaining() == 0
    assert expired == [110]


def test_session_not_started_never_fires() -> None:
    """The timer is armed by start(), not by construction."""
    clock = Clock()
    session = clock_session(5, clock)
    assert clock.getDelayedCalls() == []
    session.refresh(10)
    assert clock.getDelayedCalls() == []
    assert session.expires_at == 10


def test_session_already_expired_fires_at_once() -> None:
    clock = Clock()
    clock.advance(50)
    expired: list[bool] = []
    session = clock_session(40, clock)
    assert session.remaining() == 0
    session.start(lambda: expired.append(True))
    clock.advance(0)
    assert expired == [True]


def test_session_stop_cancels() -> None:
    clock = Clock()
    expired: list[bool] = []
    session = clock_session(10, clock)
    session.start(lambda: expired.append(True))
    (call,) = clock.getDelayedCalls()
    session.stop()
    assert session.ended
    assert not call.active()
    assert clock.getDelayedCalls() == []
    clock.advance(20)
    assert expired == []
    # Stopping twice is harmless; refreshing a stopped session arms nothing.
    session.stop()
    session.refresh(30)
    assert clock.getDelayedCalls() == []
    clock.advance(40)
    assert expired == []


def test_session_stopped_before_start_never_fires() -> None:
    """A connection lost before it opened: starting the session arms nothing."""
    clock = Clock()
    expired: list[bool] = []
    session = clock_session(10, clock)
    session.stop()
    session.start(lambda: expired.append(True))
    assert clock.getDelayedCalls() == []
    clock.advance(20)
    assert expired == []


def test_session_shared_deadlines_refresh() -> None:
    """
    Sessions on one shared L{Deadlines}: refreshing one to a later and then
    to an earlier time re-arms the single reactor call, the other keeps its
    time, and the hard end (max_lifetime) still caps the refresh.
    """
    clock = Clock()
    deadlines = Deadlines(clock)
    fired: list[tuple[str, float]] = []
    first = clock_session(10, clock)
    second = Session(Principal("mary", "jwt"), 15, "/echo", clock, not_after=30)
    first.start(lambda: fired.append(("first", clock.seconds())), deadlines)
    second.start(lambda: fired.append(("second", clock.seconds())), deadlines)
    assert len(deadlines) == 2
    assert [call.getTime() for call in clock.getDelayedCalls()] == [10]
    first.refresh(20)
    second.refresh(100)
    assert second.expires_at == 30
    assert len(deadlines) == 2
    clock.advance(10)
    assert fired == []
    first.refresh(12)
    assert [call.getTime() for call in clock.getDelayedCalls()] == [12]
    clock.advance(2)
    assert fired == [("first", 12)]
    first.stop()
    clock.advance(17.9)
    assert fired == [("first", 12)]
    clock.advance(0.1)
    assert fired == [("first", 12), ("second", 30)]
    assert len(deadlines) == 0
    assert clock.getDelayedCalls() == []


def test_session_refresh_rearms() -> None:
    clock = Clock()
    expired: list[float] = []
    session = clock_session(10, clock)
    session.start(lambda: expired.append(clock.seconds()))
    clock.advance(5)
    session.refresh(20)
    assert session.expires_at == 20
    assert session.remaining() == 15
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(5)  # the original expiry instant passes
    assert expired == []
    clock.advance(9)
    assert expired == []
    clock.advance(1)
    assert expired == [20]
    assert clock.getDelayedCalls() == []


def test_session_refresh_earlier() -> None:
    """Refresh may also bring the expiry closer."""
    clock = Clock()
    expired: list[float] = []
    session = clock_session(100, clock)
    session.start(lambda: expired.append(clock.seconds()))
    session.refresh(3)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(3)
    assert expired == [3]


def test_session_refresh_none_disarms() -> None:
    clock = Clock()
    expired: list[bool] = []
    session = clock_session(10, clock)
    session.start(lambda: expired.append(True))
    session.refresh(None)
    assert session.expires_at is None
    assert session.remaining() is None
    assert clock.getDelayedCalls() == []
    clock.advance(1000)
    assert expired == []
    # ...and it can be armed again.
    session.refresh(1005)
    clock.advance(5)
    assert expired == [True]


def test_session_without_expiry() -> None:
    clock = Clock()
    session = clock_session(None, clock)
    session.start(lambda: pytest.fail("a session without expiry expired"))
    assert session.remaining() is None
    assert clock.getDelayedCalls() == []
    clock.advance(10**6)


def test_session_refresh_cannot_pass_max_lifetime() -> None:
    """The route's max_lifetime is a hard end: refresh() never moves past it."""
    clock = Clock()
    fired: list[float] = []
    session = Session(Principal("john", "jwt"), 5.0, "/r", clock, not_after=20.0)
    session.start(lambda: fired.append(clock.seconds()))
    session.refresh(100.0)
    assert session.expires_at == 20.0
    session.refresh(None)
    assert session.expires_at == 20.0
    clock.advance(19.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [20.0]


def test_session_not_after_caps_initial_expiry() -> None:
    clock = Clock()
    assert Session(Principal("j", "key"), None, "/r", clock, not_after=7.0).expires_at == 7.0
    assert Session(Principal("j", "jwt"), 3.0, "/r", clock, not_after=7.0).expires_at == 3.0
