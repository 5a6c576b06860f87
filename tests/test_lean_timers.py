"""
The timers of a short connection (issue 19, round 4, bench/RESULTS.md
"Round 4: server handshake"): the server's timers keep one reactor call
through the 101 (auto-ping's timer is armed before the handshake's is
cancelled), and an orderly close that needs no wait arms no close timer.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
import wsframes
from conftest import aio
from test_upgrade_reader import exchange, request
from twisted.internet import reactor, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater

import txwssec._wire
from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec.apps.echo import EchoProtocol

#: The timers' reactor call at connectionMade and at onOpen.
CALLS: dict[str, Any] = {}


class Timed(EchoProtocol):
    def connectionMade(self) -> None:
        super().connectionMade()
        CALLS["made"] = self.factory.deadlines._call

    def onOpen(self) -> None:
        call = CALLS["open"] = self.factory.deadlines._call
        CALLS["active"] = call is not None and call.active()
        CALLS["autoPing"] = self.autoPingPendingCall
        CALLS["handshake"] = self.openHandshakeTimeoutCall
        super().onOpen()


def timed_factory(auto_ping: float = 30) -> SecureServerFactory:
    made = SecureServerFactory(
        ServerPolicy(routes=(RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=Timed),))
    )
    made.protocol = Timed  # from connectionMade on
    made.setProtocolOptions(autoPingInterval=auto_ping)
    return made


@pytest_twisted.ensureDeferred
async def test_one_reactor_call_through_the_101(serve: Any) -> None:
    """The handshake's timer armed the reactor call; the 101 keeps it."""
    CALLS.clear()
    made = timed_factory()
    port = serve(made)
    answer = await aio(exchange(port, request()))
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert CALLS["made"] is not None
    assert CALLS["open"] is CALLS["made"]
    assert CALLS["active"]
    assert CALLS["handshake"] is None
    assert CALLS["autoPing"] is not None
    # Everything cancelled once the connection is gone: no reactor call.
    assert made.deadlines._call is None
    assert len(made.deadlines) == 0


async def wait_until(condition: Callable[[], bool], asynchronous: bool = False) -> None:
    """Until C{condition} holds (10 s at most), in Twisted's loop or asyncio's."""
    for _ in range(1000):
        if condition():
            return
        if asynchronous:
            await asyncio.sleep(0.01)
        else:
            await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not met in 10 s")


# -- the orderly close's timer ----------------------------------------------------------

#: Per connection: the close timer at connectionLost, and the timers armed
#: for _abortLingering.
ENDS: list[dict[str, Any]] = []


class Ends(EchoProtocol):
    #: Bytes written straight to the transport right after the close.
    after_close = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.lingers = 0
        original = self.factory.deadlines.call_later

        def counted(delay: float, func: Any, *args: Any) -> Any:
            if getattr(func, "__name__", "") == "_abortLingering":
                self.lingers += 1
            return original(delay, func, *args)

        self._counted = counted

    def _armLinger(self) -> None:
        deadlines = self.factory.deadlines
        deadlines.call_later = self._counted  # type: ignore[method-assign]
        try:
            super()._armLinger()
        finally:
            del deadlines.call_later

    def dropConnection(self, abort: bool = False) -> None:
        super().dropConnection(abort)
        if self.after_close:
            self.transport.write(b"x" * self.after_close)

    def connectionLost(self, reason: Any = None) -> None:
        ENDS.append({"timer": self._loseTimer, "lingers": self.lingers})
        super().connectionLost(reason)


class WritesAfterClose(Ends):
    after_close = 8 * 2**20


def ends_factory(protocol: type[Ends], close_timeout: float = 1) -> SecureServerFactory:
    made = SecureServerFactory(
        ServerPolicy(
            routes=(RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=protocol),),
            close_timeout=close_timeout,
        )
    )
    made.protocol = protocol
    return made


@pytest_twisted.ensureDeferred
async def test_clean_close_arms_no_close_timer(serve: Any) -> None:
    """The close reply and the FIN leave at once: no timer to bound them."""
    ENDS.clear()
    made = ends_factory(Ends)
    port = serve(made)

    async def run() -> bytes:
        client = await wsframes.connect(port, "/echo")
        try:
            await client.send(wsframes.close_frame(1000))
            return await asyncio.wait_for(client.reader.read(), 10)
        finally:
            client.close()

    assert await aio(run()) == b"\x88\x02\x03\xe8"  # the reply, then a FIN
    await wait_until(lambda: len(ENDS) == 1)
    assert ENDS == [{"timer": None, "lingers": 0}]
    assert made.counters["limit.close_linger"] == 0
    assert made.deadlines._call is None


@pytest_twisted.ensureDeferred
async def test_written_after_the_close_still_bounded_by_the_close_timeout(serve: Any) -> None:
    """
    Bytes written after the close (which then waits for Twisted's write) to
    a peer that does not read: the close timer is armed, and resets the
    connection after the close timeout.
    """
    ENDS.clear()
    made = ends_factory(WritesAfterClose, close_timeout=0.2)
    port = serve(made)

    async def run() -> None:
        client = await wsframes.connect(port, "/echo", rcvbuf=4096)
        try:
            await client.send(wsframes.close_frame(1000))
            await wait_until(lambda: len(ENDS) == 1, asynchronous=True)
        finally:
            client.close()

    await aio(run())
    assert ENDS[0]["lingers"] == 1
    assert made.counters["limit.close_linger"] == 1
    assert made.connections.total == 0


