"""
A kit for TLS tests: certificates written as PEM files, an Autobahn
upstream that reports what TLS negotiated and records everything it
received, TLS servers (txwssec's C{wss:} endpoint, or Twisted's own
options with ALPN protocols of the test's choice), a txwssec gateway in
front of an upstream, and TLS client contexts offering chosen ALPN
protocols.

Everything listens on 127.0.0.1, port 0.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey
from twisted.internet import defer
from twisted.internet import ssl as twisted_ssl
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString

from txwssec import (
    Consumer,
    ConsumerDirectory,
    KeyAuthenticator,
    OriginPolicy,
    RoutePolicy,
    SecureServerFactory,
    ServerPolicy,
)
from txwssec.client import SecureClientProtocol
from txwssec.consumers import key_digest
from txwssec.devcert import Issued
from txwssec.proxy import Upstream

TIMEOUT = 10.0
KEY = "john-key"
CONSUMERS = ConsumerDirectory([Consumer("john", key_digests=(key_digest(KEY),))])
#: The header a gateway adds for the upstream: who the client is.
IDENTITY_HEADER = "x-consumer-username"


def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


async def within(deferred: Deferred[Any], seconds: float = TIMEOUT) -> Any:
    """Await C{deferred}, failing the test instead of hanging."""
    return await deferred.addTimeout(seconds, reactor())


@dataclass(frozen=True)
class Pem:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


def write_pem(folder: Path, stem: str, issued: Issued) -> Pem:
    folder.mkdir(parents=True, exist_ok=True)
    pem = Pem(folder / f"{stem}.pem", folder / f"{stem}.key")
    pem.cert.write_bytes(issued.cert_pem())
    pem.key.write_bytes(issued.key_pem())
    return pem


def escape(path: Path) -> str:
    """A path as an endpoint-string argument (colons and backslashes escaped)."""
    return str(path).replace("\\", "\\\\").replace(":", "\\:")


# -- the upstream ----------------------------------------------------------------------


def alpn_name(protocol: bytes | None) -> str:
    return protocol.decode() if protocol else "none"


class ReportingUpstream(WebSocketServerProtocol):
    """
    Records every byte and every upgrade request it receives; once open,
    sends C{alpn:<negotiated protocol or none>}, then echoes.
    """

    factory: ReportingUpstreamFactory

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += data
        super().dataReceived(data)

    def onConnect(self, request: ConnectionRequest) -> None:
        self.factory.requests.append(request)

    def onOpen(self) -> None:
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        self.sendMessage(f"alpn:{alpn_name(negotiated)}".encode(), False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


class ReportingUpstreamFactory(WebSocketServerFactory):
    protocol = ReportingUpstream  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.setProtocolOptions(autoPingInterval=0, failByDrop=False)
        self.received = b""
        self.requests: list[ConnectionRequest] = []

    def identity_headers(self) -> list[str]:
        return [r.headers[IDENTITY_HEADER] for r in self.requests if IDENTITY_HEADER in r.headers]


# -- servers ---------------------------------------------------------------------------


class Listeners:
    """Starts TLS servers; L{stop} closes them all."""

    def __init__(self) -> None:
        self.ports: list[Any] = []

    async def listen(self, endpoint: Any, factory: Any) -> int:
        port = await endpoint.listen(factory)
        self.ports.append(port)
        return int(port.getHost().port)

    async def wss(self, factory: Any, server: Pem, *extra: str) -> int:
        """txwssec's C{wss:} endpoint with C{server}'s certificate."""
        description = (
            f"wss:0:interface=127.0.0.1:cert={escape(server.cert)}:key={escape(server.key)}"
        )
        return await self.listen(
            serverFromString(reactor(), ":".join([description, *extra])), factory
        )

    async def twisted_tls(
        self, factory: Any, server: Issued, alpn: Sequence[bytes], groups: str = ""
    ) -> int:
        """
        Twisted's own TLS options (not txwssec's), selecting among C{alpn} by
        ALPN (another server that does ALPN selection), with only the key
        exchange C{groups} when given.
        """
        options = twisted_ssl.CertificateOptions(
            privateKey=PKey.from_cryptography_key(server.key),
            certificate=X509.from_cryptography(server.certificate),
            acceptableProtocols=list(alpn),
        )
        if groups:
            only_groups(options.getContext(), groups)
        endpoint = SSL4ServerEndpoint(reactor(), 0, options, interface="127.0.0.1")
        return await self.listen(endpoint, factory)

    def stop(self) -> Deferred[Any]:
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports])


def gateway(url: str, ca_file: Path | None) -> SecureServerFactory:
    """A gateway route C{/echo} (API key C{john-key} in C{apikey}) relaying to C{url}."""
    route = RoutePolicy(
        "/echo",
        [KeyAuthenticator(CONSUMERS)],
        origins=OriginPolicy.from_list(["*"]),
        upstream=Upstream((url,), ca_file=ca_file, timeout=TIMEOUT / 2),
    )
    return SecureServerFactory(ServerPolicy.single(route, ping_interval=0))


def only_groups(context: SSL.Context, groups: str) -> None:
    """
    Allow only the key exchange C{groups} (C{"X448"}, C{"ffdhe2048:P-256"})
    on a pyOpenSSL context, which has no API for it.
    """
    lib = Binding().lib
    assert lib.SSL_CTX_set1_curves_list(context._context, groups.encode()) == 1, groups


# -- clients ---------------------------------------------------------------------------


def client_context(
    ca_file: Path, alpn: Sequence[str] = (), client: Pem | None = None
) -> ssl.SSLContext:
    """A verifying stdlib client context offering C{alpn} (nothing when empty)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if alpn:
        context.set_alpn_protocols(list(alpn))
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    return context


class Collector(SecureClientProtocol):
    """A txwssec client protocol that queues the messages it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: DeferredQueue[bytes] = DeferredQueue()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.put(payload)
