"""
Application errors never hang or kill a peer: an exception in a hook of a
L{SecureServerProtocol} subclass (C{onOpen}, C{onMessage}, C{onPing}, sync
or C{async def}, or a L{Deferred} it returns that fails) closes that
connection with 1011 and logs exactly one line with the traceback and the
fields C{route}, C{peer} and C{hook}; an exception in C{onClose} is only
logged. Other connections on the same server stay open and working.
Sending to a peer that is closing is a no-op (L{False}), so broadcasting
(L{SecureServerFactory.broadcast}) is safe. L{SecureClientProtocol} gets
the same treatment for its hooks.

Clients are C{websockets} (close codes as received) and raw sockets where a
test must hold a connection half-closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
import websockets
import wsframes
from conftest import CapturedLog, aio
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import LogEvent
from websockets.exceptions import ConnectionClosed

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec.client import SecureClientFactory, SecureClientProtocol
from txwssec.proxy import GatewayProtocol, Upstream
from txwssec.server import SecureServerProtocol

Serve = Callable[[Any], int]
TIMEOUT = 10.0


class Boom(Exception):
    """The application's bug."""


def later() -> Deferred[None]:
    """A Deferred that fires on a later reactor turn."""
    return deferLater(reactor, 0, lambda: None)


class Faulty(SecureServerProtocol):
    """
    Echoes; the route's path says which hook fails and how, and the
    message C{boom} makes C{onMessage} fail.
    """

    closes: list[int | None] = []

    def onOpen(self) -> Any:
        path = self.route.path if self.route else ""
        if path == "/open":
            raise Boom("onOpen failed")
        if path == "/open-async":
            return self._failAfterATurn("async onOpen failed")
        return None

    async def _failAfterATurn(self, text: str) -> None:
        await later()
        raise Boom(text)

    def onMessage(self, payload: bytes, isBinary: bool) -> Any:
        path = self.route.path if self.route else ""
        if payload == b"boom":
            if path == "/message-async":
                return self._failAfterATurn("async onMessage failed")
            if path == "/message-deferred":
                failing: Deferred[None] = later()
                return failing.addCallback(_raise, "Deferred onMessage failed")
            raise Boom("onMessage failed")
        if payload == b"broadcast":
            sent = self.factory.broadcast(b"to all", route="/echo")
            self.sendMessage(str(sent).encode())
            return None
        self.sendMessage(payload, isBinary)
        return None

    def onPing(self, payload: bytes) -> None:
        if payload == b"boom":
            raise Boom("onPing failed")
        super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        Faulty.closes.append(code)
        if self.route is not None and self.route.path == "/close":
            raise Boom("onClose failed")


def _raise(_: object, text: str) -> None:
    raise Boom(text)


PATHS = ("/echo", "/open", "/open-async", "/message-async", "/message-deferred", "/close")


def faulty_server(serve: Serve) -> tuple[SecureServerFactory, int]:
    anonymous = [AnonymousAuthenticator()]
    policy = ServerPolicy(tuple(RoutePolicy(p, anonymous, protocol=Faulty) for p in PATHS))
    factory = SecureServerFactory(policy)
    return factory, serve(factory)


def failures(log: CapturedLog) -> list[LogEvent]:
    """Every logged failure (application errors, and unhandled ones)."""
    return [event for event in log.events if "log_failure" in event]


def assert_one_failure(log: CapturedLog, hook: str, route: str, text: str) -> None:
    (event,) = failures(log)
    assert (event["hook"], event["route"]) == (hook, route)
    assert event["peer"].startswith("tcp4:127.0.0.1:")
    assert event["log_namespace"] == "txwssec.server"
    failure = event["log_failure"]
    assert failure.check(Boom) and str(failure.value) == text
    assert "Traceback" in failure.getTraceback()


async def closed_with(ws: Any) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def still_echoes(ws: Any) -> None:
    await ws.send("still here")
    assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "still here"


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.01)


def url(port: int, path: str) -> str:
    return f"ws://127.0.0.1:{port}{path}"


