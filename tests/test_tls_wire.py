"""
txwssec's server TLS transport (txwssec/_tlswire.py): every txwssec TLS
listener uses it; a client sees exactly what Twisted's own memory-BIO TLS
transport gives it (the same bytes, the same ending: close_notify, or none
after an abort), for writes inside and outside a read, large writes,
producers, ALPN and client certificates; and it sends what one read
produces in one go, straight to the socket, without asking OpenSSL for
bytes it does not have.

The client is Python's C{ssl} in a thread, on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import aio
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer, providedBy

from txwssec import _tlswire
from txwssec._tlswire import ServerTLSFactory
from txwssec.devcert import issue, make_ca
from txwssec.listen import TLSServerEndpoint, server_endpoint
from txwssec.reuseport import shared
from txwssec.tls import ReloadingContextFactory, TLSSettings

TIMEOUT = 10.0
BIG = bytes(range(256)) * 800  # 200 KiB: several records and socket writes


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    ca = make_ca("wire CA")
    server = issue(ca, "localhost", ip_addresses=("127.0.0.1",))
    client_ca = make_ca("wire client CA")
    alice = issue(client_ca, "alice", client=True)
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    (tmp_path / "server.pem").write_bytes(server.cert_pem())
    (tmp_path / "server.key").write_bytes(server.key_pem())
    (tmp_path / "alice.pem").write_bytes(alice.cert_pem())
    (tmp_path / "alice.key").write_bytes(alice.key_pem())
    (tmp_path / "client-ca.pem").write_bytes(client_ca.cert_pem())
    return tmp_path


def context(folder: Path, **options: Any) -> ReloadingContextFactory:
    return ReloadingContextFactory(
        TLSSettings(folder / "server.pem", folder / "server.key", **options)
    )


@implementer(IPushProducer)
class Chunks:
    """A streaming producer writing four chunks, then closing."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.left = 4

    def resumeProducing(self) -> None:
        while self.left:
            self.left -= 1
            self.transport.write(b"chunk%d;" % self.left)
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.left = 0


class Scripted(Protocol):
    """Does what the client's first line asks."""

    reads: list[dict[str, int]]

    def connectionMade(self) -> None:
        self.buffer = b""
        self.lines = 0
        self.factory.protocols.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        from twisted.internet import reactor

        self.buffer += data
        if b"\n" not in self.buffer:
            return
        command, _, rest = self.buffer.partition(b"\n")
        self.buffer = rest
        self.lines += 1
        t: Any = self.transport
        if command == b"echo":
            t.write(b"echo:" + rest)
            self.buffer = b""
        elif command == b"three":
            t.write(b"a")
            t.write(b"b")
            t.writeSequence([b"c", b"d"])
        elif command == b"big":
            t.write(b"start;")
            t.write(BIG)
            t.write(b";end")
            t.loseConnection()
        elif command == b"close":
            t.write(b"bye")
            t.loseConnection()
        elif command == b"abort":
            t.write(b"lost")
            t.abortConnection()
        elif command == b"later":
            reactor.callLater(0.02, t.write, b"one;")
            reactor.callLater(0.02, t.write, b"two;")
            reactor.callLater(0.05, t.loseConnection)
        elif command == b"abortlater":
            # Twisted's transport sends "sent;" a reactor turn or two later:
            # the abort comes long after, even on a loaded machine.
            t.write(b"sent;")
            reactor.callLater(0.3, t.write, b"dropped")
            reactor.callLater(0.3, t.abortConnection)
        elif command == b"produce":
            producer = Chunks(t)
            t.registerProducer(producer, True)
            producer.resumeProducing()
        elif command == b"alpn":
            t.write(repr(t.negotiatedProtocol).encode())
            t.loseConnection()
        elif command == b"peer":
            certificate = t.getPeerCertificate()
            name = (
                certificate.to_cryptography().subject.rfc4514_string()
                if certificate is not None
                else None
            )
            t.write(repr(name).encode())
            t.loseConnection()
        elif command == b"quiet":
            pass


class ScriptedFactory(Factory):
    protocol = Scripted

    def __init__(self) -> None:
        self.protocols: list[Scripted] = []


