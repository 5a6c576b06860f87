"""
The one-object server TLS transport (round 6, txwssec/_tlsport.py): a
Twisted TCP transport that is its own memory-BIO TLS layer, used by
C{tls:PORT} listeners for txwssec's WebSocket protocols. Every test here is
differential: the same client script against the two-layer transport it
replaces (a TCP transport carrying L{ServerTLSProtocol}, as C{listenTCP}
with L{ServerTLSFactory}) and against L{DirectTLSPort}, comparing what the
client reads and how its connection ends, and what the application sees
(its data, C{handshakeCompleted}, the reason of C{connectionLost}), for
normal and unhappy peers: the scripts of tests/test_tls_wire.py and
tests/test_tls_wire_direct.py (writes in and out of a read, large writes,
producers, aborts, ALPN, client certificates, the close_notify from
either side, truncated and malformed input) and those below (garbage
instead of a ClientHello, a client certificate refused, a truncated
record, an abort and a close mid-handshake).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import test_tls_wire
import test_tls_wire_direct
from autobahn.twisted.util import create_transport_details, transport_channel_id
from conftest import aio, upgrade_request
from test_tls_wire import BIG, ScriptedFactory, context, exchange
from test_tls_wire_attacks import Wire
from test_tls_wire_direct import Recorded, RecordedFactory
from twisted.internet import reactor as global_reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol, ISSLTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from wsframes import close_frame
from zope.interface import implementer, providedBy

from txwssec import (
    AnonymousAuthenticator,
    RoutePolicy,
    SecureServerFactory,
    ServerPolicy,
    _tlsport,
)
from txwssec._tlsport import DirectTLSPort, DirectTLSServer, TLSPortEndpoint
from txwssec._tlswire import ServerTLSFactory, ServerTLSProtocol
from txwssec.apps.echo import EchoProtocol

TIMEOUT = 10.0

folder = test_tls_wire.folder

Script = Callable[[int, Path], Any]


@pytest.fixture
def ports(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """
    C{ports(kind, factory, tls)}: a listener on 127.0.0.1 of the two-layer
    transport (C{"two"}) or the direct one (C{"direct"}, for every
    protocol); its port number.
    """
    monkeypatch.setattr(_tlsport, "DIRECT_PROTOCOLS", (object,))
    listening: list[Any] = []

    async def start(kind: str, factory: Any, tls: Any) -> int:
        if kind == "two":
            port = await TCP4ServerEndpoint(global_reactor, 0, interface="127.0.0.1").listen(
                ServerTLSFactory(tls, False, factory)
            )
        else:
            port = DirectTLSPort(0, factory, 50, "127.0.0.1", global_reactor, tls)
            port.startListening()
        listening.append((port, factory))
        return int(port.getHost().port)

    yield start
    for port, factory in listening:
        pytest_twisted.blockon(port.stopListening())
        for protocol in getattr(factory, "protocols", []):
            transport = protocol.transport
            if transport is not None and getattr(transport, "connected", False):
                transport.abortConnection()


async def let_go(factory: Any) -> None:
    """Until every connection of C{factory} is lost (what Recorded saw)."""
    async with asyncio.timeout(TIMEOUT):
        while any(
            not p.seen or not isinstance(p.seen[-1], tuple) or p.seen[-1][0] != "lost"
            for p in factory.protocols
        ):
            await asyncio.sleep(0.01)


async def both(
    ports: Any, folder: Path, script: Script, tls: Any = None, factory: Any = RecordedFactory
) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """
    C{script} against the two-layer transport, then the direct one: (what
    the client got, what the application saw) for each.
    """
    tls = tls or context(folder)
    results = []
    for kind in ("two", "direct"):
        application = factory()
        number = await ports(kind, application, tls)
        result = await aio(asyncio.to_thread(script, number, folder))
        try:
            await aio(let_go(application))
        except TimeoutError:
            seen = [p.seen for p in application.protocols]
            raise AssertionError(f"{kind}: {result} {seen}") from None
        results.append((result, [p.seen for p in application.protocols]))
        if kind == "direct":
            assert all(type(p.transport) is DirectTLSServer for p in application.protocols)
    return results[0], results[1]


# -- the scripts of tests/test_tls_wire.py (Scripted commands) ---------------


def _lines(lines: list[bytes], **options: Any) -> Script:
    def script(port: int, folder: Path) -> tuple[bytes, str]:
        return exchange(port, folder, lines, **options)

    return script


SCRIPTS = test_tls_wire.SCRIPTS
QUIET = (b"echo\nhello", b"three\n", b"quiet\n", b"echo\n" + b"y" * 40000)


@pytest.mark.parametrize(
    "lines",
    test_tls_wire.SCRIPTS,
    ids=[s[0].split(b"\n")[0].decode() for s in test_tls_wire.SCRIPTS],
)
@pytest_twisted.ensureDeferred
async def test_scripted_as_two_layers(ports: Any, folder: Path, lines: list[bytes]) -> None:
    """Writes in and out of reads, big writes, aborts, producers: the same."""
    script = _lines(lines, close_after=lines[0] in QUIET)
    theirs, ours = await both(ports, folder, script)
    assert ours == theirs
    if lines == [b"big\n"]:
        assert ours[0] == (b"start;" + BIG + b";end", "close_notify")
    if lines == [b"abort\n"]:
        assert ours[0][0] == b""


@pytest.mark.parametrize("offered", [None, ["h2", "http/1.1"], ["h2"]])
@pytest_twisted.ensureDeferred
async def test_alpn_as_two_layers(ports: Any, folder: Path, offered: list[str] | None) -> None:
    theirs, ours = await both(ports, folder, _lines([b"alpn\n"], alpn=offered))
    assert ours == theirs
    assert ours[0][0] == (b"b'http/1.1'" if offered == ["h2", "http/1.1"] else b"None")


@pytest.mark.parametrize("cert", ["alice", None])
@pytest_twisted.ensureDeferred
async def test_client_certificate_as_two_layers(
    ports: Any, folder: Path, cert: str | None
) -> None:
    tls = context(folder, client_ca=folder / "client-ca.pem", client_cert="optional")
    theirs, ours = await both(ports, folder, _lines([b"peer\n"], cert=cert), tls)
    assert ours == theirs
    assert ours[0][0] == (b"'CN=alice,O=txwssec development'" if cert else b"None")


# -- the raw scripts of tests/test_tls_wire_direct.py, and more ---------------


def _refused_without_certificate(port: int, folder: Path) -> str:
    """mTLS required, no client certificate: the alert the client reads."""
    client = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        try:
            with client.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"echo\nx")
                return f"read {tls.recv(100)!r}"
        except ssl.SSLError as error:
            return f"{type(error).__name__}: {error.reason}"
        except (ConnectionResetError, BrokenPipeError) as error:
            return type(error).__name__


def _http_instead_of_hello(port: int, folder: Path) -> tuple[bytes, str]:
    wire = Wire(port, folder)
    try:
        wire.raw.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        received = b""
        wire.raw.settimeout(2.0)
        while True:
            try:
                data = wire.raw.recv(65536)
            except ConnectionResetError:
                return received, "reset"
            if not data:
                return received, "TCP close"
            received += data
    finally:
        wire.close()


def _truncated_record(port: int, folder: Path) -> tuple[bytes, str]:
    wire = Wire(port, folder)
    try:
        wire.handshake()
        wire.raw.sendall(wire.records(b"echo\nhello")[:-7])
        wire.raw.shutdown(socket.SHUT_WR)
        return wire.ending()
    finally:
        wire.close()


def _truncated_then_close_notify(port: int, folder: Path) -> tuple[bytes, str]:
    wire = Wire(port, folder)
    try:
        wire.handshake()
        records = wire.records(b"echo\nhello")
        wire.raw.sendall(records[:-7])
        wire.raw.sendall(records[-7:] + wire.close_notify())
        return wire.ending()
    finally:
        wire.close()


def _two_echoes_one_send(port: int, folder: Path) -> tuple[bytes, str]:
    """Two commands' records in one send, then the client's close_notify."""
    wire = Wire(port, folder)
    try:
        wire.handshake()
        wire.raw.sendall(wire.records(b"three\n") + wire.records(b"close\n"))
        return wire.ending()
    finally:
        wire.close()


def _hello_then_wait(port: int, folder: Path) -> tuple[bytes, str]:
    """Half a ClientHello, then the client waits for the server's ending."""
    wire = Wire(port, folder)
    try:
        wire.raw.sendall(test_tls_wire_direct._hello(wire)[:60])
        return wire.ending()
    finally:
        wire.close()


