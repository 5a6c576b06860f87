"""
Key exchange groups: txwssec's listeners and clients use only
C{txwssec.tls.GROUPS} (X25519MLKEM768 when OpenSSL has it, X25519, P-256,
P-384). OpenSSL's defaults would also take the finite-field groups
(ffdhe2048...), X448 and P-521, in TLS 1.3 and in TLS 1.2's ECDHE.

The probing client is pyOpenSSL, run in a thread (its handshake blocks),
offering exactly the groups of the case.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
import wsframes
from conftest import upgrade_request
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from tlskit import (
    Collector,
    Listeners,
    Pem,
    ReportingUpstreamFactory,
    only_groups,
    within,
    write_pem,
)
from twisted.internet.threads import deferToThread

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory
from txwssec.apps.echo import EchoProtocol
from txwssec.client import ClientTLS, SecureClientFactory
from txwssec.devcert import Issued, issue, make_ca
from txwssec.tls import GROUPS

TIMEOUT = 10.0
TLS1_2, TLS1_3 = SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION
#: OpenSSL's names for the groups a connection reports (compared lowercased).
GROUP_NAMES = {"P-256": "secp256r1", "P-384": "secp384r1"}


def reported(group: str) -> str:
    """The name (lowercased) a connection reports for group C{group}."""
    return GROUP_NAMES.get(group, group).lower()


@dataclass
class PKI:
    ca: Issued
    ca_file: Path
    server: Issued
    server_pem: Pem
    #: For TLS 1.2, where OpenSSL uses an EC certificate (or EC issuer) only
    #: with a client that offers its curve: self-signed RSA, its own CA.
    rsa_server_pem: Pem

    def ca_for(self, version: int) -> Path:
        return self.ca_file if version == TLS1_3 else self.rsa_server_pem.cert


def rsa_server() -> tuple[bytes, bytes]:
    """A self-signed RSA certificate for 127.0.0.1 (PEM certificate, PEM key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa-server")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa-server")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    ca = make_ca("groups tests CA")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem())
    server = issue(ca, "localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1",))
    rsa_pem = Pem(tmp_path / "rsa.pem", tmp_path / "rsa.key")
    cert, key = rsa_server()
    rsa_pem.cert.write_bytes(cert)
    rsa_pem.key.write_bytes(key)
    return PKI(ca, ca_file, server, write_pem(tmp_path, "server", server), rsa_pem)


@pytest.fixture
def listeners() -> Iterator[Listeners]:
    started = Listeners()
    yield started
    pytest_twisted.blockon(started.stop())


def has_group(name: str) -> bool:
    """Whether the linked OpenSSL knows group C{name}."""
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        only_groups(context, name)
    except AssertionError:
        return False
    return True


HYBRID = pytest.mark.skipif(
    not has_group("X25519MLKEM768"), reason="the linked OpenSSL has no X25519MLKEM768"
)


