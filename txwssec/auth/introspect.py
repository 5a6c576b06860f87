"""
Opaque bearer tokens checked by the identity provider's OAuth 2.0 token
introspection endpoint (RFC 7662): method C{introspect}.

The token is read like a JWT (C{Authorization: Bearer}, the C{bearer}
subprotocol, a query parameter only when configured) and POSTed as
C{token=...&token_type_hint=access_token}, with the client credentials in
HTTP Basic (each form-urlencoded first, RFC 6749 section 2.3.1). An
C{active: true} answer naming a known consumer is accepted until its
C{exp}; C{nbf} and C{exp} are checked; anything else, a failure or no
answer within C{timeout} is a 401 for that handshake, never a hung one.

Answers are cached for C{cache} seconds and never past the token's C{exp},
keyed by the SHA-256 of the token (never the token itself), in at most
C{max_entries} entries (the oldest go first). The client secret and the
tokens never reach a log line.
"""

from __future__ import annotations

import hashlib
import math
import time
from base64 import b64encode
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, urlencode

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from txwssec._schema import Table
from txwssec.auth._extract import Found, find_bearer
from txwssec.auth._https import (
    DEFAULT_TIMEOUT,
    Fetched,
    FetchError,
    HTTPSClient,
    https_problem,
    load_trust_root,
)
from txwssec.auth.context import BuildContext
from txwssec.consumers import ConsumerDirectory
from txwssec.interfaces import IAuthenticator
from txwssec.types import Accept, Deny, HandshakeRequest, Principal, Verdict

#: Longer tokens are refused without asking the identity provider.
MAX_TOKEN_LENGTH = 8192
#: Default bound on the number of cached answers.
MAX_ENTRIES = 10000
#: Default bound on introspection requests in flight; beyond, 503.
MAX_PENDING = 64


@dataclass(frozen=True)
class _Entry:
    """An accepted answer: its principal and expiry, kept until C{until}."""

    principal: Principal
    expires_at: float | None
    not_before: float | None
    until: float


class _Closer(Service):
    """Closes the HTTP connection pool when C{twistd} stops."""

    def __init__(self, client: HTTPSClient) -> None:
        self.client = client

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.client.close()


def basic_credentials(client_id: str, client_secret: str) -> str:
    """
    The C{Authorization} value for client credentials (RFC 6749 section
    2.3.1): both form-urlencoded, joined by a colon, base64.
    """
    pair = f"{quote_plus(client_id)}:{quote_plus(client_secret)}"
    return "Basic " + b64encode(pair.encode("ascii")).decode("ascii")