RAW: dict[str, Script] = {
    **test_tls_wire_direct.SCRIPTS,
    "server's close_notify first, client answers": (
        test_tls_wire_direct._server_closes_client_notifies
    ),
    "HTTP instead of a ClientHello": _http_instead_of_hello,
    "truncated record, then FIN": _truncated_record,
    "record in two sends, then close_notify": _truncated_then_close_notify,
    "two commands in one send": _two_echoes_one_send,
}


@pytest.mark.parametrize("name", list(RAW))
@pytest_twisted.ensureDeferred
async def test_raw_scripts_as_two_layers(ports: Any, folder: Path, name: str) -> None:
    theirs, ours = await both(ports, folder, RAW[name])
    assert ours == theirs
    assert ours[1], "the application saw the connection"


@pytest_twisted.ensureDeferred
async def test_client_certificate_refused_as_two_layers(ports: Any, folder: Path) -> None:
    tls = context(folder, client_ca=folder / "client-ca.pem", client_cert="required")
    theirs, ours = await both(ports, folder, _refused_without_certificate, tls)
    assert ours == theirs
    assert "CERTIFICATE_REQUIRED" in ours[0]
    (seen,) = ours[1]
    assert seen[-1][:2] == ("lost", "Error")  # OpenSSL's error, as Twisted gives it