# -- server hooks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "text"), [("/open", "onOpen failed"), ("/open-async", "async onOpen failed")]
)
@pytest_twisted.ensureDeferred
async def test_error_in_onopen_closes_1011(
    serve: Serve, captured_log: CapturedLog, path: str, text: str
) -> None:
    factory, port = faulty_server(serve)

    async def scenario() -> None:
        async with websockets.connect(url(port, "/echo")) as other:
            async with websockets.connect(url(port, path)) as ws:
                assert await closed_with(ws) == (1011, "internal error")
            await still_echoes(other)

    await aio(scenario())
    assert_one_failure(captured_log, "onOpen", path, text)
    assert factory.counters["application.error"] == 1


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("/echo", "onMessage failed"),
        ("/message-async", "async onMessage failed"),
        ("/message-deferred", "Deferred onMessage failed"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_error_in_onmessage_closes_1011_and_others_stay(
    serve: Serve, captured_log: CapturedLog, path: str, text: str
) -> None:
    _, port = faulty_server(serve)

    async def scenario() -> None:
        async with websockets.connect(url(port, "/echo")) as other:
            async with websockets.connect(url(port, path)) as ws:
                await still_echoes(ws)
                await ws.send("boom")
                assert await closed_with(ws) == (1011, "internal error")
            await still_echoes(other)

    await aio(scenario())
    assert_one_failure(captured_log, "onMessage", path, text)


@pytest_twisted.ensureDeferred
async def test_error_in_onping_closes_1011(serve: Serve, captured_log: CapturedLog) -> None:
    _, port = faulty_server(serve)

    async def scenario() -> None:
        async with websockets.connect(url(port, "/echo")) as ws:
            await ws.ping(b"boom")
            assert await closed_with(ws) == (1011, "internal error")

    await aio(scenario())
    assert_one_failure(captured_log, "onPing", "/echo", "onPing failed")


@pytest_twisted.ensureDeferred
async def test_messages_after_the_error_do_not_reach_the_application(
    serve: Serve, captured_log: CapturedLog
) -> None:
    """A second message in the same read as the failing one is not delivered."""
    _, port = faulty_server(serve)

    async def scenario() -> None:
        client = await wsframes.connect(port, "/echo")
        try:
            await client.send(
                wsframes.frame(wsframes.TEXT, b"boom") + wsframes.frame(wsframes.TEXT, b"boom")
            )
            before, close = await wsframes.read_until_close(client.reader, TIMEOUT)
            assert before == [] and close.close_code == 1011
            await client.send(wsframes.close_frame(1011))
            assert await asyncio.wait_for(client.reader.read(), TIMEOUT) == b""
        finally:
            client.close()

    await aio(scenario())
    assert len(failures(captured_log)) == 1


@pytest_twisted.ensureDeferred
async def test_error_in_onclose_is_logged_only(serve: Serve, captured_log: CapturedLog) -> None:
    Faulty.closes = []
    factory, port = faulty_server(serve)

    async def scenario() -> None:
        async with websockets.connect(url(port, "/close")) as ws:
            await still_echoes(ws)
        assert ws.close_code == 1000

    await aio(scenario())
    await aio(until(lambda: not factory.sessions))
    assert Faulty.closes == [1000]
    assert_one_failure(captured_log, "onClose", "/close", "onClose failed")


# -- sending to closing peers, broadcast -----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_send_to_a_closing_peer_is_a_noop_and_broadcast_skips_it(
    serve: Serve, captured_log: CapturedLog
) -> None:
    """
    B's session is closing (the server sent its close, B has not answered):
    A's handler broadcasts to the route and sends to B directly; neither
    raises, B gets nothing after the close frame, A gets the broadcast.
    """
    factory, port = faulty_server(serve)

    async def scenario() -> None:
        closing = await wsframes.connect(port, "/echo")
        try:
            async with websockets.connect(url(port, "/echo")) as sender:
                await still_echoes(sender)
                (b,) = [
                    p
                    for p in factory.openSessions("/echo")
                    if p.peer.endswith(str(closing.writer.get_extra_info("sockname")[1]))
                ]
                b.sendClose(1000)
                assert b.sendMessage(b"to a closing peer") is False
                assert len(factory.openSessions("/echo")) == 1
                await sender.send("broadcast")
                assert await asyncio.wait_for(sender.recv(), TIMEOUT) == "to all"
                assert await asyncio.wait_for(sender.recv(), TIMEOUT) == "1"
                before, close = await wsframes.read_until_close(closing.reader, TIMEOUT)
                assert before == [] and close.close_code == 1000
                await still_echoes(sender)
        finally:
            closing.close()

    await aio(scenario())
    assert failures(captured_log) == []


