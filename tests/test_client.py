"""
txwssec.client against real txwssec servers on 127.0.0.1.

Every credential helper is checked by a server that reports the principal it
authenticated; wss:// verification is checked with certificates generated
per test (IP SAN, DNS-only, another CA, expired); a close 3000 is checked to
surface as its own event and nothing else; examples/client.py is run against
the real ``twistd wssec`` serving a copy of examples/quickstart.toml.

What a verification failure looks like (all on C{protocol.opened}, which
errbacks with L{ConnectionError}; C{connect()} itself succeeds because it
fires once TCP is up, before the TLS handshake):

  - wrong name / no IP SAN: "TLS verification failed: the server
    certificate is not valid for <host> (VerificationError(...Mismatch...))",
    its cause service_identity's C{VerificationError}; the client aborts
    the TCP connection without a TLS alert;
  - untrusted CA, system trust, expired: the cause is OpenSSL's
    C{SSL.Error} and the message only says "certificate verify failed"
    (pyOpenSSL exposes no verify result code, so an expired certificate and
    an untrusted one look alike to the client). The server receives the
    client's TLS alert, which does tell them apart: "unknown ca" or
    "certificate expired".

In each failure the server receives no application byte: the upgrade
request, and the credentials in it, never leave the client.
"""

from __future__ import annotations

import datetime
import gc
import json
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import jwt
import pytest
import pytest_twisted
from conftest import CapturedLog
from OpenSSL import SSL
from processes import free_port, quickstart, repo_env, twistd
from service_identity import VerificationError
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionLost
from twisted.internet.task import deferLater
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from txwssec import (
    BasicAuthenticator,
    Consumer,
    ConsumerDirectory,
    JWTAuthenticator,
    KeyAuthenticator,
    RoutePolicy,
    SecureServerFactory,
    SecureServerProtocol,
    hash_password,
)
from txwssec.auth.tls import TLSClientCertificateAuthenticator
from txwssec.client import (
    ApiKey,
    BasicCredentials,
    BearerToken,
    ClientTLS,
    Credentials,
    SecureClientFactory,
    SecureClientProtocol,
)
from txwssec.consumers import key_digest, normalise_subject
from txwssec.devcert import Issued, issue, make_ca
from txwssec.interfaces import Authenticator

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0

JWT_SECRET = b"client-tests-0123456789abcdef-0123456789"  # HS256, 40 bytes
assert len(JWT_SECRET) >= 32

CLIENT_SUBJECT = "CN=device-1,O=txwssec development"

CONSUMERS = ConsumerDirectory(
    [
        Consumer("john", key_digests=(key_digest("john-key"),)),
        Consumer("jane"),  # JWT sub
        Consumer("alice", password=hash_password("alice-password", "pbkdf2-sha256")),
        Consumer("device-1", tls_subjects=(normalise_subject(CLIENT_SUBJECT),)),
    ]
)


def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


async def within(deferred: Deferred[T], seconds: float = TIMEOUT) -> T:
    """Await C{deferred}, failing the test instead of hanging."""
    return await deferred.addTimeout(seconds, reactor())


# -- the server: reports who connected, obeys a few commands ---------------


