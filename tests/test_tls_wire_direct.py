"""
txwssec's server TLS transport calls OpenSSL through the cffi binding on
its hot paths (round 4, txwssec/_tlswire.py): what the application sees
(its data, C{handshakeCompleted}, the reason of C{connectionLost}) and what
the client reads must be Twisted's for every way a connection can go,
including the failures, the callback problems pyOpenSSL keeps, and the
endings; and the hot paths do not go through pyOpenSSL's methods (which
raise and catch a C{WantReadError} whenever OpenSSL waits for the peer).

Each test is differential: the same client script against Twisted's
memory-BIO TLS transport and txwssec's, over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import test_tls_wire
from conftest import aio
from OpenSSL import SSL
from test_tls_wire import Scripted, ScriptedFactory, context, exchange
from test_tls_wire_attacks import Wire
from twisted.internet.interfaces import IHandshakeListener
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from txwssec import _tlswire
from txwssec._tlswire import ServerTLSFactory

TIMEOUT = 10.0

folder = test_tls_wire.folder
listen = test_tls_wire.listen


@implementer(IHandshakeListener)
class Recorded(Scripted):
    """Scripted, noting what the application sees, in order."""

    def connectionMade(self) -> None:
        self.seen: list[Any] = []
        super().connectionMade()

    def handshakeCompleted(self) -> None:
        self.seen.append("handshake completed")

    def dataReceived(self, data: bytes) -> None:
        self.seen.append(data)
        super().dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        self.seen.append(("lost", reason.type.__name__, str(reason.value)))


class RecordedFactory(ScriptedFactory):
    protocol = Recorded


Script = Callable[[int, Path], Any]


async def both(
    folder: Path, listen: Any, script: Script, tls: Any = None
) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """
    C{script} against Twisted's transport, then txwssec's; once each server
    has let its connection go: (client result, what the application saw)
    for Twisted's, then for txwssec's.
    """
    tls = tls or context(folder)
    results = []
    for kind in (TLSMemoryBIOFactory, ServerTLSFactory):
        application = RecordedFactory()
        wrapping = kind(tls, False, application)
        port = await listen(wrapping)
        result = await aio(asyncio.to_thread(script, port, folder))

        async def let_go(wrapping: Any = wrapping) -> None:
            async with asyncio.timeout(TIMEOUT):
                while wrapping.protocols:
                    await asyncio.sleep(0.01)

        await aio(let_go())
        results.append((result, [p.seen for p in application.protocols]))
    return results[0], results[1]


def _connect_and_close(port: int, folder: Path) -> str:
    socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
    return "closed"


def _connect_and_reset(port: int, folder: Path) -> str:
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    raw.close()
    return "reset"


def _hello(wire: Wire) -> bytes:
    try:
        wire.tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return wire.outgoing.read()


def _half_a_hello(port: int, folder: Path) -> tuple[bytes, str]:
    wire = Wire(port, folder)
    try:
        wire.raw.sendall(_hello(wire)[:40])
        wire.raw.shutdown(socket.SHUT_WR)
        return wire.ending()
    finally:
        wire.close()


def _hello_then_close(port: int, folder: Path) -> bytes:
    wire = Wire(port, folder)
    try:
        wire.raw.sendall(_hello(wire))
        flight = wire.raw.recv(65536)
        return flight[:1]  # a handshake record (the rest is random)
    finally:
        wire.close()


def _garbage_hello(port: int, folder: Path) -> tuple[bytes, str]:
    wire = Wire(port, folder)
    try:
        hello = bytearray(_hello(wire))
        hello[9:41] = b"\xff" * 32  # no longer a well-formed ClientHello body
        hello[43] ^= 0xFF
        wire.raw.sendall(bytes(hello))
        return wire.ending()
    finally:
        wire.close()


def _echo_then(ending: str) -> Script:
    """The handshake, an echo, then the client's C{ending}."""

    def script(port: int, folder: Path) -> tuple[bytes, str]:
        wire = Wire(port, folder)
        try:
            wire.handshake()
            wire.raw.sendall(wire.records(b"echo\nhello"))
            answer = b""
            while len(answer) < len(b"echo:hello"):
                wire.incoming.write(wire.raw.recv(65536))
                answer += wire._plain()
            if ending == "close_notify":
                wire.raw.sendall(wire.close_notify())
                return answer, wire.ending()[1]
            if ending == "reset":
                wire.raw.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            return answer, ending
        finally:
            wire.close()

    return script


def _server_closes(port: int, folder: Path) -> tuple[bytes, str]:
    """As the benchmark's client: the server closes (close_notify), the client drops TCP."""
    wire = Wire(port, folder)
    try:
        wire.handshake()
        wire.raw.sendall(wire.records(b"close\n"))
        answer = b""
        while True:
            wire.incoming.write(wire.raw.recv(65536))
            try:
                while chunk := wire.tls.read(65536):
                    answer += chunk
            except ssl.SSLWantReadError:
                continue
            return answer, "close_notify read"  # read() gives b"" after it
    finally:
        wire.close()


