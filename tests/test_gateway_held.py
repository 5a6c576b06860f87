"""
The gateway's writes are held until the end of the reactor turn
(txwssec.gateway.held): each leg sends what it wrote in a turn in one
C{send}, straight to the socket, instead of through Twisted's buffered
C{transport.write} (an C{epoll_ctl} to be told the socket is writable, a
loop turn, the send, another C{epoll_ctl}).
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

import pytest
import pytest_twisted
import websockets
import wsframes
from autobahn.websocket.protocol import TrafficStats
from conftest import aio
from test_gateway_relay import Serve, gateway, read_frames, the_end, unmasked
from twisted.internet import abstract
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from txwssec.gateway.held import TurnWrites, lose_connection, turn_writes
from txwssec.gateway.upstream import UpstreamProtocol
from txwssec.proxy import GatewayProtocol


def _leg(transport: Any) -> str | None:
    protocol = getattr(transport, "protocol", None)
    protocol = getattr(protocol, "_wrappedProtocol", protocol)  # an endpoint's wrapper
    if isinstance(protocol, GatewayProtocol):
        return "client leg"
    if isinstance(protocol, UpstreamProtocol):
        return "upstream leg"
    return None


@pytest.fixture
def buffered_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bytes]]:
    """The gateway legs' writes that went through Twisted's buffer."""
    seen: list[tuple[str, bytes]] = []
    write = abstract.FileDescriptor.write
    write_sequence = abstract.FileDescriptor.writeSequence

    def counted_write(self: Any, data: bytes) -> None:
        leg = _leg(self)
        if leg is not None:
            seen.append((leg, bytes(data)))
        write(self, data)

    def counted_sequence(self: Any, chunks: list[bytes]) -> None:
        leg = _leg(self)
        if leg is not None:
            seen.append((leg, b"".join(chunks)))
        write_sequence(self, chunks)

    monkeypatch.setattr(abstract.FileDescriptor, "write", counted_write)
    monkeypatch.setattr(abstract.FileDescriptor, "writeSequence", counted_sequence)
    return seen


@pytest_twisted.ensureDeferred
async def test_a_session_writes_nothing_through_twisteds_buffer(
    serve: Serve, buffered_writes: list[tuple[str, bytes]]
) -> None:
    """
    The upgrade request, the 101, relayed frames both ways and the close
    relay all leave in direct sends (the sockets take them whole).
    """
    env = gateway(serve)

    async def run() -> list[str | bytes]:
        async with websockets.connect(f"ws://127.0.0.1:{env.port}/ws") as ws:
            answers = []
            for index in range(5):
                await ws.send(f"message {index}")
                answers.append(await ws.recv())
            await ws.send(b"\x00" * 100_000)
            answers.append(await ws.recv())
        return answers

    answers = await aio(run())
    assert answers[:5] == [f"message {index}" for index in range(5)]
    assert answers[5] == b"\x00" * 100_000
    assert env.upstream.closes == [1000]
    assert buffered_writes == []


# -- unit tests ---------------------------------------------------------------------


class Turns:
    """
    A reactor's C{callLater(0)} as the reactor runs it: a call made during
    a turn runs at the end of that turn (L{end}), a call made then at the
    end of the next one.
    """

    def __init__(self) -> None:
        self.due: list[tuple[Any, tuple[Any, ...]]] = []

    def callLater(self, delay: float, function: Any, *args: Any) -> object:
        assert delay == 0
        self.due.append((function, args))
        return object()

    def end(self) -> None:
        due, self.due = self.due, []
        for function, args in due:
            function(*args)


class _Factory:
    def __init__(self, clock: Any) -> None:
        self.reactor = clock


def _upstream(clock: Any) -> tuple[UpstreamProtocol, StringTransport]:
    protocol = UpstreamProtocol()
    protocol.factory = _Factory(clock)  # type: ignore[assignment]
    transport = StringTransport()
    protocol.transport = transport
    return protocol, transport


def test_upstream_writes_leave_after_one_more_poll_in_order() -> None:
    """As Twisted's write would: at the end of the next turn, all at once."""
    turns = Turns()
    protocol, transport = _upstream(turns)
    protocol.holdWrite(b"one ")
    protocol.holdWrite(b"two ")
    turns.end()
    assert transport.value() == b""
    protocol.holdWrite(b"three ")  # the next turn's frames join them
    turns.end()
    assert transport.value() == b"one two three "
    assert turns.due == []
    protocol.holdWrite(b"four")
    turns.end()
    turns.end()
    assert transport.value() == b"one two three four"


