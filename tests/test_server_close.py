"""
The server's TCP close (txwssec._wire.lose_connection, used by
txwssec.server.flow.TrafficFlow._closeConnection): once the close handshake
is complete (or a refusal is written) and every byte went to the socket,
the plain TCP connection is closed at the end of the reactor turn, without
Twisted's C{loseConnection} round (C{startWriting}: an C{epoll_ctl}, a poll
that reports the socket writable, an empty C{send}, another C{epoll_ctl}).
Still an orderly close (a FIN after every byte); bytes still buffered, a
half-close, a producer to resume first, and any transport but plain TCP
go to Twisted's C{loseConnection}; an abort is still a reset.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest
import pytest_twisted
import wsframes
from conftest import aio
from test_closes import MIB, Serve, opened, start
from twisted.internet import abstract, protocol, tcp
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec._wire import lose_connection
from txwssec.apps.echo import EchoProtocol
from txwssec.policy import RouteLimits
from txwssec.server import SecureServerProtocol

TIMEOUT = 10.0
PATHS = pytest.mark.parametrize("path", ["/echo", "/gateway"])


def _server_side(transport: Any) -> bool:
    return type(transport) is tcp.Server and isinstance(
        getattr(transport, "protocol", None), SecureServerProtocol
    )


@pytest.fixture
def close_waits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """
    The server's transports that asked to be told the socket is writable
    with nothing to write (Twisted's loseConnection waiting to close).
    """
    seen: list[str] = []
    start_writing = abstract.FileDescriptor.startWriting

    def counted(self: Any) -> None:
        if _server_side(self) and not self.dataBuffer and not self._tempDataLen:
            seen.append(type(self.protocol).__name__)
        start_writing(self)

    monkeypatch.setattr(abstract.FileDescriptor, "startWriting", counted)
    return seen


@pytest.fixture
def lose_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes buffered in the server's transport at each loseConnection."""
    seen: list[int] = []
    lose = abstract.FileDescriptor.loseConnection

    def counted(self: Any, *args: Any) -> None:
        if _server_side(self):
            seen.append(len(self.dataBuffer) - self.offset + self._tempDataLen)
        lose(self, *args)

    monkeypatch.setattr(abstract.FileDescriptor, "loseConnection", counted)
    return seen


async def the_end(reader: asyncio.StreamReader) -> bytes:
    """Everything until the FIN (a reset raises ConnectionResetError)."""
    return await asyncio.wait_for(reader.read(), TIMEOUT)


def unmasked_close(code: int) -> bytes:
    return bytes((0x88, 2)) + struct.pack("!H", code)


# -- the common close: no wait for a writable socket -----------------------------------


@PATHS
@pytest_twisted.ensureDeferred
async def test_client_close_is_answered_then_fin_without_waiting_for_a_writable_socket(
    serve: Serve, path: str, close_waits: list[str], lose_calls: list[int]
) -> None:
    _, port = start(serve)

    async def run() -> bytes:
        client = await opened(port, path)
        try:
            await client.send(wsframes.close_frame(1000, "bye"))
            return await the_end(client.reader)
        finally:
            client.close()

    assert await aio(run()) == unmasked_close(1000)  # the reply, then a FIN
    assert close_waits == []
    assert lose_calls == []


@PATHS
@pytest_twisted.ensureDeferred
async def test_server_close_then_reply_then_fin_without_waiting_for_a_writable_socket(
    serve: Serve, path: str, close_waits: list[str], lose_calls: list[int]
) -> None:
    """A close the server starts (3003, from outside a read): the same end."""
    factory, port = start(serve)

    async def run() -> bytes:
        client = await opened(port, path)
        try:
            assert factory.revoke("anonymous") == 1
            _, close = await wsframes.read_until_close(client.reader, TIMEOUT)
            assert close.close_code == 3003
            await client.send(wsframes.close_frame(3003))
            return await the_end(client.reader)
        finally:
            client.close()

    assert await aio(run()) == b""
    assert close_waits == []
    assert lose_calls == []


@pytest_twisted.ensureDeferred
async def test_refusal_then_fin_without_waiting_for_a_writable_socket(
    serve: Serve, close_waits: list[str], lose_calls: list[int]
) -> None:
    """A refused upgrade (no such route: 404): the response, then a FIN."""
    _, port = start(serve)

    async def run() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            await writer.drain()
            return await the_end(reader)
        finally:
            writer.close()

    response = await aio(run())
    assert response.startswith(b"HTTP/1.1 404 "), response
    assert close_waits == []
    assert lose_calls == []


# -- what still goes to Twisted's loseConnection ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bytes_still_buffered_are_all_delivered_then_fin(
    serve: Serve, lose_calls: list[int]
) -> None:
    """
    The peer reads slowly: at the close, echoes are still in the
    transport's buffer. Twisted's loseConnection sends them all, then the
    close reply, then the FIN.
    """
    route = RoutePolicy(
        "/echo",
        [AnonymousAuthenticator()],
        protocol=EchoProtocol,
        max_message_size=MIB,
        limits=RouteLimits(max_buffered_bytes=0),
    )
    port = serve(SecureServerFactory(ServerPolicy((route,))))
    messages = [bytes([index]) * MIB for index in range(4)]

    async def run() -> tuple[list[wsframes.Frame], wsframes.Frame, bytes]:
        client = await wsframes.connect(port, "/echo", rcvbuf=4096, limit=2 * MIB)
        try:
            await client.send(
                b"".join(wsframes.frame(wsframes.BINARY, message) for message in messages)
                + wsframes.close_frame(1000)
            )
            await asyncio.sleep(0.2)  # the server reads it all before the client reads
            before, close = await wsframes.read_until_close(client.reader, TIMEOUT)
            return before, close, await the_end(client.reader)
        finally:
            client.close()

    before, close, rest = await aio(run())
    assert [frame.payload for frame in before] == messages
    assert close.close_code == 1000
    assert rest == b""
    assert len(lose_calls) == 1 and lose_calls[0] > 0  # Twisted's, with bytes to send