@implementer(IAuthenticator)
class IntrospectionAuthenticator:
    """
    Accepts an opaque bearer token that the introspection endpoint calls
    active and that names a known consumer.

    @param client: the HTTPS client (its timeout bounds each introspection).
    @param url: the introspection endpoint (https).
    @param client_id: this server's client id at the identity provider.
    @param client_secret: its secret; never logged.
    @param cache: seconds an answer is kept (never past the token's C{exp});
        0 asks every time.
    @param header: header carrying C{Bearer <token>}.
    @param subprotocol: C{Sec-WebSocket-Protocol} marker before the token.
    @param query: query parameter, off by default.
    @param consumer_claim: member of the answer naming the consumer.
    @param max_entries: the most answers cached.
    @param max_pending: the most requests in flight to the identity
        provider; a handshake beyond gets 503 (a flood of made-up tokens
        cannot pile requests on the provider).
    @param clock: C{seconds()} for the cache (the reactor by default).
    @param where: the configuration path named in log lines.
    """

    name = "introspect"
    log = Logger()

    def __init__(
        self,
        consumers: ConsumerDirectory,
        client: HTTPSClient,
        url: str,
        client_id: str,
        client_secret: str,
        *,
        cache: float = 60,
        header: str = "Authorization",
        subprotocol: str = "bearer",
        query: str = "",
        consumer_claim: str = "sub",
        max_entries: int = MAX_ENTRIES,
        max_pending: int = MAX_PENDING,
        clock: Any = None,
        where: str = "auth.introspect",
    ) -> None:
        self.consumers = consumers
        self.client = client
        self.url = url
        self.client_id = client_id
        self._authorization = basic_credentials(client_id, client_secret)
        self.cache = cache
        self.header = header
        self.subprotocol = subprotocol
        self.query = query
        self.consumer_claim = consumer_claim
        self.max_entries = max_entries
        self.max_pending = max_pending
        self.pending = 0
        self.where = where
        self.challenge = 'Bearer realm="wssec"'
        self._clock = clock
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self.service = _Closer(client)
        #: Introspection requests sent, for tests and operators.
        self.requests = 0

    def __repr__(self) -> str:
        return f"<IntrospectionAuthenticator {self.url} client_id={self.client_id!r}>"

    def _now(self) -> float:
        if self._clock is None:
            return time.time()
        return float(self._clock.seconds())

    def authenticate(self, request: HandshakeRequest) -> Verdict | Deferred[Verdict]:
        found = find_bearer(request, self.header, self.subprotocol, self.query)
        if found is None or isinstance(found, Deny):
            return found
        token = found.value
        if not token:
            return Deny("empty token")
        if len(token) > MAX_TOKEN_LENGTH:
            return Deny("token too long")
        if not (token.isascii() and token.isprintable()):
            return Deny("malformed token")
        digest = hashlib.sha256(token.encode("ascii")).digest()
        entry = self._cache.get(digest)
        if entry is not None:
            now = self._now()
            if now < entry.until:
                if entry.not_before is not None and entry.not_before > now:
                    return Deny("token not yet valid")
                return Accept(entry.principal, entry.expires_at, found.credential)
            del self._cache[digest]
        if self.pending >= self.max_pending:
            return Deny("too many introspections in flight", status=503)
        self.requests += 1
        self.pending += 1
        body = urlencode({"token": token, "token_type_hint": "access_token"}).encode("ascii")
        asked = self.client.post_form(self.url, body, {"Authorization": self._authorization})
        asked.addBoth(self._done)
        return asked.addCallbacks(self._answered, self._failed, callbackArgs=(digest, found))

    def _done(self, result: Any) -> Any:
        self.pending -= 1
        return result

    def _failed(self, failure: Any) -> Verdict:
        error = failure.value
        if not isinstance(error, FetchError):
            self.log.failure("{where}: introspection failed", failure, where=self.where)
            return Deny("introspection failed")
        self.log.warn(
            "{where}: introspection at {url} failed: {error}",
            where=self.where,
            url=self.url,
            error=str(error),
        )
        return Deny("introspection unavailable")

    def _answered(self, fetched: Fetched, digest: bytes, found: Found) -> Verdict:
        if fetched.status in (401, 403):
            self.log.error(
                "{where}: the introspection endpoint refused our client credentials"
                " (HTTP {status}): check {where}.client_id and {where}.client_secret",
                where=self.where,
                status=fetched.status,
            )
            return Deny("introspection refused our client credentials")
        if fetched.status != 200:
            self.log.warn(
                "{where}: introspection at {url} answered HTTP {status}",
                where=self.where,
                url=self.url,
                status=fetched.status,
            )
            return Deny("introspection unavailable")
        try:
            claims = fetched.json()
        except FetchError:
            self.log.warn("{where}: introspection answer is not JSON", where=self.where)
            return Deny("introspection unavailable")
        if not isinstance(claims, dict):
            self.log.warn("{where}: introspection answer is not an object", where=self.where)
            return Deny("introspection unavailable")
        if claims.get("active") is not True:
            return Deny("token not active")
        now = self._now()
        for claim in ("exp", "nbf"):
            if claim in claims and not _is_numeric_date(claims[claim]):
                return Deny(f"introspection answer: {claim} is not a number")
        verdict = self._accept(claims, found, now)
        if isinstance(verdict, Accept) and self.cache > 0:
            until = now + self.cache
            if "exp" in claims:
                until = min(until, float(claims["exp"]))
            nbf = claims.get("nbf")
            entry = _Entry(
                verdict.principal,
                verdict.expires_at,
                None if nbf is None else float(nbf),
                until,
            )
            self._remember(digest, entry)
        return verdict

    def _remember(self, digest: bytes, entry: _Entry) -> None:
        self._cache[digest] = entry
        self._cache.move_to_end(digest)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    def _accept(self, claims: dict[str, Any], found: Found, now: float) -> Verdict:
        exp = claims.get("exp")
        if exp is not None and float(exp) <= now:
            return Deny("token expired")
        nbf = claims.get("nbf")
        if nbf is not None and float(nbf) > now:
            return Deny("token not yet valid")
        name = claims.get(self.consumer_claim)
        if not isinstance(name, str):
            return Deny(f"introspection answer has no string {self.consumer_claim}")
        consumer = self.consumers.by_name(name)
        if consumer is None:
            return Deny("token names an unknown consumer")
        return Accept(
            Principal(consumer.name, self.name, claims),
            expires_at=None if exp is None else float(exp),
            credential=found.credential,
        )


def _is_numeric_date(value: object) -> bool:
    if type(value) is int:
        return abs(value) < 2**53
    return type(value) is float and math.isfinite(value)


def build(section: Table, context: BuildContext) -> IntrospectionAuthenticator:
    """Build from C{[auth.introspect]}."""
    url = section.string("url", required=True)
    problem = https_problem(url)
    if problem:
        raise section.error("url", problem)
    client_id = section.string("client_id", required=True)
    if not client_id:
        raise section.error("client_id", "must not be empty")
    client_secret = section.string("client_secret", required=True)
    if not client_secret:
        raise section.error("client_secret", "must not be empty")
    cache = section.number("cache", 60)
    if cache > 86400:
        raise section.error("cache", "must be at most 86400")
    timeout = section.number("timeout", DEFAULT_TIMEOUT, minimum=0.1)
    max_entries = section.integer("max_entries", MAX_ENTRIES, minimum=1)
    max_pending = section.integer("max_pending", MAX_PENDING, minimum=1)
    ca = section.string("ca")
    trust_root = None
    if ca:
        try:
            trust_root = load_trust_root(context.base_dir / ca)
        except OSError as error:
            raise section.error("ca", f"cannot read: {error.strerror}") from None
        except ValueError as error:
            raise section.error("ca", str(error)) from None
    options = {
        "header": section.string("header", "Authorization"),
        "subprotocol": section.string("subprotocol", "bearer"),
        "query": section.string("query"),
        "consumer_claim": section.string("consumer_claim", "sub"),
    }
    section.finish()
    return IntrospectionAuthenticator(
        context.consumers,
        HTTPSClient(trust_root, timeout=timeout),
        url,
        client_id,
        client_secret,
        cache=cache,
        max_entries=max_entries,
        max_pending=max_pending,
        where=section.path,
        **options,
    )