@pytest_twisted.ensureDeferred
async def test_broadcast_reaches_open_sessions_of_the_route_only(
    serve: Serve, captured_log: CapturedLog
) -> None:
    """
    Broadcasts go to the open sessions of one route, or of all; a session
    whose route's max_message_size is smaller than the message is skipped
    (with one warning) instead of failing the whole broadcast.
    """
    anonymous = [AnonymousAuthenticator()]
    factory = SecureServerFactory(
        ServerPolicy(
            (
                RoutePolicy("/echo", anonymous, protocol=Faulty),
                RoutePolicy("/other", anonymous, protocol=Faulty),
                RoutePolicy("/tiny", anonymous, protocol=Faulty, max_message_size=2),
            )
        )
    )
    port = serve(factory)

    async def scenario() -> None:
        async with (
            websockets.connect(url(port, "/echo")) as one,
            websockets.connect(url(port, "/echo")) as two,
            websockets.connect(url(port, "/other")) as elsewhere,
        ):
            for ws in (one, two, elsewhere):
                await still_echoes(ws)
            assert factory.broadcast(b"\x00\x01", isBinary=True, route="/echo") == 2
            for ws in (one, two):
                assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"\x00\x01"
            assert factory.broadcast(b"all", route=None) == 3
            for ws in (one, two, elsewhere):
                assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "all"
            assert factory.broadcast(b"nobody", route="/nowhere") == 0
            async with websockets.connect(url(port, "/tiny")) as tiny:
                assert factory.broadcast(b"big", route=None) == 3
                assert factory.broadcast(b"ok", route="/tiny") == 1
                assert await asyncio.wait_for(tiny.recv(), TIMEOUT) == "ok"
            for ws in (one, two, elsewhere):
                assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "big"

    await aio(scenario())
    (warning,) = captured_log.matching(log_namespace="txwssec.server", count=1)
    assert warning["size"] == 3
    assert failures(captured_log) == []


# -- gateway ------------------------------------------------------------------------------


class BrokenRelay(GatewayProtocol):
    """A gateway leg whose relay to the upstream fails on "boom"."""

    def relayForward(self, frames: bytes) -> None:
        if b"boom" in wsframes.apply_mask(frames[6:], frames[2:6]):
            raise Boom("relay failed")
        super().relayForward(frames)


@pytest_twisted.ensureDeferred
async def test_error_in_the_relay_closes_both_legs(
    serve: Serve, captured_log: CapturedLog
) -> None:
    Faulty.closes = []
    _, upstream_port = faulty_server(serve)
    route = RoutePolicy(
        "/gateway",
        [AnonymousAuthenticator()],
        protocol=BrokenRelay,
        upstream=Upstream((f"ws://127.0.0.1:{upstream_port}/echo",)),
    )
    factory = SecureServerFactory(ServerPolicy.single(route))
    port = serve(factory)

    async def scenario() -> None:
        async with websockets.connect(url(port, "/gateway")) as other:
            async with websockets.connect(url(port, "/gateway")) as ws:
                await still_echoes(ws)
                await ws.send("boom")
                assert await closed_with(ws) == (1011, "internal error")
            await still_echoes(other)

    await aio(scenario())
    await aio(until(lambda: len(Faulty.closes) == 2))
    # The upstream saw a plain 1001 from the gateway (the other leg: 1000).
    assert Faulty.closes == [1001, 1000]
    (event,) = failures(captured_log)
    assert (event["hook"], event["route"]) == ("relay", "/gateway")
    assert event["log_failure"].check(Boom)


# -- the client ------------------------------------------------------------------------------


class FaultyClient(SecureClientProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if payload == b"client-boom":
            raise Boom("client onMessage failed")


@pytest_twisted.ensureDeferred
async def test_error_in_a_client_hook_closes_1011(serve: Serve, captured_log: CapturedLog) -> None:
    Faulty.closes = []
    _, port = faulty_server(serve)
    client_factory = SecureClientFactory(url(port, "/echo"))
    client_factory.protocol = FaultyClient
    protocol = await client_factory.connect()
    await protocol.opened
    assert protocol.sendMessage(b"client-boom") is True
    was_clean, _, _ = await protocol.closed
    assert (was_clean, protocol.localCloseCode) == (True, 1011)
    assert protocol.sendMessage(b"after") is False
    await aio(until(lambda: bool(Faulty.closes)))
    assert Faulty.closes == [1011]
    (event,) = failures(captured_log)
    assert (event["hook"], event["route"], event["log_namespace"]) == (
        "onMessage",
        "/echo",
        "txwssec.client",
    )
    assert event["log_failure"].check(Boom)


def test_server_and_client_share_the_guarded_send_and_the_1011_close() -> None:
    """One implementation of both for the server, the client and the gateway's legs."""
    assert SecureClientProtocol.sendMessage is SecureServerProtocol.sendMessage
    assert SecureClientProtocol._internalError is SecureServerProtocol._internalError
