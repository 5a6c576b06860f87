"""
TLS session resumption on txwssec's listeners: on by default (session
tickets), off with C{[tls] session_tickets = false} (C{sessionTickets=no}
on a C{wss:} endpoint), still on after a certificate reload, and never a
way around the client certificate check of mutual TLS.

The client is Python's C{ssl} module with C{session=} reuse, in a thread
(asyncio has no way to offer a session); every connection is real TLS on
127.0.0.1 and completes a WebSocket upgrade.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import aio, upgrade_request
from cryptography import x509
from twisted.internet.endpoints import serverFromString

from txwssec import Accept, HandshakeRequest, Principal, RoutePolicy, SecureServerFactory
from txwssec.apps.echo import EchoProtocol
from txwssec.config import load
from txwssec.devcert import Issued, issue, make_ca
from txwssec.errors import ConfigError
from txwssec.tls import ReloadingContextFactory, TLSSettings, reload_certificates

TIMEOUT = 10.0


@dataclass
class Files:
    """A server CA, a server certificate for localhost, and a client CA."""

    folder: Path
    server_ca: Issued
    client_ca: Issued

    @classmethod
    def create(cls, folder: Path) -> Files:
        files = cls(folder, make_ca("resumption server CA"), make_ca("resumption client CA"))
        files.write(issue(files.server_ca, "localhost", ip_addresses=("127.0.0.1",)), "server")
        (folder / "server-ca.pem").write_bytes(files.server_ca.cert_pem())
        (folder / "client-ca.pem").write_bytes(files.client_ca.cert_pem())
        files.write(issue(files.client_ca, "alice", client=True), "alice")
        return files

    def write(self, issued: Issued, stem: str) -> None:
        (self.folder / f"{stem}.pem").write_bytes(issued.cert_pem())
        (self.folder / f"{stem}.key").write_bytes(issued.key_pem())

    def path(self, name: str) -> Path:
        return self.folder / name


class ReportingAuthenticator:
    """Accepts everyone; keeps the client certificate of every handshake."""

    name = "report"
    challenge = ""

    def __init__(self) -> None:
        self.certificates: list[x509.Certificate | None] = []

    def authenticate(self, request: HandshakeRequest) -> Accept:
        self.certificates.append(request.peer_certificate)
        return Accept(Principal("anyone", self.name))


Listen = Callable[[str, SecureServerFactory], Awaitable[int]]


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files.create(tmp_path)


@pytest.fixture
def listen() -> Iterator[Listen]:
    """Listen on an endpoint string (port 0); the port. Closed after the test."""
    from twisted.internet import reactor

    ports: list[Any] = []

    async def start(description: str, factory: SecureServerFactory) -> int:
        port = await serverFromString(reactor, description).listen(factory)
        ports.append(port)
        return int(port.getHost().port)

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


def wss(files: Files, *extra: str) -> str:
    cert, key = files.path("server.pem"), files.path("server.key")
    text = f"wss:0:interface=127.0.0.1:cert={cert}:key={key}"
    return ":".join([text, *extra])


def echo_factory(authenticator: ReportingAuthenticator) -> SecureServerFactory:
    return SecureServerFactory(RoutePolicy("/echo", [authenticator], protocol=EchoProtocol))


def client_context(
    files: Files, *, cert: str | None = None, tls12: bool = False
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(files.path("server-ca.pem")))
    if cert is not None:
        context.load_cert_chain(files.path(f"{cert}.pem"), files.path(f"{cert}.key"))
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclass
class Connected:
    """What one connection saw: resumed or not, and the session to offer next."""

    reused: bool
    session: ssl.SSLSession | None


def upgrade(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None) -> Connected:
    """
    In a thread: TLS handshake offering C{session}, one WebSocket upgrade
    (101 expected), then the session to offer next time. Reading the
    response also reads TLS 1.3's tickets, which come after the handshake.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(upgrade_request("/echo"))
            response = b""
            while b"\r\n\r\n" not in response:
                chunk = tls.recv(4096)
                assert chunk, response
                response += chunk
            assert response.startswith(b"HTTP/1.1 101 "), response
            return Connected(tls.session_reused, tls.session)


async def connections(
    port: int, context: ssl.SSLContext, count: int, session: ssl.SSLSession | None = None
) -> tuple[list[bool], ssl.SSLSession | None]:
    """C{count} connections in a row, each offering the last one's session."""
    reused = []
    for _ in range(count):
        connected = await asyncio.to_thread(upgrade, port, context, session)
        reused.append(connected.reused)
        session = connected.session
    return reused, session


@pytest.mark.parametrize("tls12", [False, True], ids=["TLS 1.3", "TLS 1.2"])
@pytest_twisted.ensureDeferred
async def test_resumed_by_default(files: Files, listen: Listen, tls12: bool) -> None:
    """The second and later connections of a client resume its session."""
    authenticator = ReportingAuthenticator()
    port = await listen(wss(files), echo_factory(authenticator))
    reused, _ = await aio(connections(port, client_context(files, tls12=tls12), 3))
    assert reused == [False, True, True]
    assert authenticator.certificates == [None, None, None]


@pytest.mark.parametrize("tls12", [False, True], ids=["TLS 1.3", "TLS 1.2"])
@pytest_twisted.ensureDeferred
async def test_no_resumption_when_off(files: Files, listen: Listen, tls12: bool) -> None:
    """sessionTickets=no: every handshake is a full one."""
    port = await listen(wss(files, "sessionTickets=no"), echo_factory(ReportingAuthenticator()))
    reused, _ = await aio(connections(port, client_context(files, tls12=tls12), 3))
    assert reused == [False, False, False]