def exchange(
    port: int,
    folder: Path,
    lines: list[bytes],
    *,
    alpn: list[str] | None = None,
    cert: str | None = None,
    close_after: bool = False,
) -> tuple[bytes, str]:
    """
    In a thread: TLS, send C{lines} (one write each), read until the server
    ends the connection. Returns what was read and how it ended.
    """
    client = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    if alpn is not None:
        client.set_alpn_protocols(alpn)
    if cert is not None:
        client.load_cert_chain(folder / f"{cert}.pem", folder / f"{cert}.key")
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with client.wrap_socket(raw, server_hostname="localhost") as tls:
            for line in lines:
                tls.sendall(line)
            if close_after:
                tls.settimeout(0.5)
            while True:
                try:
                    chunk = tls.recv(65536)
                except ssl.SSLEOFError:
                    return received, "EOF without close_notify"
                except ConnectionResetError:
                    return received, "reset"
                except TimeoutError:
                    tls.unwrap()
                    return received, "client closed"
                if not chunk:
                    return received, "close_notify"
                received += chunk


@pytest.fixture
def listen() -> Iterator[Any]:
    from twisted.internet import reactor

    ports: list[Any] = []

    async def start(factory: Any) -> int:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        ports.append(port)
        return int(port.getHost().port)

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())
    for port in ports:
        for protocol in list(getattr(port.factory, "protocols", {})):
            protocol.transport.abortConnection()


SCRIPTS = [
    [b"echo\nhello"],
    [b"three\n"],
    [b"big\n"],
    [b"close\n"],
    [b"abort\n"],
    [b"later\n"],
    [b"abortlater\n"],
    [b"produce\n"],
    [b"quiet\n", b"echo\n", b"x"],
    [b"echo\n" + b"y" * 40000],
]


@pytest.mark.parametrize("lines", SCRIPTS, ids=[s[0].split(b"\n")[0].decode() for s in SCRIPTS])
@pytest_twisted.ensureDeferred
async def test_same_as_twisted(folder: Path, listen: Any, lines: list[bytes]) -> None:
    """The client reads the same bytes and the same ending as with Twisted's transport."""
    tls = context(folder)
    twisted_port = await listen(TLSMemoryBIOFactory(tls, False, ScriptedFactory()))
    lean_port = await listen(ServerTLSFactory(tls, False, ScriptedFactory()))
    quiet = lines[0] in (b"echo\nhello", b"three\n", b"quiet\n", b"echo\n" + b"y" * 40000)
    theirs = await aio(asyncio.to_thread(exchange, twisted_port, folder, lines, close_after=quiet))
    ours = await aio(asyncio.to_thread(exchange, lean_port, folder, lines, close_after=quiet))
    assert ours == theirs
    if lines == [b"abort\n"]:
        assert ours[0] == b""  # what was written before the abort is dropped
    else:
        assert ours[0]
    if lines == [b"big\n"]:
        assert ours == (b"start;" + BIG + b";end", "close_notify")


@pytest.mark.parametrize("offered", [None, ["h2", "http/1.1"], ["h2"]])
@pytest_twisted.ensureDeferred
async def test_alpn_as_twisted(folder: Path, listen: Any, offered: list[str] | None) -> None:
    tls = context(folder)
    twisted_port = await listen(TLSMemoryBIOFactory(tls, False, ScriptedFactory()))
    lean_port = await listen(ServerTLSFactory(tls, False, ScriptedFactory()))
    theirs = await aio(
        asyncio.to_thread(exchange, twisted_port, folder, [b"alpn\n"], alpn=offered)
    )
    ours = await aio(asyncio.to_thread(exchange, lean_port, folder, [b"alpn\n"], alpn=offered))
    assert ours == theirs
    assert ours[0] == (b"b'http/1.1'" if offered == ["h2", "http/1.1"] else b"None")


@pytest_twisted.ensureDeferred
async def test_client_certificate_as_twisted(folder: Path, listen: Any) -> None:
    tls = context(folder, client_ca=folder / "client-ca.pem", client_cert="optional")
    twisted_port = await listen(TLSMemoryBIOFactory(tls, False, ScriptedFactory()))
    lean_port = await listen(ServerTLSFactory(tls, False, ScriptedFactory()))
    for cert, expected in (("alice", b"'CN=alice,O=txwssec development'"), (None, b"None")):
        theirs = await aio(
            asyncio.to_thread(exchange, twisted_port, folder, [b"peer\n"], cert=cert)
        )
        ours = await aio(asyncio.to_thread(exchange, lean_port, folder, [b"peer\n"], cert=cert))
        assert ours == theirs == (expected, "close_notify")