class Impatient(Recorded):
    """Ends the connection before the TLS handshake completes."""

    how = "loseConnection"

    def connectionMade(self) -> None:
        super().connectionMade()
        global_reactor.callLater(0.2, getattr(self.transport, self.how))


class ImpatientFactory(RecordedFactory):
    protocol = Impatient


class Aborting(Impatient):
    how = "abortConnection"


class AbortingFactory(RecordedFactory):
    protocol = Aborting


@pytest.mark.parametrize(
    "factory", [ImpatientFactory, AbortingFactory], ids=["loseConnection", "abortConnection"]
)
@pytest_twisted.ensureDeferred
async def test_ended_mid_handshake_as_two_layers(ports: Any, folder: Path, factory: Any) -> None:
    """A close before the handshake completes is Twisted's abort: a reset."""
    theirs, ours = await both(ports, folder, _hello_then_wait, factory=factory)
    assert ours == theirs
    assert ours[0][1] == "reset"


@implementer(IHalfCloseableProtocol)
class HalfClosing(Recorded):
    """On "half": a write, then the TCP half-close (loseWriteConnection)."""

    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"half\n"):
            self.seen.append(data)
            self.transport.write(b"before FIN")
            self.transport.loseWriteConnection()
            return
        super().dataReceived(data)

    def writeConnectionLost(self) -> None:
        self.seen.append("writeConnectionLost")

    def readConnectionLost(self) -> None:
        self.seen.append("readConnectionLost")
        self.transport.loseConnection()


class HalfClosingFactory(RecordedFactory):
    protocol = HalfClosing


def _half_closed(port: int, folder: Path) -> tuple[bytes, str]:
    wire = Wire(port, folder)
    try:
        wire.handshake()
        wire.raw.sendall(wire.records(b"half\n"))
        result = wire.ending()
        wire.raw.shutdown(socket.SHUT_WR)
        return result
    finally:
        wire.close()


@pytest_twisted.ensureDeferred
async def test_half_close_as_two_layers(ports: Any, folder: Path) -> None:
    """loseWriteConnection: the write, then a FIN without close_notify; the app not told."""
    theirs, ours = await both(ports, folder, _half_closed, factory=HalfClosingFactory)
    assert ours == theirs
    assert ours[0] == (b"before FIN", "TCP close")
    assert "writeConnectionLost" not in ours[1][0]