def test_endpoint_session_tickets_argument(files: Files) -> None:
    from twisted.internet import reactor

    with pytest.raises(ValueError, match="sessionTickets must be yes or no"):
        serverFromString(reactor, wss(files, "sessionTickets=maybe"))


@pytest.fixture
def own_reloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """reload_certificates() reaches only this test's context factories."""
    monkeypatch.setattr(ReloadingContextFactory, "_instances", weakref.WeakSet())


@pytest_twisted.ensureDeferred
async def test_resumption_after_reload(files: Files, listen: Listen, own_reloads: None) -> None:
    """
    A reload makes a new context, so new ticket keys: a session from before
    resumes nothing (one full handshake), and the ones after resume again.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import SSL4ServerEndpoint

    tls = ReloadingContextFactory(TLSSettings(files.path("server.pem"), files.path("server.key")))
    port = await SSL4ServerEndpoint(reactor, 0, tls, interface="127.0.0.1").listen(
        echo_factory(ReportingAuthenticator())
    )
    try:
        number = port.getHost().port
        context = client_context(files)
        reused, session = await aio(connections(number, context, 2))
        assert reused == [False, True]
        assert reload_certificates() == (1, 0)
        reused, _ = await aio(connections(number, context, 3, session))
        assert reused == [False, True, True]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_mutual_tls_resumption_keeps_identity(files: Files, listen: Listen) -> None:
    """
    With client_cert = "required", a resumed session carries the client
    certificate verified when the session was made: the application sees
    the same identity on every connection.
    """
    authenticator = ReportingAuthenticator()
    description = wss(files, f"clientCA={files.path('client-ca.pem')}", "clientCert=required")
    port = await listen(description, echo_factory(authenticator))
    reused, _ = await aio(connections(port, client_context(files, cert="alice"), 3))
    assert reused == [False, True, True]
    names = [
        c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value if c else None
        for c in authenticator.certificates
    ]
    assert names == ["alice", "alice", "alice"]


@pytest_twisted.ensureDeferred
async def test_resumption_cannot_skip_client_certificate(files: Files, listen: Listen) -> None:
    """
    A session made on a listener that asks no client certificate does not
    resume on one that requires it (each listener has its own ticket keys
    and session ID context): the client without a certificate is refused.
    """
    open_port = await listen(wss(files), echo_factory(ReportingAuthenticator()))
    authenticator = ReportingAuthenticator()
    description = wss(files, f"clientCA={files.path('client-ca.pem')}", "clientCert=required")
    strict_port = await listen(description, echo_factory(authenticator))
    context = client_context(files)
    reused, session = await aio(connections(open_port, context, 2))
    assert reused == [False, True]
    with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
        await aio(connections(strict_port, context, 1, session))
    assert authenticator.certificates == []


@pytest_twisted.ensureDeferred
async def test_reload_with_new_client_ca_does_not_resume(
    files: Files, listen: Listen, own_reloads: None
) -> None:
    """
    A configuration reload that changes the client CAs: a session verified
    against the old CA is not resumed, and the certificate the new CA does
    not trust is refused.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import SSL4ServerEndpoint

    settings = TLSSettings(
        files.path("server.pem"),
        files.path("server.key"),
        client_ca=files.path("client-ca.pem"),
        client_cert="required",
    )
    tls = ReloadingContextFactory(settings)
    authenticator = ReportingAuthenticator()
    port = await SSL4ServerEndpoint(reactor, 0, tls, interface="127.0.0.1").listen(
        echo_factory(authenticator)
    )
    try:
        number = port.getHost().port
        context = client_context(files, cert="alice")
        reused, session = await aio(connections(number, context, 2))
        assert reused == [False, True]
        other = make_ca("another client CA")
        files.path("other-ca.pem").write_bytes(other.cert_pem())
        tls.replace(
            ReloadingContextFactory(
                TLSSettings(
                    files.path("server.pem"),
                    files.path("server.key"),
                    client_ca=files.path("other-ca.pem"),
                    client_cert="required",
                )
            )
        )
        with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
            await aio(connections(number, context, 1, session))
        assert len(authenticator.certificates) == 2
    finally:
        await port.stopListening()


# -- configuration -------------------------------------------------------------------


def tls_config(files: Files, extra: str = "") -> Path:
    config = files.path("wssec.toml")
    config.write_text(
        '[server]\nlisten = ["tls:0:interface=127.0.0.1"]\n\n'
        f'[tls]\ncert = "server.pem"\nkey = "server.key"\n{extra}\n'
        '[auth.anonymous]\n\n[[route]]\npath = "/echo"\napp = "echo"\nauth = ["anonymous"]\n'
    )
    return config


def test_config_default_is_on(files: Files) -> None:
    tls = load(tls_config(files)).tls
    assert tls is not None and tls.settings.session_tickets is True


def test_config_off(files: Files) -> None:
    tls = load(tls_config(files, "session_tickets = false")).tls
    assert tls is not None and tls.settings.session_tickets is False


def test_config_wrong_type(files: Files) -> None:
    with pytest.raises(ConfigError, match=r"tls\.session_tickets"):
        load(tls_config(files, 'session_tickets = "no"'))