def _tls12(port: int, folder: Path) -> tuple[bytes, str]:
    wire = Wire(port, folder, ssl.TLSVersion.TLSv1_2)
    try:
        wire.handshake()
        wire.raw.sendall(wire.records(b"echo\nold") + wire.close_notify())
        return wire.ending()
    finally:
        wire.close()


def _big_echo(port: int, folder: Path) -> tuple[bytes, str]:
    return exchange(port, folder, [b"echo\n" + b"z" * 100_000], close_after=True)


SCRIPTS: dict[str, Script] = {
    "connect and close": _connect_and_close,
    "connect and reset": _connect_and_reset,
    "half a ClientHello": _half_a_hello,
    "ClientHello then close": _hello_then_close,
    "malformed ClientHello": _garbage_hello,
    "echo then close_notify": _echo_then("close_notify"),
    "echo then TCP close": _echo_then("TCP close"),
    "echo then reset": _echo_then("reset"),
    "server closes, client drops TCP": _server_closes,
    "TLS 1.2": _tls12,
    "100 KB echo": _big_echo,
}


@pytest.mark.parametrize("name", list(SCRIPTS))
@pytest_twisted.ensureDeferred
async def test_application_sees_what_twisted_gives(folder: Path, listen: Any, name: str) -> None:
    theirs, ours = await both(folder, listen, SCRIPTS[name])
    assert ours == theirs
    assert ours[1], "the application saw the connection"


@pytest_twisted.ensureDeferred
async def test_callback_problem_raised_as_with_twisted(folder: Path, listen: Any) -> None:
    """
    An ALPN callback that raises: pyOpenSSL keeps the exception and raises
    it from the next call on the connection; the handshake fails, and the
    application sees the same loss with both transports.
    """
    tls = context(folder, min_version="1.2")

    def broken(connection: SSL.Connection, offered: list[bytes]) -> bytes:
        raise ValueError("broken ALPN callback")

    tls.getContext().set_alpn_select_callback(broken)

    def offer(port: int, folder: Path) -> tuple[bytes, str]:
        try:
            return exchange(port, folder, [b"echo\nx"], alpn=["http/1.1"])
        except (ssl.SSLError, ConnectionError) as error:
            return b"", type(error).__name__

    theirs, ours = await both(folder, listen, offer, tls)
    assert ours == theirs
    assert ours[0][0] == b""


