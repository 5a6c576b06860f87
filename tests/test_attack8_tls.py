"""
Attack round 8 on the one-object server TLS transport (txwssec/_tlsport.py,
L{DirectTLSServer}): each case differential against the two-layer
transport (a TCP transport carrying L{ServerTLSProtocol}), as
tests/test_tls_port_direct.py does: the same client script, the same bytes
and ending for the client, the same application events and reasons.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import test_tls_wire
from conftest import aio
from test_tls_port_direct import both, ports  # noqa: F401 - the fixture
from test_tls_wire_direct import Recorded, RecordedFactory
from twisted.internet import reactor
from twisted.internet.interfaces import IPullProducer, IPushProducer
from zope.interface import implementer

TIMEOUT = 10.0
folder = test_tls_wire.folder


@implementer(IPullProducer)
class Pull:
    """A pull producer: five chunks, then unregistered and closed."""

    def __init__(self, transport: Any, seen: list[Any]) -> None:
        self.transport = transport
        self.left = 5
        self.seen = seen

    def resumeProducing(self) -> None:
        self.seen.append("pull")
        if self.left:
            self.left -= 1
            self.transport.write(b"p" * 20000 + b";")
            if not self.left:
                self.transport.unregisterProducer()
                self.transport.loseConnection()

    def stopProducing(self) -> None:
        self.seen.append("pull stopped")


@implementer(IPushProducer)
class Flood:
    """A streaming producer writing 32 KB per call until paused."""

    def __init__(self, transport: Any, seen: list[Any]) -> None:
        self.transport = transport
        self.seen = seen
        self.paused = False
        self.written = 0
        self.stopped = False

    def pump(self) -> None:
        while not self.paused and not self.stopped and self.written < 3_000_000:
            self.written += 32768
            self.transport.write(b"f" * 32768)
        if self.written >= 3_000_000 and not self.stopped:
            self.stopped = True
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def pauseProducing(self) -> None:
        if not self.paused:
            self.seen.append("paused")
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused:
            self.seen.append("resumed")
        self.paused = False
        reactor.callLater(0, self.pump)

    def stopProducing(self) -> None:
        self.seen.append("stopped")
        self.stopped = True


class Attacker(Recorded):
    def dataReceived(self, data: bytes) -> None:
        t: Any = self.transport
        if data.startswith(b"raise\n"):
            self.seen.append(data)
            t.write(b"before;")
            raise RuntimeError("application broke")
        if data.startswith(b"pull\n"):
            self.seen.append(data)
            t.registerProducer(Pull(t, self.seen), False)
            return
        if data.startswith(b"flood\n"):
            self.seen.append(data)
            producer = Flood(t, self.seen)
            t.registerProducer(producer, True)
            producer.resumeProducing()
            return
        if data.startswith(b"abort2\n"):
            self.seen.append(data)
            t.write(b"x")
            t.abortConnection()
            t.write(b"y")
            t.abortConnection()
            return
        if data.startswith(b"loseabort\n"):
            self.seen.append(data)
            t.write(b"x")
            t.loseConnection()
            t.write(b"y")
            t.abortConnection()
            return
        if data.startswith(b"lostraise\n"):
            self.seen.append(data)
            self.raiseOnLost = True
            t.loseConnection()
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        if getattr(self, "raiseOnLost", False):
            raise RuntimeError("connectionLost broke")


class AttackerFactory(RecordedFactory):
    protocol = Attacker


def _ask(line: bytes, slow: float = 0.0) -> Any:
    def script(port: int, folder: Path) -> tuple[int, bytes, str]:
        client = ssl.create_default_context(cafile=str(folder / "ca.pem"))
        received = b""
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
            with client.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(line)
                if slow:
                    import time

                    time.sleep(slow)
                while True:
                    try:
                        chunk = tls.recv(65536)
                    except ssl.SSLEOFError:
                        return len(received), received[:40], "EOF without close_notify"
                    except ConnectionResetError:
                        return len(received), received[:40], "reset"
                    if not chunk:
                        return len(received), received[:40], "close_notify"
                    received += chunk

    return script


@pytest.mark.parametrize(
    "line,slow",
    [
        (b"raise\n", 0.0),
        (b"pull\n", 0.0),
        (b"flood\n", 1.0),
        (b"abort2\n", 0.0),
        (b"loseabort\n", 0.0),
        (b"lostraise\n", 0.0),
    ],
)
@pytest_twisted.ensureDeferred
async def test_as_two_layers(ports: Any, folder: Path, line: bytes, slow: float) -> None:  # noqa: F811
    theirs, ours = await both(ports, folder, _ask(line, slow), factory=AttackerFactory)
    print(theirs)
    print(ours)
    if line == b"flood\n":
        # the producer's events: the pauses and resumes depend on timing
        assert ours[0] == theirs[0]
        assert "paused" in ours[1][0] and "paused" in theirs[1][0]
        assert ours[1][0][-1] == theirs[1][0][-1]
    else:
        assert ours == theirs


def _renegotiate(port: int, folder: Path) -> Any:
    """A TLS 1.2 client asks for a renegotiation between two echoes."""
    from OpenSSL import SSL

    context = SSL.Context(SSL.TLS_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    context.load_verify_locations(str(folder / "ca.pem"))
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    raw.settimeout(None)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
    connection = SSL.Connection(context, raw)
    connection.set_tlsext_host_name(b"localhost")
    connection.set_connect_state()
    events: list[Any] = []
    try:
        connection.do_handshake()
        connection.sendall(b"echo\nhi")
        events.append(connection.recv(100))
        events.append(connection.renegotiate())
        try:
            connection.do_handshake()
            events.append("renegotiated")
        except SSL.Error as e:
            events.append(("handshake", str(e)[:80]))
        try:
            connection.sendall(b"x")
            events.append(connection.recv(100))
        except (SSL.Error, OSError) as e:
            events.append((type(e).__name__, str(e)[:120]))
    finally:
        raw.close()
    return events


@pytest_twisted.ensureDeferred
async def test_renegotiation_as_two_layers(ports: Any, folder: Path) -> None:  # noqa: F811
    theirs, ours = await both(ports, folder, _renegotiate, factory=AttackerFactory)
    print(theirs)
    print(ours)
    assert ours == theirs


# -- txwssec's own WebSocket protocol over a tls: listener, both transports ---


def _client_hello(folder: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _stall(stage: str) -> Any:
    """Connect, get to C{stage}, then send nothing more: how the server ends it."""

    def script(port: int, folder: Path) -> Any:
        import time

        began = time.monotonic()
        raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        got = b""
        try:
            if stage in ("half hello", "hello"):
                hello = _client_hello(folder)
                raw.sendall(hello[:40] if stage == "half hello" else hello)
                while True:
                    try:
                        chunk = raw.recv(65536)
                    except ConnectionResetError:
                        return "reset", round(time.monotonic() - began)
                    if not chunk:
                        return "FIN", round(time.monotonic() - began)
                    got += chunk
            if stage == "nothing":
                try:
                    chunk = raw.recv(65536)
                except ConnectionResetError:
                    return "reset", round(time.monotonic() - began)
                return repr(chunk), round(time.monotonic() - began)
            client = ssl.create_default_context(cafile=str(folder / "ca.pem"))
            tls = client.wrap_socket(raw, server_hostname="localhost")
            if stage == "half request":
                tls.sendall(b"GET /echo HTTP/1.1\r\n")
            while True:
                try:
                    chunk = tls.recv(65536)
                except ssl.SSLEOFError:
                    return got, "EOF without close_notify", round(time.monotonic() - began)
                except ConnectionResetError:
                    return got, "reset", round(time.monotonic() - began)
                if not chunk:
                    return got, "close_notify", round(time.monotonic() - began)
                got += chunk
        finally:
            raw.close()

    return script


@pytest.mark.parametrize("stage", ["nothing", "half hello", "hello", "tls", "half request"])
@pytest_twisted.ensureDeferred
async def test_handshake_timeout_as_two_layers(
    folder: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    from twisted.internet import reactor as global_reactor

    from txwssec import (
        AnonymousAuthenticator,
        RoutePolicy,
        SecureServerFactory,
        ServerPolicy,
        _tlsport,
    )
    from txwssec.apps.echo import EchoProtocol

    results = []
    for direct in (False, True):
        monkeypatch.setattr(_tlsport, "DIRECT", direct)
        factory = SecureServerFactory(
            ServerPolicy.single(
                RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=EchoProtocol),
                handshake_timeout=1,
            )
        )
        endpoint = _tlsport.TLSPortEndpoint(
            global_reactor, 0, test_tls_wire.context(folder), interface="127.0.0.1"
        )
        port = await endpoint.listen(factory)
        try:
            results.append(
                await aio(asyncio.to_thread(_stall(stage), port.getHost().port, folder))
            )
        finally:
            await port.stopListening()
    print(results)
    # the same ending; the time it took within a second (a loaded machine)
    assert results[0][:-1] == results[1][:-1]
    assert abs(results[0][-1] - results[1][-1]) <= 1


def _half_closed_client(notify: bool, lines: tuple[bytes, ...]) -> Any:
    """Send C{lines}, then a FIN (after a close_notify if C{notify}); read all."""

    def script(port: int, folder: Path) -> Any:
        client = ssl.create_default_context(cafile=str(folder / "ca.pem"))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client.wrap_bio(incoming, outgoing, server_hostname="localhost")
        raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        with raw:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    raw.sendall(outgoing.read())
                    incoming.write(raw.recv(65536))
            raw.sendall(outgoing.read())
            for line in lines:
                tls.write(line)
            if notify:
                try:
                    tls.unwrap()
                except ssl.SSLWantReadError:
                    pass
            raw.sendall(outgoing.read())
            raw.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                try:
                    chunk = raw.recv(65536)
                except ConnectionResetError:
                    ending = "reset"
                    break
                if not chunk:
                    ending = "FIN"
                    break
                incoming.write(chunk)
            try:
                while True:
                    chunk = tls.read(65536)
                    if not chunk:
                        ending += " (EOF)"
                        break
                    got += chunk
            except ssl.SSLZeroReturnError:
                ending += " after close_notify"
            except (ssl.SSLWantReadError, ssl.SSLError) as e:
                ending += f" ({type(e).__name__})"
            return got, ending

    return script


@pytest.mark.parametrize("notify", [True, False], ids=["close_notify", "no close_notify"])
@pytest.mark.parametrize(
    "lines",
    [(b"echo\nhi",), (b"three\n",), (b"close\n",), (b"echo\nhi", b"three\n")],
    ids=["echo", "three", "close", "two"],
)
@pytest_twisted.ensureDeferred
async def test_client_half_close_as_two_layers(
    ports: Any,  # noqa: F811
    folder: Path,
    notify: bool,
    lines: tuple[bytes, ...],
) -> None:
    script = _half_closed_client(notify, lines)
    theirs, ours = await both(ports, folder, script, factory=AttackerFactory)
    print(theirs)
    print(ours)
    assert ours == theirs