@pytest_twisted.ensureDeferred
async def test_transport_as_autobahn_sees_it(ports: Any, folder: Path) -> None:
    """
    Autobahn's TLS helpers read the direct transport as Twisted's TLS
    protocol (C{isinstance}): the same details; the interfaces provided
    include the two-layer transport's.
    """
    seen: dict[str, Any] = {}
    tls = context(folder, client_ca=folder / "client-ca.pem", client_cert="optional")
    for kind in ("two", "direct"):
        application = RecordedFactory()
        number = await ports(kind, application, tls)
        await aio(asyncio.to_thread(exchange, number, folder, [b"peer\n"], cert="alice"))
        await aio(let_go(application))
        transport = application.protocols[0].transport
        seen[kind] = transport
    direct = seen["direct"]
    assert type(direct) is DirectTLSServer
    assert isinstance(direct, TLSMemoryBIOProtocol)
    assert ISSLTransport.providedBy(direct)
    two = seen["two"]
    # what the two-layer transport provides more is its protocol side
    assert set(providedBy(two)) - set(providedBy(direct)) == {IProtocol}


class Opened(EchoProtocol):
    """Notes its transport and Autobahn's details of it at open."""

    opened: list[Any] = []

    def onOpen(self) -> None:
        made = create_transport_details(self.transport, True)
        self.opened.append(
            (
                self.transport,
                made.marshal(),
                self.transport_details.marshal(),
                transport_channel_id(self.transport, True, "tls-unique"),
            )
        )
        super().onOpen()


def _wss_open_close(port: int, folder: Path) -> bytes:
    client = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    client.load_cert_chain(folder / "alice.pem", folder / "alice.key")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with client.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(upgrade_request("/echo"))
            head = b""
            while b"\r\n\r\n" not in head:
                head += tls.recv(65536)
            tls.sendall(close_frame(1000))
            rest = head.partition(b"\r\n\r\n")[2]
            while len(rest) < 4:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                rest += chunk
            return head.split(b"\r\n", 1)[0] + b" | " + rest[:4]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "two layers"])
@pytest_twisted.ensureDeferred
async def test_tls_listener_serves_txwssec_directly(
    folder: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """
    A C{tls:} listener (L{TLSPortEndpoint}) gives txwssec's WebSocket
    connections the direct transport (the two-layer one without
    L{_tlsport.DIRECT}); Autobahn's
    details of it are those txwssec noted, with the channel binding of a
    completed handshake and the client's certificate.
    """
    monkeypatch.setattr(_tlsport, "DIRECT", direct)
    tls = context(folder, client_ca=folder / "client-ca.pem", client_cert="optional")
    Opened.opened = []
    factory = SecureServerFactory(
        ServerPolicy.single(RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=Opened))
    )
    endpoint = TLSPortEndpoint(global_reactor, 0, tls, interface="127.0.0.1")
    port = await endpoint.listen(factory)
    try:
        number = port.getHost().port
        answer = await aio(asyncio.to_thread(_wss_open_close, number, folder))
        assert answer == b"HTTP/1.1 101 Switching Protocols | \x88\x02\x03\xe8"
        ((transport, made, noted, channel),) = Opened.opened
        assert (type(transport) is DirectTLSServer) is direct
        if not direct:
            assert isinstance(transport, ServerTLSProtocol)
        assert made == noted
        assert noted["channel_type"] == "tls" and noted["is_secure"]
        assert noted["peer_cert"]["subject"]["cn"] == "alice"
        assert channel is not None and channel != b"\x00" * 32
        assert noted["channel_id"]["tls-unique"] == channel
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_other_protocols_keep_two_layers(folder: Path) -> None:
    """A protocol that is not txwssec's WebSocket protocol: Twisted's TLS protocol as before."""
    factory = ScriptedFactory()
    endpoint = TLSPortEndpoint(global_reactor, 0, context(folder), interface="127.0.0.1")
    port = await endpoint.listen(factory)
    try:
        assert type(port) is DirectTLSPort and type(port.factory) is ServerTLSFactory
        number = port.getHost().port
        result = await aio(asyncio.to_thread(exchange, number, folder, [b"close\n"]))
        assert result == (b"bye", "close_notify")
        (protocol,) = factory.protocols
        assert isinstance(protocol.transport, ServerTLSProtocol)
    finally:
        await port.stopListening()