class _Held(protocol.Protocol):
    def __init__(self, made: Deferred[_Held]) -> None:
        self.made = made
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:
        self.made.callback(self)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost.append(reason)


class _Producer:
    def __init__(self) -> None:
        self.resumed = 0

    def resumeProducing(self) -> None:
        self.resumed += 1

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


async def _plain_tcp(serve: Serve) -> tuple[_Held, asyncio.StreamReader, asyncio.StreamWriter]:
    made: Deferred[_Held] = Deferred()
    factory = protocol.Factory.forProtocol(lambda: _Held(made))
    port = serve(factory)
    reader, writer = await aio(asyncio.open_connection("127.0.0.1", port))
    server = await made
    assert type(server.transport) is tcp.Server
    return server, reader, writer


@pytest_twisted.ensureDeferred
async def test_lose_connection_closes_plain_tcp_with_connection_done(serve: Serve) -> None:
    server, reader, writer = await _plain_tcp(serve)
    transport: Any = server.transport
    transport.write(b"buffered")  # in Twisted's buffer: its loseConnection's
    assert not lose_connection(transport)
    assert not transport.disconnecting
    transport.doWrite()  # (what the reactor's next poll would do)
    assert lose_connection(transport)
    assert not lose_connection(transport)  # a close under way
    assert await aio(the_end(reader)) == b"buffered"
    (reason,) = server.lost
    assert type(reason.value) is type(protocol.connectionDone.value)
    writer.close()


@pytest_twisted.ensureDeferred
async def test_lose_connection_leaves_a_half_close_to_twisted(serve: Serve) -> None:
    server, reader, writer = await _plain_tcp(serve)
    transport: Any = server.transport
    transport.loseWriteConnection()
    assert not lose_connection(transport)
    transport.loseConnection()
    assert await aio(the_end(reader)) == b""
    writer.close()


@pytest_twisted.ensureDeferred
async def test_lose_connection_leaves_a_producer_to_resume_to_twisted(serve: Serve) -> None:
    server, reader, writer = await _plain_tcp(serve)
    transport: Any = server.transport
    producer = _Producer()
    transport.registerProducer(producer, False)  # a pull producer: resumed on write
    assert not lose_connection(transport)
    transport.unregisterProducer()
    transport.registerProducer(producer, True)
    transport.producerPaused = True  # a push producer Twisted paused
    assert not lose_connection(transport)
    transport.producerPaused = False
    assert lose_connection(transport)  # a streaming producer that runs: as Twisted
    assert await aio(the_end(reader)) == b""
    writer.close()


# -- an abort is still a reset ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_open_handshake_timeout_is_still_a_reset(
    serve: Serve, close_waits: list[str]
) -> None:
    route = RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=EchoProtocol)
    factory = SecureServerFactory(ServerPolicy((route,), handshake_timeout=0.1))
    port = serve(factory)

    async def run() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /echo HTTP/1.1\r\n")  # and nothing more
            await writer.drain()
            with pytest.raises(ConnectionResetError):
                await the_end(reader)
        finally:
            writer.close()

    await aio(run())
    assert close_waits == []