@pytest_twisted.ensureDeferred
async def test_interfaces_as_twisted(folder: Path, listen: Any) -> None:
    """The TLS protocol provides what Twisted's does, computed once per transport class."""
    tls = context(folder)
    theirs, ours = ScriptedFactory(), ScriptedFactory()
    twisted_port = await listen(TLSMemoryBIOFactory(tls, False, theirs))
    lean_port = await listen(ServerTLSFactory(tls, False, ours))
    calls = []
    original = _tlswire.directlyProvides

    def counting(*args: Any) -> None:
        calls.append(args)
        original(*args)

    _tlswire._provides.clear()
    _tlswire.directlyProvides = counting  # type: ignore[assignment]
    try:
        for _ in range(3):
            await aio(asyncio.to_thread(exchange, lean_port, folder, [b"close\n"]))
    finally:
        _tlswire.directlyProvides = original  # type: ignore[assignment]
    await aio(asyncio.to_thread(exchange, twisted_port, folder, [b"close\n"]))
    first = list(providedBy(theirs.protocols[0].transport))
    assert first
    for protocol in ours.protocols:
        assert list(providedBy(protocol.transport)) == first
    # the first connection computed the declaration; the others reused it
    assert calls and len(calls) == len(list(providedBy(ours.protocols[0].transport.transport)))


@pytest_twisted.ensureDeferred
async def test_every_listener_uses_it(folder: Path, tmp_path: Path) -> None:
    """tls:, wss:, TLS over another endpoint (tls:systemd:) and shared ports."""
    from twisted.internet import reactor

    tls = context(folder)
    cert, key = folder / "server.pem", folder / "server.key"
    endpoints = [
        server_endpoint(reactor, "tls:0:interface=127.0.0.1", tls),
        serverFromString(reactor, f"wss:0:interface=127.0.0.1:cert={cert}:key={key}"),
        TLSServerEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), tls),
        shared(server_endpoint(reactor, "tls:0:interface=127.0.0.1", tls), reactor),
    ]
    for endpoint in endpoints:
        port = await endpoint.listen(ScriptedFactory())
        try:
            assert type(port.factory) is ServerTLSFactory
            assert port._type == "TLS"
            number = port.getHost().port
            assert await aio(asyncio.to_thread(exchange, number, folder, [b"close\n"])) == (
                b"bye",
                "close_notify",
            )
        finally:
            await port.stopListening()


def close_first(port: int, folder: Path, lines: list[bytes]) -> tuple[bytes, bytes]:
    """
    In a thread: TLS, C{lines}, then the client's close_notify (unwrap, which
    waits for the server's); returns what TLS read before, and the raw bytes
    the server sent after its close_notify (none expected).
    """
    client = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        tls = client.wrap_socket(raw, server_hostname="localhost")
        for line in lines:
            tls.sendall(line)
        received = b""
        if lines[0].startswith(b"echo"):
            while len(received) < len(b"echo:x"):
                received += tls.recv(100)
        plain = tls.unwrap()
        after = b""
        while chunk := plain.recv(65536):
            after += chunk
        return received, after


@pytest.mark.parametrize("lines", [[b"quiet\n"], [b"echo\nx"]], ids=["quiet", "echo"])
@pytest_twisted.ensureDeferred
async def test_client_close_notify_answered_once(
    folder: Path, listen: Any, lines: list[bytes]
) -> None:
    """The client closes TLS first: one close_notify back, then the TCP close, as Twisted."""
    tls = context(folder)
    twisted_port = await listen(TLSMemoryBIOFactory(tls, False, ScriptedFactory()))
    lean_port = await listen(ServerTLSFactory(tls, False, ScriptedFactory()))
    theirs = await aio(asyncio.to_thread(close_first, twisted_port, folder, lines))
    ours = await aio(asyncio.to_thread(close_first, lean_port, folder, lines))
    assert ours == theirs
    assert ours[1] == b""