@pytest_twisted.ensureDeferred
async def test_hot_paths_skip_pyopenssl_methods(
    folder: Path, listen: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A handshake, echoes and the close: no call to pyOpenSSL's
    C{do_handshake}, C{recv}, C{send}, C{bio_read} or C{bio_write}
    (Twisted's transport calls each, and C{do_handshake}, C{recv} and
    C{bio_read} raise C{WantReadError} whenever OpenSSL waits).
    """
    assert _tlswire._lib is not None
    calls: list[str] = []
    for name in ("do_handshake", "recv", "send", "bio_read", "bio_write"):
        original = getattr(SSL.Connection, name)

        def counted(self: Any, *args: Any, _name: str = name, _original: Any = original) -> Any:
            calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(SSL.Connection, name, counted)
    port = await listen(ServerTLSFactory(context(folder), False, RecordedFactory()))
    result = await aio(
        asyncio.to_thread(exchange, port, folder, [b"echo\nonetwothree"], close_after=True)
    )
    assert result == (b"echo:onetwothree", "client closed")
    assert calls == []


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (_server_closes, (b"bye", "close_notify read")),
        (_echo_then("TCP close"), (b"echo:hello", "TCP close")),
    ],
    ids=["server closes", "first answer"],
)
@pytest_twisted.ensureDeferred
async def test_handshake_answer_and_close_sent_at_once(
    folder: Path,
    listen: Any,
    monkeypatch: pytest.MonkeyPatch,
    script: Script,
    expected: tuple[bytes, str],
) -> None:
    """
    The server's flight, the session tickets with the first answer, and the
    close (the last writes and the close_notify) go straight to the idle
    socket: the TCP transport never waits for the socket to be writable
    (Twisted's: once for each).
    """
    from twisted.internet import abstract

    waited: list[str] = []  # the TLS protocol class of each TCP transport that waits
    original = abstract.FileDescriptor.startWriting

    def counted(self: Any) -> None:
        waited.append(type(getattr(self, "protocol", None)).__name__)
        original(self)

    monkeypatch.setattr(abstract.FileDescriptor, "startWriting", counted)
    theirs, ours = await both(folder, listen, script)
    assert ours == theirs
    assert ours[0] == expected
    assert waited.count("BufferingTLSTransport") >= 2  # Twisted's
    assert "ServerTLSProtocol" not in waited


def _finished_with_request(port: int, folder: Path) -> tuple[bytes, str]:
    """As a browser: the client's Finished and its first record in one send."""
    wire = Wire(port, folder)
    try:
        while True:
            try:
                wire.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                wire.raw.sendall(wire.outgoing.read())
                wire.incoming.write(wire.raw.recv(65536))
        wire.raw.sendall(wire.records(b"echo\nhello"))  # after the Finished
        answer = b""
        while len(answer) < len(b"echo:hello"):
            wire.incoming.write(wire.raw.recv(65536))
            answer += wire._plain()
        return answer, "TCP close"
    finally:
        wire.close()


@pytest_twisted.ensureDeferred
async def test_tickets_and_first_answer_in_one_send(
    folder: Path, listen: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The Finished and the request in one read: the session tickets and the
    answer leave in one send, in that read (no reactor turn for Twisted's
    aggregation), after the flight's; what the client and the application
    see is Twisted's.
    """
    sends: list[int] = []
    original = _tlswire.write_at_once

    def counted(transport: Any, chunks: list[bytes]) -> None:
        sends.append(len(chunks))
        original(transport, chunks)

    monkeypatch.setattr(_tlswire, "write_at_once", counted)
    theirs, ours = await both(folder, listen, _finished_with_request)
    assert ours == theirs
    assert ours[0] == (b"echo:hello", "TCP close")
    assert sends == [1, 1]  # the flight; the tickets with the answer


def _server_closes_client_notifies(port: int, folder: Path) -> tuple[bytes, str]:
    """
    As picows, bench.py's "wss hs" client: the server closes (its last
    write and close_notify), the client answers with its close_notify and
    waits for the server's TCP close.
    """
    wire = Wire(port, folder)
    try:
        wire.handshake()
        wire.raw.sendall(wire.records(b"close\n"))
        answer = b""
        while True:  # until the server's close_notify (read() gives b"" after it)
            wire.incoming.write(wire.raw.recv(65536))
            try:
                while chunk := wire.tls.read(65536):
                    answer += chunk
            except ssl.SSLWantReadError:
                continue
            break
        wire.raw.sendall(wire.close_notify())
        return answer, wire.ending()[1]
    finally:
        wire.close()


@pytest.mark.parametrize(
    ("script", "expected", "waits"),
    [
        (_server_closes_client_notifies, (b"bye", "TCP close"), False),
        # the client's close_notify first: the server's answering one is
        # written on the TCP transport's next turn (Twisted's), then closed
        (_echo_then("close_notify"), (b"echo:hello", "TCP close"), True),
    ],
    ids=["server's close_notify first", "client's close_notify first"],
)
@pytest_twisted.ensureDeferred
async def test_tcp_closed_in_the_read_of_the_last_close_notify(
    folder: Path,
    listen: Any,
    monkeypatch: pytest.MonkeyPatch,
    script: Script,
    expected: tuple[bytes, str],
    waits: bool,
) -> None:
    """
    Once both close_notify are exchanged and nothing is left to send, the
    TCP connection is closed at the end of the read that brought the
    client's (L{txwssec._wire.lose_connection}), where Twisted's TCP
    transport first waits for the socket to be writable (two C{epoll_ctl},
    an event, an empty C{send}); what the client and the application see
    is Twisted's.
    """
    from twisted.internet import abstract

    waited: list[str] = []  # the TLS protocol class of each TCP transport that waits
    original = abstract.FileDescriptor.startWriting

    def counted(self: Any) -> None:
        waited.append(type(getattr(self, "protocol", None)).__name__)
        original(self)

    monkeypatch.setattr(abstract.FileDescriptor, "startWriting", counted)
    theirs, ours = await both(folder, listen, script)
    assert ours == theirs
    assert ours[0] == expected
    assert "BufferingTLSTransport" in waited  # Twisted's
    assert ("ServerTLSProtocol" in waited) is waits


@pytest_twisted.ensureDeferred
async def test_tcp_read_left_as_twisted_after_the_close(folder: Path, listen: Any) -> None:
    """
    The TCP transport's read (L{txwssec._wire.read_ahead}, at Twisted's
    read size, for the close at the end of the read) is forgotten when the
    connection is lost: no reference cycle left through the transport.
    """
    application = RecordedFactory()
    port = await listen(ServerTLSFactory(context(folder), False, application))
    result = await aio(asyncio.to_thread(exchange, port, folder, [b"close\n"]))
    assert result == (b"bye", "close_notify")

    async def lost() -> None:
        async with asyncio.timeout(TIMEOUT):
            while not application.protocols or application.protocols[0].seen[-1][0] != "lost":
                await asyncio.sleep(0.01)

    await aio(lost())
    tcp = application.protocols[0].transport.transport
    assert "doRead" not in tcp.__dict__
    assert tcp.bufferSize == 2**16  # Twisted's read size, unchanged