def probe(port: int, ca_file: Path, groups: str, version: int) -> str:
    """
    A TLS handshake offering only C{groups} at exactly C{version}, then a
    WebSocket upgrade and one echoed message; the group the handshake
    used. Raises L{SSL.Error} when the handshake fails.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    context.load_verify_locations(str(ca_file))
    context.set_verify(SSL.VERIFY_PEER)
    only_groups(context, groups)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        # Blocking reads that give up (the probe runs in a thread).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(TIMEOUT), 0))
        connection = SSL.Connection(context, sock)
        connection.set_connect_state()
        connection.set_tlsext_host_name(b"localhost")
        connection.do_handshake()
        group = connection.get_group_name()
        assert group is not None
        group = group.lower()
        connection.sendall(upgrade_request("/echo"))
        response = b""
        while b"\r\n\r\n" not in response:
            response += connection.recv(4096)
        assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        connection.sendall(wsframes.frame(wsframes.TEXT, b"hello"))
        echoed = response.split(b"\r\n\r\n", 1)[1]
        while len(echoed) < 7:
            echoed += connection.recv(4096)
        assert echoed == b"\x81\x05hello"
        return group


async def echo_listener(pki: PKI, listeners: Listeners, version: int = TLS1_3) -> int:
    """An echo server on the wss: endpoint: ECDSA for TLS 1.3, RSA for TLS 1.2."""
    factory = SecureServerFactory(
        RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=EchoProtocol)
    )
    return await listeners.wss(
        factory, pki.server_pem if version == TLS1_3 else pki.rsa_server_pem
    )


# -- listeners -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "version", "used"),
    [
        pytest.param("X25519", TLS1_3, "X25519", id="X25519"),
        pytest.param("P-256", TLS1_3, "secp256r1", id="P-256"),
        pytest.param("P-384", TLS1_3, "secp384r1", id="P-384"),
        pytest.param("X25519MLKEM768", TLS1_3, "X25519MLKEM768", id="hybrid", marks=HYBRID),
        pytest.param("ffdhe2048:X25519", TLS1_3, "X25519", id="ffdhe2048-first"),
        pytest.param("X25519", TLS1_2, "X25519", id="tls1.2-X25519"),
        pytest.param("P-384", TLS1_2, "secp384r1", id="tls1.2-P-384"),
        pytest.param("X448:P-256", TLS1_2, "secp256r1", id="tls1.2-X448-first"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_listener_uses_allowed_groups(
    pki: PKI, listeners: Listeners, offered: str, version: int, used: str
) -> None:
    port = await echo_listener(pki, listeners, version)
    assert await within(
        deferToThread(probe, port, pki.ca_for(version), offered, version)
    ) == reported(used)


@pytest.mark.parametrize(
    ("offered", "version"),
    [
        pytest.param("ffdhe2048", TLS1_3, id="ffdhe2048"),
        pytest.param("ffdhe3072", TLS1_3, id="ffdhe3072"),
        pytest.param("X448", TLS1_3, id="X448"),
        pytest.param("P-521", TLS1_3, id="P-521"),
        pytest.param("X448", TLS1_2, id="tls1.2-X448"),
        pytest.param("P-521", TLS1_2, id="tls1.2-P-521"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_listener_refuses_other_groups(
    pki: PKI, listeners: Listeners, offered: str, version: int
) -> None:
    """A client offering only another group fails the handshake (alert 40)."""
    port = await echo_listener(pki, listeners, version)
    with pytest.raises(SSL.Error) as caught:
        await within(deferToThread(probe, port, pki.ca_for(version), offered, version))
    assert "handshake failure" in str(caught.value)


# -- SecureClientFactory (and so the gateway's upstream leg) -----------------------------


async def client_to(pki: PKI, listeners: Listeners, groups: str, insecure: bool) -> Collector:
    """SecureClientFactory connecting to a server that allows only C{groups}."""
    upstream = ReportingUpstreamFactory()
    port = await listeners.twisted_tls(upstream, pki.server, [b"http/1.1"], groups)
    tls = ClientTLS(insecure=True) if insecure else ClientTLS(ca_file=pki.ca_file)
    factory = SecureClientFactory(f"wss://127.0.0.1:{port}/", tls=tls)
    factory.protocol = Collector
    protocol: Collector = await within(factory.connect())
    return protocol


@pytest.mark.parametrize("insecure", [False, True], ids=["verified", "insecure"])
@pytest.mark.parametrize("groups", ["X25519", "P-256", "P-384", "X448:P-256"])
@pytest_twisted.ensureDeferred
async def test_client_uses_allowed_groups(
    pki: PKI, listeners: Listeners, groups: str, insecure: bool
) -> None:
    protocol = await client_to(pki, listeners, groups, insecure)
    await within(protocol.opened)
    group = protocol.transport.getHandle().get_group_name().lower()
    assert group == reported(groups.split(":")[-1])
    assert group in [reported(g) for g in GROUPS]
    assert await within(protocol.messages.get()) == b"alpn:http/1.1"
    protocol.sendClose(1000)
    assert await within(protocol.closed) == (True, 1000, None)


@pytest.mark.parametrize("insecure", [False, True], ids=["verified", "insecure"])
@pytest.mark.parametrize("groups", ["ffdhe2048", "X448", "P-521"])
@pytest_twisted.ensureDeferred
async def test_client_refuses_other_groups(
    pki: PKI, listeners: Listeners, groups: str, insecure: bool
) -> None:
    """Against a server that allows only another group, the handshake fails."""
    protocol = await client_to(pki, listeners, groups, insecure)
    with pytest.raises(ConnectionError) as caught:
        await within(protocol.opened)
    assert isinstance(caught.value.__cause__, SSL.Error)
    assert "handshake failure" in str(caught.value.__cause__)


@HYBRID
@pytest_twisted.ensureDeferred
async def test_txwssec_client_and_listener_agree_on_the_hybrid(
    pki: PKI, listeners: Listeners
) -> None:
    """Between txwssec's own client and listener, the first of GROUPS wins."""
    port = await listeners.wss(ReportingUpstreamFactory(), pki.server_pem)
    factory = SecureClientFactory(f"wss://127.0.0.1:{port}/", tls=ClientTLS(ca_file=pki.ca_file))
    factory.protocol = Collector
    protocol: Collector = await within(factory.connect())
    await within(protocol.opened)
    group = protocol.transport.getHandle().get_group_name()
    assert group.lower() == reported(GROUPS[0]) == "x25519mlkem768"
    protocol.sendClose(1000)
    assert await within(protocol.closed) == (True, 1000, None)