def test_upstream_close_sends_what_was_held_first_and_an_abort_drops_it() -> None:
    turns = Turns()
    protocol, transport = _upstream(turns)
    protocol.holdWrite(b"frames")
    protocol._closeConnection(abort=False)
    assert transport.value() == b"frames"
    assert transport.disconnecting
    turns.end()
    turns.end()
    assert transport.value() == b"frames"

    protocol, transport = _upstream(turns)
    transport.abortConnection = lambda: None  # type: ignore[method-assign]
    protocol.holdWrite(b"frames")
    protocol._closeConnection(abort=True)
    turns.end()
    turns.end()
    assert transport.value() == b""


def test_upstream_close_frame_leaves_at_once_after_what_was_held() -> None:
    """
    The upstream leg's close frame is sent when it is made, after the
    frames held before it, in one write: no frame of the leg can follow it.
    """
    turns = Turns()
    protocol, transport = _upstream(turns)
    protocol.state = protocol.STATE_OPEN
    protocol.send_queue = deque()
    protocol.trafficStats = TrafficStats()
    protocol.logOctets = False
    protocol.logFrames = False
    protocol.closeHandshakeTimeout = 0
    protocol.factory.isServer = False  # type: ignore[attr-defined]
    protocol.maskClientFrames = False  # (the bytes are then known)
    protocol.holdWrite(b"frames ")
    protocol.sendCloseFrame(1000, b"bye")
    assert transport.value() == b"frames \x88\x05\x03\xe8bye"
    assert protocol.state == protocol.STATE_CLOSING
    assert protocol._cork is None
    turns.end()
    turns.end()
    assert transport.value() == b"frames \x88\x05\x03\xe8bye"


def test_one_call_per_turn_for_all_the_legs() -> None:
    turns = Turns()
    turn = TurnWrites(turns)  # type: ignore[arg-type]
    released: list[str] = []

    class Leg:
        def __init__(self, name: str) -> None:
            self.name = name

        def releaseWrites(self) -> None:
            released.append(self.name)

    turn.hold(Leg("now 1"))
    turn.holdLater(Leg("later"))
    turn.hold(Leg("now 2"))
    assert len(turns.due) == 1
    turns.end()
    assert released == ["now 1", "now 2"]
    turn.hold(Leg("next turn"))
    assert len(turns.due) == 1
    turns.end()
    assert released == ["now 1", "now 2", "later", "next turn"]
    assert turns.due == []
    clock = Clock()
    assert turn_writes(clock) is turn_writes(clock)


# -- the client leg's TCP close --------------------------------------------------------


@pytest.fixture
def close_waits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The client leg's transports that waited for a writable socket."""
    seen: list[str] = []
    start_writing = abstract.FileDescriptor.startWriting

    def counted(self: Any) -> None:
        leg = _leg(self)
        if leg == "client leg":
            seen.append(leg)
        start_writing(self)

    monkeypatch.setattr(abstract.FileDescriptor, "startWriting", counted)
    return seen


@pytest_twisted.ensureDeferred
async def test_the_client_leg_closes_without_waiting_for_a_writable_socket(
    serve: Serve, close_waits: list[str]
) -> None:
    """
    The client closes: it gets the close reply, then the TCP close (EOF),
    and the gateway closed it without Twisted's loseConnection round
    (startWriting, a poll, an empty send).
    """
    env = gateway(serve)
    client = await aio(env.raw())
    await aio(client.send(wsframes.frame(1, b"hello")))
    frames = await aio(read_frames(client, 1))
    assert frames[0].payload == b"hello"
    await aio(client.send(wsframes.close_frame(1000, "bye")))
    rest = await aio(the_end(client))
    assert rest == unmasked(8, struct.pack("!H", 1000))  # (the code only, as before)
    assert close_waits == []
    assert env.upstream.closes == [1000]


def test_lose_connection_leaves_other_transports_to_twisted() -> None:
    transport = StringTransport()
    assert not lose_connection(transport)
    assert not transport.disconnecting