class Reporter(SecureServerProtocol):
    """
    Sends the authenticated principal (and the query parameter names) as its
    first message, then: C{big N} sends N bytes, C{close CODE} closes with
    CODE, C{revoke} revokes the session (3003); anything else is echoed.
    Every byte received and every close code seen is recorded on the
    factory.
    """

    factory: RecordingFactory

    def __init__(self) -> None:
        super().__init__()
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.factory.received.append(data)
        super().dataReceived(data)

    def onOpen(self) -> None:
        assert self.session is not None
        principal = self.session.principal
        report = {
            "consumer": principal.consumer,
            "method": principal.method,
            "params": sorted(self.http_request_params),
        }
        self.sendMessage(json.dumps(report).encode())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        command, _, argument = payload.decode().partition(" ")
        if command == "big":
            self.sendMessage(b"x" * int(argument), isBinary=True)
        elif command == "close":
            self.sendClose(int(argument), "bye")
        elif command == "revoke":
            self.revoke()
        else:
            self.sendMessage(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.close_codes.append(code)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.lost_reasons.append(reason)
        super().connectionLost(reason)
        if not self.lost.called:
            self.lost.callback(None)


class RecordingFactory(SecureServerFactory):
    """A server factory remembering its connections and what they received."""

    protocol = Reporter  # type: ignore[assignment]

    def __init__(self, route: RoutePolicy) -> None:
        super().__init__(route)
        self.connections_built: list[Reporter] = []
        self.received: list[bytes] = []
        self.close_codes: list[int | None] = []
        self.lost_reasons: list[Failure | None] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.connections_built.append(protocol)
        return protocol

    async def all_lost(self) -> None:
        """Wait until every connection this factory built has ended."""
        for protocol in self.connections_built:
            await within(protocol.lost)


def who_server(*authenticators: Authenticator, **route_options: Any) -> RecordingFactory:
    """A L{Reporter} server on C{/who}."""
    return RecordingFactory(RoutePolicy("/who", list(authenticators), **route_options))


def key_server(query: str = "", **route_options: Any) -> RecordingFactory:
    """A L{Reporter} server on C{/who} taking API keys (header, C{token})."""
    return who_server(KeyAuthenticator(CONSUMERS, query=query), **route_options)


# -- the client ------------------------------------------------------------


class Recorder(SecureClientProtocol):
    """Records messages and every call of L{onCredentialsExpired}."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[bytes] = []
        self.first: Deferred[bytes] = Deferred()
        self.expired_calls = 0
        self._waiting: list[Deferred[bytes]] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append(payload)
        waiting, self._waiting = self._waiting, []
        if not self.first.called:
            self.first.callback(payload)
        for deferred in waiting:
            deferred.callback(payload)

    def next_message(self) -> Deferred[bytes]:
        """Fires with the next message received."""
        deferred: Deferred[bytes] = Deferred()
        self._waiting.append(deferred)
        return deferred

    def onCredentialsExpired(self) -> None:
        self.expired_calls += 1
        super().onCredentialsExpired()


def client(
    url: str, credentials: Credentials | None = None, **options: Any
) -> SecureClientFactory:
    factory = SecureClientFactory(url, credentials, **options)
    factory.protocol = Recorder
    return factory


async def open_client(factory: SecureClientFactory) -> Recorder:
    """Connect and wait for the WebSocket to open."""
    protocol = await within(factory.connect())
    assert isinstance(protocol, Recorder)
    await within(protocol.opened)
    return protocol


async def report_of(factory: SecureClientFactory) -> tuple[dict[str, Any], Recorder]:
    """
    Connect, read the server's report of the principal, close normally.
    """
    protocol = await open_client(factory)
    report = json.loads(await within(protocol.first))
    protocol.sendClose(1000)
    assert await within(protocol.closed) == (True, 1000, None)
    assert protocol.expired_calls == 0
    return report, protocol


async def refused(factory: SecureClientFactory) -> tuple[ConnectionError, Recorder]:
    """The error C{protocol.opened} fails with; C{protocol.closed} fired too."""
    protocol = await within(factory.connect())
    assert isinstance(protocol, Recorder)
    with pytest.raises(ConnectionError) as caught:
        await within(protocol.opened)
    was_clean, code, _reason = await within(protocol.closed)
    assert was_clean is False
    assert code == 1006
    assert protocol.messages == []
    assert protocol.expired_calls == 0
    return caught.value, protocol


# -- certificates and wss:// servers ---------------------------------------


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def write_pem(folder: Path, stem: str, issued: Issued) -> Pem:
    pem = Pem(folder / f"{stem}.pem", folder / f"{stem}.key")
    pem.cert.write_bytes(issued.cert_pem())
    pem.key.write_bytes(issued.key_pem())
    return pem


@dataclass(frozen=True)
class PKI:
    """Certificates for one test, all in its tmp_path."""

    ca: Pem
    other_ca: Pem
    ip_server: Pem  # CN=ip-server, IP SAN 127.0.0.1
    localhost_server: Pem  # DNS SAN localhost only
    expired_server: Pem  # IP SAN 127.0.0.1, notAfter yesterday
    untrusted_server: Pem  # IP SAN 127.0.0.1, issued by the other CA
    device: Pem  # client certificate, CN=device-1


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    ca, other = make_ca("client-tests CA"), make_ca("some other CA")
    now = datetime.datetime.now(datetime.UTC)
    return PKI(
        ca=write_pem(tmp_path, "ca", ca),
        other_ca=write_pem(tmp_path, "other-ca", other),
        ip_server=write_pem(tmp_path, "ip", issue(ca, "ip-server", ip_addresses=("127.0.0.1",))),
        localhost_server=write_pem(
            tmp_path, "localhost", issue(ca, "localhost", dns_names=("localhost",))
        ),
        expired_server=write_pem(
            tmp_path,
            "expired",
            issue(
                ca,
                "expired-server",
                ip_addresses=("127.0.0.1",),
                not_before=now - datetime.timedelta(days=3),
                not_after=now - datetime.timedelta(days=1),
            ),
        ),
        untrusted_server=write_pem(
            tmp_path, "untrusted", issue(other, "untrusted", ip_addresses=("127.0.0.1",))
        ),
        device=write_pem(tmp_path, "device", issue(ca, "device-1", client=True)),
    )


def _escape(path: Path) -> str:
    """A path as an endpoint-string argument."""
    return str(path).replace("\\", "\\\\").replace(":", "\\:")


@pytest.fixture
def serve_tls() -> Iterator[Callable[..., Any]]:
    """
    Start a factory on a C{wss:} endpoint on 127.0.0.1 (ephemeral port);
    awaitable, returns the port. Every port is stopped after the test.
    """
    ports: list[Any] = []

    async def start(factory: Any, server: Pem, extra: str = "") -> int:
        description = (
            f"wss:0:interface=127.0.0.1:cert={_escape(server.cert)}:key={_escape(server.key)}"
            + extra
        )
        port = await serverFromString(reactor(), description).listen(factory)
        ports.append(port)
        return int(port.getHost().port)

    yield start
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


# -- credentials, as the server expects them -------------------------------


@pytest_twisted.ensureDeferred
async def test_api_key_in_header(serve: Any) -> None:
    factory = key_server()
    port = serve(factory)
    report, protocol = await report_of(client(f"ws://127.0.0.1:{port}/who", ApiKey("john-key")))
    assert report == {"consumer": "john", "method": "key", "params": []}
    assert protocol.response.protocol is None
    assert b"apikey: john-key\r\n" in factory.received[0]


@pytest_twisted.ensureDeferred
async def test_closed_client_freed_without_the_cycle_collector(serve: Any) -> None:
    """
    A client protocol is freed by reference counting once its connection is
    lost: C{opened} and Autobahn's C{is_closed}, fired with the protocol,
    are forgotten then; read again, C{is_closed} still gives the protocol.
    """
    from twisted.internet import reactor

    port = serve(key_server())
    gc.collect()
    gc.disable()
    try:
        protocol = await open_client(client(f"ws://127.0.0.1:{port}/who", ApiKey("john-key")))
        await within(protocol.first)
        protocol.sendClose(1000)
        assert await within(protocol.closed) == (True, 1000, None)
        await deferLater(reactor, 0.05)
        assert await within(protocol.is_closed) is protocol
        alive = weakref.ref(protocol)
        del protocol
        assert alive() is None
    finally:
        gc.enable()


@pytest_twisted.ensureDeferred
async def test_api_key_in_subprotocol(serve: Any) -> None:
    """
    C{token, <key>} in Sec-WebSocket-Protocol, as a browser sends it; the
    server answers the marker, never the key.
    """
    port = serve(key_server())
    factory = client(f"ws://127.0.0.1:{port}/who", ApiKey("john-key", via="subprotocol"))
    assert factory.protocols == ["token", "john-key"]
    report, protocol = await report_of(factory)
    assert report == {"consumer": "john", "method": "key", "params": []}
    assert protocol.response.protocol == "token"
    assert protocol.websocket_protocol_in_use == "token"


@pytest_twisted.ensureDeferred
async def test_api_key_in_query(serve: Any) -> None:
    """The key is appended to an existing query string."""
    port = serve(key_server(query="apikey"))
    factory = client(f"ws://127.0.0.1:{port}/who?room=1", ApiKey("john-key", via="query"))
    assert factory.url == f"ws://127.0.0.1:{port}/who?room=1&apikey=john-key"
    report, _ = await report_of(factory)
    assert report == {"consumer": "john", "method": "key", "params": ["apikey", "room"]}


@pytest_twisted.ensureDeferred
async def test_api_key_in_query_refused_when_server_disabled_it(serve: Any) -> None:
    """The query parameter is off by default on the server: 401."""
    port = serve(key_server())
    error, _ = await refused(client(f"ws://127.0.0.1:{port}/who", ApiKey("john-key", via="query")))
    assert "401" in str(error)


def bearer(sub: str = "jane", lifetime: int = 300) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "exp": now + lifetime, "iat": now}, JWT_SECRET, "HS256")


@pytest.mark.parametrize(("via", "answered"), [("header", None), ("subprotocol", "bearer")])
@pytest_twisted.ensureDeferred
async def test_bearer_token(serve: Any, via: str, answered: str | None) -> None:
    factory = who_server(JWTAuthenticator(CONSUMERS, JWT_SECRET))
    port = serve(factory)
    token = bearer()
    report, protocol = await report_of(
        client(f"ws://127.0.0.1:{port}/who", BearerToken(token, via=via))
    )
    assert report == {"consumer": "jane", "method": "jwt", "params": []}
    assert protocol.response.protocol == answered
    request = factory.received[0]
    if via == "header":
        assert f"Authorization: Bearer {token}\r\n".encode() in request
    else:
        assert f"Sec-WebSocket-Protocol: bearer,{token}".encode() in request.replace(b", ", b",")


@pytest_twisted.ensureDeferred
async def test_basic_credentials(serve: Any) -> None:
    port = serve(who_server(BasicAuthenticator(CONSUMERS)))
    report, _ = await report_of(
        client(f"ws://127.0.0.1:{port}/who", BasicCredentials("alice", "alice-password"))
    )
    assert report == {"consumer": "alice", "method": "basic", "params": []}


@pytest_twisted.ensureDeferred
async def test_basic_credentials_wrong_password_refused(serve: Any) -> None:
    port = serve(who_server(BasicAuthenticator(CONSUMERS)))
    error, _ = await refused(
        client(f"ws://127.0.0.1:{port}/who", BasicCredentials("alice", "not-her-password"))
    )
    assert "401" in str(error)


@pytest_twisted.ensureDeferred
async def test_application_subprotocol_with_subprotocol_credential(serve: Any) -> None:
    """
    The application's subprotocols come first, the credential after them;
    the server picks the application's.
    """
    port = serve(key_server(subprotocols=("chat.v1",)))
    factory = client(
        f"ws://127.0.0.1:{port}/who",
        ApiKey("john-key", via="subprotocol"),
        subprotocols=["chat.v1"],
    )
    assert factory.protocols == ["chat.v1", "token", "john-key"]
    report, protocol = await report_of(factory)
    assert report == {"consumer": "john", "method": "key", "params": []}
    assert protocol.response.protocol == "chat.v1"
    assert protocol.websocket_protocol_in_use == "chat.v1"


@pytest_twisted.ensureDeferred
async def test_client_certificate(serve_tls: Any, pki: PKI) -> None:
    """Mutual TLS: the client certificate names the consumer."""
    factory = who_server(TLSClientCertificateAuthenticator(CONSUMERS))
    port = await serve_tls(
        factory, pki.ip_server, f":clientCA={_escape(pki.ca.cert)}:clientCert=optional"
    )
    tls = ClientTLS(ca_file=pki.ca.cert, client_cert=pki.device.cert, client_key=pki.device.key)
    report, _ = await report_of(client(f"wss://127.0.0.1:{port}/who", tls=tls))
    assert report == {"consumer": "device-1", "method": "tls", "params": []}


@pytest_twisted.ensureDeferred
async def test_without_client_certificate_refused(serve_tls: Any, pki: PKI) -> None:
    """The same route without a client certificate: 401."""
    factory = who_server(TLSClientCertificateAuthenticator(CONSUMERS))
    port = await serve_tls(
        factory, pki.ip_server, f":clientCA={_escape(pki.ca.cert)}:clientCert=optional"
    )
    error, _ = await refused(
        client(f"wss://127.0.0.1:{port}/who", tls=ClientTLS(ca_file=pki.ca.cert))
    )
    assert "401" in str(error)


# -- wss:// verification ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_wss_verified_by_ip_san(serve_tls: Any, pki: PKI) -> None:
    factory = key_server()
    port = await serve_tls(factory, pki.ip_server)
    protocol = await open_client(
        client(
            f"wss://127.0.0.1:{port}/who", ApiKey("john-key"), tls=ClientTLS(ca_file=pki.ca.cert)
        )
    )
    assert json.loads(await within(protocol.first))["consumer"] == "john"
    peer = protocol.transport.getPeerCertificate().to_cryptography()
    assert peer.subject.rfc4514_string() == "CN=ip-server,O=txwssec development"
    echoed = protocol.next_message()
    protocol.sendMessage(b"over tls")
    assert await within(echoed) == b"over tls"
    protocol.sendClose(1000)
    assert await within(protocol.closed) == (True, 1000, None)


@pytest_twisted.ensureDeferred
async def test_hostname_override(serve_tls: Any, pki: PKI) -> None:
    """A certificate for localhost only, reached at 127.0.0.1 as "localhost"."""
    port = await serve_tls(key_server(), pki.localhost_server)
    tls = ClientTLS(ca_file=pki.ca.cert, hostname="localhost")
    report, _ = await report_of(client(f"wss://127.0.0.1:{port}/who", ApiKey("john-key"), tls=tls))
    assert report["consumer"] == "john"


@dataclass(frozen=True)
class Failing:
    server: str  # attribute of PKI
    tls: Callable[[PKI], ClientTLS]
    expected: tuple[str, ...]  # fragments of the error message
    cause: type[BaseException]
    alert: str | None  # the TLS alert the server receives


FAILURES = {
    "no IP SAN": Failing(
        "localhost_server",
        lambda pki: ClientTLS(ca_file=pki.ca.cert),
        ("TLS verification failed", "not valid for 127.0.0.1", "IPAddressMismatch"),
        VerificationError,
        None,
    ),
    "wrong hostname": Failing(
        "ip_server",
        lambda pki: ClientTLS(ca_file=pki.ca.cert, hostname="example.com"),
        ("TLS verification failed", "not valid for example.com", "DNSMismatch"),
        VerificationError,
        None,
    ),
    "untrusted CA": Failing(
        "untrusted_server",
        lambda pki: ClientTLS(ca_file=pki.ca.cert),
        ("certificate verify failed",),
        SSL.Error,
        "unknown ca",
    ),
    "ca_file of another CA": Failing(
        "ip_server",
        lambda pki: ClientTLS(ca_file=pki.other_ca.cert),
        ("certificate verify failed",),
        SSL.Error,
        "unknown ca",
    ),
    "system trust": Failing(
        "ip_server",
        lambda pki: ClientTLS(),
        ("certificate verify failed",),
        SSL.Error,
        "unknown ca",
    ),
    "expired": Failing(
        "expired_server",
        lambda pki: ClientTLS(ca_file=pki.ca.cert),
        ("certificate verify failed",),
        SSL.Error,
        "certificate expired",
    ),
}


@pytest.mark.parametrize("case", FAILURES)
@pytest_twisted.ensureDeferred
async def test_wss_verification_failure(serve_tls: Any, pki: PKI, case: str) -> None:
    """
    C{protocol.opened} fails with a L{ConnectionError} that says why (see
    the module docstring), and the server receives nothing: not the upgrade
    request, not the key.
    """
    failing = FAILURES[case]
    factory = key_server()
    port = await serve_tls(factory, getattr(pki, failing.server))
    error, _ = await refused(
        client(f"wss://127.0.0.1:{port}/who", ApiKey("john-key"), tls=failing.tls(pki))
    )
    message = str(error)
    for fragment in failing.expected:
        assert fragment in message
    assert "john-key" not in message
    assert isinstance(error.__cause__, failing.cause)
    await factory.all_lost()
    assert len(factory.connections_built) == 1  # TCP got there; nothing else did
    assert factory.received == []
    assert not factory.counters
    [lost] = factory.lost_reasons
    assert lost is not None
    if failing.alert is None:
        # service_identity's check: the client aborts, without a TLS alert.
        assert isinstance(lost.value, ConnectionLost)
    else:
        # OpenSSL's own check: the client's alert says what was wrong.
        assert isinstance(lost.value, SSL.Error)
        assert failing.alert in str(lost.value)


@pytest.mark.parametrize("server", ["untrusted_server", "expired_server"])
@pytest_twisted.ensureDeferred
async def test_insecure_connects_and_warns(
    serve_tls: Any, pki: PKI, captured_log: CapturedLog, server: str
) -> None:
    """
    insecure=True reaches a server no verification would accept (another
    CA, expired), and says so in the log, naming the URL.
    """
    port = await serve_tls(key_server(), getattr(pki, server))
    url = f"wss://127.0.0.1:{port}/who"
    report, _ = await report_of(client(url, ApiKey("john-key"), tls=ClientTLS(insecure=True)))
    assert report["consumer"] == "john"
    warnings = [
        event
        for event in captured_log.matching(log_namespace="txwssec.client", log_level=LogLevel.warn)
        if event.get("url") == url
    ]
    assert len(warnings) == 1
    assert "TLS verification is OFF" in captured_log.text()


@pytest_twisted.ensureDeferred
async def test_not_insecure_by_default(
    serve_tls: Any, pki: PKI, captured_log: CapturedLog
) -> None:
    """Verified connections log no such warning."""
    port = await serve_tls(key_server(), pki.ip_server)
    await report_of(
        client(
            f"wss://127.0.0.1:{port}/who", ApiKey("john-key"), tls=ClientTLS(ca_file=pki.ca.cert)
        )
    )
    assert captured_log.matching(log_namespace="txwssec.client", log_level=LogLevel.warn) == []


# -- close codes -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_close_3000_is_credentials_expired(serve: Any) -> None:
    """
    The route's max_lifetime ends the session with 3000: the protocol's
    hook runs exactly once and the factory's callback gets the protocol.
    """
    port = serve(key_server(max_lifetime=1))
    expired: list[SecureClientProtocol] = []
    factory = client(
        f"ws://127.0.0.1:{port}/who", ApiKey("john-key"), on_credentials_expired=expired.append
    )
    protocol = await open_client(factory)
    assert await within(protocol.closed) == (True, 3000, "credentials expired")
    assert protocol.expired_calls == 1
    assert expired == [protocol]


@pytest.mark.parametrize(
    ("command", "closed"),
    [
        (None, (True, 1000, None)),
        ("close 1000", (True, 1000, "bye")),
        ("revoke", (True, 3003, "credentials revoked")),
    ],
)
@pytest_twisted.ensureDeferred
async def test_other_closes_are_not_credentials_expired(
    serve: Any, command: str | None, closed: tuple[bool, int, str | None]
) -> None:
    """A normal close by either side, or a revocation (3003), is not 3000."""
    port = serve(key_server())
    expired: list[SecureClientProtocol] = []
    factory = client(
        f"ws://127.0.0.1:{port}/who", ApiKey("john-key"), on_credentials_expired=expired.append
    )
    protocol = await open_client(factory)
    if command is None:
        protocol.sendClose(1000)
    else:
        protocol.sendMessage(command.encode())
    assert await within(protocol.closed) == closed
    assert protocol.expired_calls == 0
    assert expired == []


@pytest_twisted.ensureDeferred
async def test_refused_handshake(serve: Any) -> None:
    """A wrong key: 401 on the wire, a ConnectionError that says 401."""
    factory = key_server()
    port = serve(factory)
    error, protocol = await refused(client(f"ws://127.0.0.1:{port}/who", ApiKey("wrong-key")))
    assert str(error) == (
        "connection closed before opening: connection was closed uncleanly "
        '("WebSocket connection upgrade failed [401]: Unauthorized")'
    )
    assert error.__cause__ is None
    assert not hasattr(protocol, "response")  # onConnect never ran
    assert "wrong-key" not in str(error)
    await factory.all_lost()
    assert factory.counters["handshake.refused.401"] == 1
    assert factory.counters["session.opened"] == 0


@pytest_twisted.ensureDeferred
async def test_server_message_over_max_message_size(serve: Any) -> None:
    """
    The client's own limit: a 2000-byte message to a 1000-byte client is
    refused with 1009. (C{closed} reports the code the peer sent: txwssec
    answers a close with 1000, as it never echoes close codes.)
    """
    server = key_server()
    port = serve(server)
    protocol = await open_client(
        client(f"ws://127.0.0.1:{port}/who", ApiKey("john-key"), max_message_size=1000)
    )
    await within(protocol.first)
    protocol.sendMessage(b"big 1000")
    protocol.sendMessage(b"big 2000")
    assert await within(protocol.closed) == (True, 1000, None)
    assert protocol.localCloseCode == 1009
    await server.all_lost()
    assert server.close_codes == [1009]
    assert [len(m) for m in protocol.messages[1:]] == [1000]


# -- examples/client.py against the real twistd ----------------------------


@dataclass
class Quickstart:
    folder: Path
    tls_port: int


@pytest.fixture(scope="module")
def quickstart_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Quickstart]:
    """C{twistd -n wssec} serving the quickstart example, until both listen."""
    folder = tmp_path_factory.mktemp("quickstart")
    port, tls_port = free_port(), free_port()
    running = twistd(quickstart(folder, port, tls_port), folder)
    try:
        running.wait_for(f"wssec listening on tls:{tls_port}:")
        yield Quickstart(folder, tls_port)
    finally:
        try:
            running.stop()
        finally:
            running.kill()


def run_example(server: Quickstart, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "client.py"),
            "--url",
            f"wss://localhost:{server.tls_port}/echo",
            "--ca",
            str(server.folder / "dev-certs" / "ca.pem"),
            *args,
        ],
        env=repo_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
    )


def test_example_client_over_wss(quickstart_server: Quickstart) -> None:
    result = run_example(quickstart_server)
    assert (result.returncode, result.stdout) == (0, "hello over wss\n"), result.stderr


def test_example_client_key_in_subprotocol(quickstart_server: Quickstart) -> None:
    result = run_example(quickstart_server, "--via", "subprotocol")
    assert (result.returncode, result.stdout) == (0, "hello over wss\n"), result.stderr


def test_example_client_wrong_key(quickstart_server: Quickstart) -> None:
    result = run_example(quickstart_server, "--key", "wrong")
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "could not open:" in result.stderr
    assert "401" in result.stderr


@pytest_twisted.ensureDeferred
async def test_messages_after_the_servers_close_are_ignored() -> None:
    """
    RFC 6455 5.5.1: after a Close frame, no more data. A server that breaks
    this must not reach onMessage (an echo there would drop the connection
    before the close reply, as Autobahn's own client does in 7.1.4/7.1.5).
    """
    import asyncio
    import base64
    import hashlib

    from conftest import aio

    replies: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(
            hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        )
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        writer.write(b"\x88\x02\x03\xe8" + b"\x81\x05after")  # close 1000, then text
        await writer.drain()
        replies.append(await reader.read(64))
        writer.close()

    class Recording(SecureClientProtocol):
        messages: ClassVar[list[bytes]] = []

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            Recording.messages.append(payload)
            self.sendMessage(payload)

    server = await aio(asyncio.start_server(handle, "127.0.0.1", 0))
    try:
        port = server.sockets[0].getsockname()[1]
        factory = SecureClientFactory(f"ws://127.0.0.1:{port}/")
        factory.protocol = Recording
        protocol = await factory.connect()
        await protocol.opened
        _, code, _ = await protocol.closed
    finally:
        server.close()
    assert Recording.messages == []
    assert code == 1000
    assert replies and replies[0][:1] == b"\x88"  # the client's close reply
