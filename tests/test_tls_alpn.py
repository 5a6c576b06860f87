"""
ALPN on every TLS listener and client of txwssec.

Every browser offers ALPN (C{h2, http/1.1}); with OpenSSL 4, Twisted's
own ALPN selection answers such a ClientHello with an C{internal_error}
alert when no protocol is configured. A txwssec listener selects
C{http/1.1} when it is offered and otherwise goes on without ALPN; a
txwssec client (and the gateway's upstream leg) offers C{http/1.1}.

Each case completes the TLS handshake with a client offering chosen
protocols, checks what was negotiated, and then opens a real WebSocket
over it and echoes.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import websockets
from conftest import aio
from cryptography import x509
from processes import Process, free_port, quickstart, twistd
from tlskit import (
    KEY,
    Collector,
    Listeners,
    Pem,
    ReportingUpstreamFactory,
    client_context,
    escape,
    gateway,
    reactor,
    within,
    write_pem,
)

from txwssec import Accept, HandshakeRequest, Principal, RoutePolicy, SecureServerFactory
from txwssec.apps.echo import EchoProtocol
from txwssec.client import ClientTLS, SecureClientFactory
from txwssec.config import load
from txwssec.devcert import Issued, issue, make_ca
from txwssec.tls import reload_certificates

TIMEOUT = 10.0

#: What a client offers -> what the listener must select (None: no ALPN).
OFFERS: dict[str, tuple[list[str], str | None]] = {
    "http/1.1": (["http/1.1"], "http/1.1"),
    "h2": (["h2"], None),
    "h2,http/1.1": (["h2", "http/1.1"], "http/1.1"),
}


@dataclass
class PKI:
    folder: Path
    ca: Issued
    ca_file: Path
    server: Pem  # CN=localhost, DNS localhost, IP 127.0.0.1
    client: Pem  # a client certificate, CN=alpn-client

    def new_server_certificate(self) -> x509.Certificate:
        """Issue a new server certificate over the old files."""
        issued = issue(self.ca, "localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1",))
        write_pem(self.folder, "server", issued)
        return issued.certificate


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    ca = make_ca("alpn tests CA")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem())
    server = issue(ca, "localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1",))
    return PKI(
        tmp_path,
        ca,
        ca_file,
        write_pem(tmp_path, "server", server),
        write_pem(tmp_path, "client", issue(ca, "alpn-client", client=True)),
    )


@pytest.fixture
def listeners() -> Iterator[Listeners]:
    started = Listeners()
    yield started
    pytest_twisted.blockon(started.stop())


class Recording:
    """Accepts everyone; keeps the client certificate of each handshake."""

    name = "recording"
    challenge = ""

    def __init__(self) -> None:
        self.certificates: list[x509.Certificate | None] = []

    def authenticate(self, request: HandshakeRequest) -> Accept:
        self.certificates.append(request.peer_certificate)
        return Accept(Principal("anyone", self.name))


def echo_server(recording: Recording) -> SecureServerFactory:
    return SecureServerFactory(RoutePolicy("/echo", [recording], protocol=EchoProtocol))


async def alpn_echo(
    port: int, context: ssl.SSLContext, headers: dict[str, str] | None = None
) -> tuple[str | None, int]:
    """
    Open C{wss://127.0.0.1:PORT/echo} with C{context}, echo a message; the
    negotiated ALPN protocol and the serial number of the server's certificate.
    """
    async with websockets.connect(
        f"wss://127.0.0.1:{port}/echo",
        ssl=context,
        additional_headers=headers,
        open_timeout=TIMEOUT,
        ping_interval=None,
    ) as ws:
        tls = ws.transport.get_extra_info("ssl_object")
        await ws.send("over tls")
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "over tls"
        der = tls.getpeercert(binary_form=True)
        return tls.selected_alpn_protocol(), x509.load_der_x509_certificate(der).serial_number


# -- listeners -------------------------------------------------------------------------

CONFIG = """
[server]
listen = ["tls:0:interface=127.0.0.1"]

[tls]
cert = "server.pem"
key = "server.key"
{mtls}

[[route]]
path = "/echo"
app = "echo"
auth = ["anonymous"]
"""
MTLS = 'client_ca = "ca.pem"\nclient_cert = "required"'


async def start_listener(kind: str, pki: PKI, listeners: Listeners) -> tuple[int, Recording]:
    """
    Start the listener C{kind}: the C{wss:} endpoint (with mutual TLS), or
    a C{tls:} listener from a configuration file (with mutual TLS, or after
    the certificate reload that SIGHUP triggers).
    """
    recording = Recording()
    if kind == "wss":
        return await listeners.wss(echo_server(recording), pki.server), recording
    if kind == "wss-mtls":
        mtls = (f"clientCA={escape(pki.ca_file)}", "clientCert=required")
        return await listeners.wss(echo_server(recording), pki.server, *mtls), recording
    path = pki.folder / "wssec.toml"
    path.write_text(CONFIG.format(mtls=MTLS if kind == "tls-mtls" else ""))
    config = load(path)
    [endpoint] = config.endpoints(reactor())
    port = await listeners.listen(endpoint, SecureServerFactory(config.policy))
    return port, recording


@pytest.mark.parametrize("offer", OFFERS)
@pytest.mark.parametrize("kind", ["wss", "wss-mtls", "tls", "tls-mtls"])
@pytest_twisted.ensureDeferred
async def test_listener_alpn(pki: PKI, listeners: Listeners, kind: str, offer: str) -> None:
    """
    Every listener completes the handshake whatever the client offers:
    C{http/1.1} is selected when offered, nothing for C{h2} alone; the
    WebSocket then opens and echoes.
    """
    port, recording = await start_listener(kind, pki, listeners)
    protocols, selected = OFFERS[offer]
    mtls = kind.endswith("mtls")
    context = client_context(pki.ca_file, protocols, pki.client if mtls else None)
    negotiated, _ = await aio(alpn_echo(port, context))
    assert negotiated == selected
    if kind == "wss-mtls":
        [certificate] = recording.certificates
        assert certificate is not None
        assert certificate.subject.rfc4514_string() == "CN=alpn-client,O=txwssec development"


@pytest.mark.parametrize("offer", OFFERS)
@pytest_twisted.ensureDeferred
async def test_reloaded_listener_alpn(pki: PKI, listeners: Listeners, offer: str) -> None:
    """After a certificate reload (what SIGHUP does), the new context selects the same way."""
    port, _ = await start_listener("tls", pki, listeners)
    new = pki.new_server_certificate()
    reloaded, _failed = reload_certificates()
    assert reloaded >= 1
    protocols, selected = OFFERS[offer]
    negotiated, serial = await aio(alpn_echo(port, client_context(pki.ca_file, protocols)))
    assert (negotiated, serial) == (selected, new.serial_number)


@pytest_twisted.ensureDeferred
async def test_listener_without_alpn_offer(pki: PKI, listeners: Listeners) -> None:
    """A client that offers no ALPN (Python's default) still gets in, with none."""
    port, _ = await start_listener("tls", pki, listeners)
    negotiated, _ = await aio(alpn_echo(port, client_context(pki.ca_file)))
    assert negotiated is None


# -- twistd wssec ------------------------------------------------------------------------


@dataclass
class Quickstart:
    folder: Path
    tls_port: int


@pytest.fixture(scope="module")
def quickstart_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Quickstart]:
    """C{twistd -n wssec} serving the quickstart example."""
    folder = tmp_path_factory.mktemp("quickstart")
    tls_port = free_port()
    running: Process = twistd(quickstart(folder, free_port(), tls_port), folder)
    try:
        running.wait_for(f"wssec listening on tls:{tls_port}:")
        yield Quickstart(folder, tls_port)
    finally:
        try:
            running.stop()
        finally:
            running.kill()
        assert "Traceback" not in running.output()


@pytest.mark.parametrize("offer", OFFERS)
@pytest_twisted.ensureDeferred
async def test_twistd_alpn(quickstart_server: Quickstart, offer: str) -> None:
    """The real C{twistd wssec} on the quickstart example, as a browser reaches it."""
    protocols, selected = OFFERS[offer]
    context = client_context(quickstart_server.folder / "dev-certs" / "ca.pem", protocols)
    negotiated, _ = await aio(
        alpn_echo(quickstart_server.tls_port, context, headers={"apikey": "john-key"})
    )
    assert negotiated == selected


# -- clients: SecureClientFactory and the gateway's upstream leg -------------------------


@dataclass
class Upstream:
    port: int
    factory: ReportingUpstreamFactory


UPSTREAMS = ["txwssec", "twisted-h2-first"]


@pytest.fixture
def upstream_of(pki: PKI, listeners: Listeners) -> Any:
    """
    Start an upstream that does ALPN selection: txwssec's C{wss:}
    endpoint, or Twisted's own options preferring C{h2} over C{http/1.1}.
    """

    async def start(kind: str) -> Upstream:
        factory = ReportingUpstreamFactory()
        if kind == "txwssec":
            port = await listeners.wss(factory, pki.server)
        else:
            server = issue(pki.ca, "localhost", ip_addresses=("127.0.0.1",))
            port = await listeners.twisted_tls(factory, server, [b"h2", b"http/1.1"])
        return Upstream(port, factory)

    return start


@pytest.mark.parametrize("insecure", [False, True], ids=["verified", "insecure"])
@pytest.mark.parametrize("kind", UPSTREAMS)
@pytest_twisted.ensureDeferred
async def test_secure_client_offers_http11(
    pki: PKI, upstream_of: Any, kind: str, insecure: bool
) -> None:
    """SecureClientFactory offers C{http/1.1}; the server selects it; the WebSocket works."""
    upstream = await upstream_of(kind)
    tls = ClientTLS(insecure=True) if insecure else ClientTLS(ca_file=pki.ca_file)
    factory = SecureClientFactory(f"wss://127.0.0.1:{upstream.port}/", tls=tls)
    factory.protocol = Collector
    protocol = await within(factory.connect())
    await within(protocol.opened)
    assert protocol.transport.negotiatedProtocol == b"http/1.1"
    assert await within(protocol.messages.get()) == b"alpn:http/1.1"
    protocol.sendMessage(b"echo me")
    assert await within(protocol.messages.get()) == b"echo me"
    protocol.sendClose(1000)
    assert await within(protocol.closed) == (True, 1000, None)


@pytest.mark.parametrize("kind", UPSTREAMS)
@pytest_twisted.ensureDeferred
async def test_gateway_upstream_offers_http11(
    pki: PKI, upstream_of: Any, serve: Any, kind: str
) -> None:
    """The gateway's upstream leg offers C{http/1.1} too, and relays over it."""
    upstream = await upstream_of(kind)
    port = serve(gateway(f"wss://127.0.0.1:{upstream.port}/", pki.ca_file))

    async def session() -> list[str | bytes]:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/echo",
            additional_headers={"apikey": KEY},
            open_timeout=TIMEOUT,
            ping_interval=None,
        ) as ws:
            greeting = await asyncio.wait_for(ws.recv(), TIMEOUT)
            await ws.send("relayed")
            return [greeting, await asyncio.wait_for(ws.recv(), TIMEOUT)]

    assert await aio(session()) == ["alpn:http/1.1", "relayed"]
    assert upstream.factory.identity_headers() == ["john"]