# -- the close at the end of the read -------------------------------------------------

#: Per connection: how it ended, seen from connectionLost.
LOST: list[dict[str, Any]] = []


class Lost(EchoProtocol):
    def connectionLost(self, reason: Any = None) -> None:
        transport = self.transport
        LOST.append(
            {
                "reason": type(reason.value) if reason is not None else None,
                "same failure": reason is _CONNECTION_DONE_FAILURE(),
                "reading": transport in reactor.getReaders(),
                "writing": transport in reactor.getWriters(),
                "transport": {
                    name: value
                    for name, value in vars(transport).items()
                    if name
                    in (
                        "connected",
                        "disconnected",
                        "disconnecting",
                        "dataBuffer",
                        "_tempDataLen",
                        "producer",
                        "_txwssec_closing",
                    )
                },
                "has socket": hasattr(transport, "socket"),
                "has protocol": "protocol" in vars(transport),
                "keys": sorted(vars(transport)),
                "code": self.remoteCloseCode,
                "clean": self.wasClean,
            }
        )
        super().connectionLost(reason)


def _CONNECTION_DONE_FAILURE() -> Any:
    """The failure Twisted's reactor gives every orderly close."""
    from twisted.internet import error, posixbase

    default = posixbase._DisconnectSelectableMixin._disconnectSelectable.__defaults__
    assert default is not None
    return default[0][error.ConnectionDone]


def lost_factory() -> SecureServerFactory:
    made = SecureServerFactory(
        ServerPolicy(routes=(RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=Lost),))
    )
    made.protocol = Lost
    return made


async def _close_and_read(port: int, *frames: bytes) -> bytes:
    client = await wsframes.connect(port, "/echo")
    try:
        for data in frames:
            await client.send(data)
        return await asyncio.wait_for(client.reader.read(), 10)
    finally:
        client.close()


CLOSES = [
    ("close", (wsframes.close_frame(1000),)),
    ("message then close", (wsframes.frame(wsframes.TEXT, b"hi"), wsframes.close_frame(1001))),
    ("invalid close", (b"\x88\x81abcd" + bytes([0x03 ^ 0x61]),)),
]


@pytest.mark.parametrize("name,frames", CLOSES, ids=[name for name, _ in CLOSES])
@pytest_twisted.ensureDeferred
async def test_close_in_the_read_is_the_close_at_the_end_of_the_turn(
    serve: Any, monkeypatch: pytest.MonkeyPatch, name: str, frames: tuple[bytes, ...]
) -> None:
    """
    The same bytes, FIN, transport state, failure and reactor state with the
    close done at the end of the read (no reactor call) as at the end of
    the turn (a callLater(0), as round 3 closed), each with the lean
    disconnect (txwssec._wire.disconnect_done) and the reactor's.
    """
    seen = []
    scheduled: list[Any] = []
    call_later = reactor.callLater

    def counted(delay: float, func: Any, *args: Any) -> Any:
        if func is txwssec._wire._closed:
            scheduled.append(func)
        return call_later(delay, func, *args)

    monkeypatch.setattr(reactor, "callLater", counted)
    for in_read, lean in ((True, True), (False, True), (True, False), (False, False)):
        monkeypatch.setattr(txwssec._wire, "CLOSE_IN_READ", in_read)
        monkeypatch.setattr(txwssec._wire, "LEAN_DISCONNECT", lean)
        LOST.clear()
        scheduled.clear()
        port = serve(lost_factory())
        answer = await aio(_close_and_read(port, *frames))
        await wait_until(lambda: len(LOST) == 1)
        seen.append((answer, LOST[0]))
        assert len(scheduled) == (0 if in_read else 1)
    for other in seen[1:]:
        assert other == seen[0]
    assert seen[0][1]["reason"] is ConnectionDone
    assert seen[0][1]["same failure"]


class _Producer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def stopProducing(self) -> None:
        self.calls.append("stop")

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")


class _Recording(Protocol):
    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason


@pytest.mark.parametrize("producer", [False, True])
@pytest.mark.parametrize("reading", [False, True])
def test_disconnect_done_is_the_reactors(
    monkeypatch: pytest.MonkeyPatch, producer: bool, reading: bool
) -> None:
    """disconnect_done's own steps: the reactor's, state for state."""
    results = []
    for lean in (True, False):
        monkeypatch.setattr(txwssec._wire, "LEAN_DISCONNECT", lean)
        left, right = socket.socketpair()
        protocol = _Recording()
        transport = tcp.Server(left, protocol, ("127.0.0.1", 1), None, 0, reactor)
        protocol.makeConnection(transport)
        if not reading:
            transport.stopReading()
        registered = _Producer()
        if producer:
            transport.registerProducer(registered, True)
        txwssec._wire.disconnect_done(transport)
        right.settimeout(5)
        results.append(
            {
                "state": {
                    name: value
                    for name, value in vars(transport).items()
                    if name not in ("reactor", "client", "server")
                },
                "reason": protocol.reason is txwssec._wire._DONE,
                "producer": registered.calls,
                "reading": transport in reactor.getReaders(),
                "writing": transport in reactor.getWriters(),
                "fin": right.recv(1),
            }
        )
        right.close()
    assert results[0] == results[1]
    assert results[0]["fin"] == b""
    assert results[0]["producer"] == (["stop"] if producer else [])
