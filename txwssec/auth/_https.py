"""
HTTPS requests to an identity provider, with treq, never blocking the
reactor.

Every request is bounded: the whole exchange (connect, TLS, request, the
body) by a timeout, the body by L{MAX_RESPONSE_BYTES} (after
decompression), and redirects are never followed (a key or a verdict comes
from the configured URL or not at all). Certificates are verified like a
browser does (L{BrowserLikePolicyForHTTPS}): against the system's trust
store, or against a configured CA bundle for a private identity provider.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.web.http_headers import Headers

#: The most bytes of a response body read from an identity provider.
MAX_RESPONSE_BYTES = 1024 * 1024

#: Seconds a request may take, connection included, unless configured.
DEFAULT_TIMEOUT = 3.0

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


class FetchError(Exception):
    """
    A request to the identity provider failed. The message is short, safe
    for the operator's log, and never holds a credential.
    """


@dataclass(frozen=True)
class Fetched:
    """A response: its status, headers and (bounded) body."""

    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str:
        """The last value of header C{name}, or C{""}."""
        values = self.headers.getRawHeaders(name, [])
        return values[-1] if values else ""

    def json(self) -> Any:
        """
        The body parsed as JSON.

        @raise FetchError: if it is not JSON.
        """
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError):
            raise FetchError("the response is not JSON") from None


def https_problem(url: str) -> str:
    """
    Why C{url} is not an acceptable identity provider URL, or C{""}: it
    must be C{https://} with a host, and carry no user information or
    fragment.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "is not a URL"
    if parts.scheme != "https":
        return "must be an https:// URL"
    if not parts.hostname:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not carry user information (credentials go in their own keys)"
    if parts.fragment:
        return "must not have a #fragment"
    return ""


def load_trust_root(path: Path) -> Any:
    """
    An OpenSSL trust root holding every certificate of the PEM file at
    C{path}.

    @raise OSError: if the file cannot be read.
    @raise ValueError: if it holds no PEM certificate, or a broken one.
    """
    data = path.read_bytes()
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        raise ValueError("holds no PEM certificate")
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
    except Exception:
        raise ValueError("holds a certificate that cannot be read") from None
    return trustRootFromCertificates(certificates)


class _TooLarge(Exception):
    pass


class HTTPSClient:
    """
    A small HTTPS client for an identity provider: one treq client with a
    persistent connection pool, created on first use (so that building one
    from configuration needs no reactor).

    @param trust_root: a trust root from L{load_trust_root}, or L{None} for
        the system's trust store.
    @param timeout: seconds a whole request may take.
    @param max_bytes: the longest response body read.
    @param reactor: the reactor (the global one by default).
    """

    def __init__(
        self,
        trust_root: Any = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_bytes: int = MAX_RESPONSE_BYTES,
        reactor: Any = None,
    ) -> None:
        self.trust_root = trust_root
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._reactor = reactor
        self._client: Any = None
        self._pool: Any = None

    @property
    def reactor(self) -> Any:
        """The reactor requests run on."""
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def _treq(self) -> Any:
        if self._client is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

            policy = (
                BrowserLikePolicyForHTTPS(self.trust_root)
                if self.trust_root is not None
                else BrowserLikePolicyForHTTPS()
            )
            from twisted.web.client import _HTTP11ClientFactory

            class QuietFactory(_HTTP11ClientFactory):
                noisy = False  # no "Starting factory" line per connection

            self._pool = HTTPConnectionPool(self.reactor, persistent=True)
            self._pool._factory = QuietFactory
            self._pool.maxPersistentPerHost = 4
            self._pool.cachedConnectionTimeout = 60
            agent = Agent(
                self.reactor,
                contextFactory=policy,
                connectTimeout=self.timeout,
                pool=self._pool,
            )
            self._client = HTTPClient(agent)
        return self._client

    def get(self, url: str, headers: Mapping[str, str] | None = None) -> Deferred[Fetched]:
        """GET C{url}; fails with L{FetchError}."""
        return self._bounded("GET", url, dict(headers or {}), None)

    def post_form(
        self, url: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> Deferred[Fetched]:
        """POST C{body} (already form-urlencoded) to C{url}; fails with L{FetchError}."""
        sent = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        return self._bounded("POST", url, sent, body)

    def _bounded(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> Deferred[Fetched]:
        exchange = Deferred.fromCoroutine(self._exchange(method, url, headers, body))
        exchange.addTimeout(self.timeout, self.reactor)
        return exchange.addErrback(_as_fetch_error, self.timeout)

    async def _exchange(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> Fetched:
        headers.setdefault("Accept", "application/json")
        response = await self._treq().request(
            method, url, headers=headers, data=body, allow_redirects=False
        )
        length = response.length
        if isinstance(length, int) and length > self.max_bytes:
            response.deliverBody(_Discard())
            raise FetchError(f"response larger than {self.max_bytes} bytes")
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > self.max_bytes:
                raise _TooLarge()
            chunks.append(data)

        from treq import collect as treq_collect

        await treq_collect(response, collect)
        return Fetched(int(response.code), response.headers, b"".join(chunks))

    def close(self) -> Deferred[None]:
        """Close the pooled connections."""
        if self._pool is None:
            return succeed(None)
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed


class _Discard:
    """A body consumer that reads nothing (the connection is dropped)."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


def _as_fetch_error(failure: Any, timeout: float) -> Fetched:
    """Turn any failure of an exchange into a short L{FetchError}."""
    from twisted.internet.defer import CancelledError, TimeoutError

    error = failure.value
    if isinstance(error, FetchError):
        raise error
    reasons = getattr(error, "reasons", None)
    if reasons:  # ResponseFailed, ResponseNeverReceived...: the first cause
        error = reasons[0].value
    if isinstance(error, TimeoutError | CancelledError):
        raise FetchError(f"no answer within {timeout:g} seconds")
    if isinstance(error, _TooLarge):
        raise FetchError("response larger than the limit")
    text = str(error) or type(error).__name__
    raise FetchError(f"{type(error).__name__}: {text[:200]}")
