"""
One-time tickets (routes with C{tickets = true}): a client authenticated by
the route's methods (C{POST <path>}) gets an opaque ticket, which opens one
WebSocket session as the same consumer (C{GET <path>?ticket=<ticket>}),
within C{ticket_ttl} seconds and never past the issuing credential's
expiry. The HTTP side is L{txwssec.server.ticketing}.

Tickets are 256 random bits (C{secrets.token_urlsafe(32)}). The state
store keeps only their SHA-256 (L{ticket_key}), with the consumer, the
method that authenticated the issuing request, the route, the issuing
credential's expiry and its identity: the claims revocations read
(C{jti}, C{iat}, C{exp}) and the digest of the key that accepted it
(L{Principal.key}, never logged); redeeming one takes it from the store
(C{take_ticket}: atomic, so that of two handshakes racing with one ticket
exactly one gets it). A ticket is never logged.

A ticket stands for its issuing credential: the session it opens has the
method C{ticket}, and a principal with the issuer's claims, key and method
(L{Principal.issued_by}). So a revoked token gets no ticket, a ticket
whose token was revoked since does not open (the handshake's revocation
check), a revocation closes the session it opened (L{txwssec.ops.admin}),
and once a reload removes its key or consumer (L{txwssec.lifecycle}) the
ticket no longer opens (L{redeem}) and its session closes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred

from txwssec.consumers import key_digest
from txwssec.errors import MalformedHandshake, Unauthorized
from txwssec.policy import RoutePolicy
from txwssec.store import StateStore
from txwssec.types import Accept, Credential, HandshakeRequest, Principal

#: The longest C{ticket_ttl} a route may set (seconds).
MAX_TICKET_TTL = 300.0

#: The query parameter that carries a ticket.
TICKET_QUERY = "ticket"

#: The method name of a session opened with a ticket.
TICKET_METHOD = "ticket"

#: Longer values of the C{ticket} parameter are refused unread.
_MAX_TICKET_LENGTH = 128

#: The issuing credential's claims a ticket keeps (those revocations read).
_CLAIMS = ("jti", "iat", "exp")


def ticket_key(ticket: str) -> str:
    """The state store's key for C{ticket}: its SHA-256, never the ticket."""
    return "ticket:" + hashlib.sha256(ticket.encode("utf-8", "replace")).hexdigest()


def issue(
    store: StateStore, route: RoutePolicy, accept: Accept, now: float
) -> tuple[str, float] | Deferred[tuple[str, float]]:
    """
    A new ticket for C{accept}'s consumer on C{route} (a L{Deferred} of it
    when the store answers later: the ticket is handed out once stored).

    @return: the ticket and its lifetime in seconds (the route's
        C{ticket_ttl}, or less when the credential expires sooner).
    @raise Unauthorized: the credential has already expired.
    """
    ttl = route.ticket_ttl
    if accept.expires_at is not None:
        ttl = min(ttl, accept.expires_at - now)
    if ttl <= 0:
        raise Unauthorized("credential expired before the ticket could be issued")
    ticket = secrets.token_urlsafe(32)
    principal = accept.principal
    value: Mapping[str, Any] = {
        "route": route.path,
        "consumer": principal.consumer,
        "method": principal.method,
        "expires_at": accept.expires_at,
        "claims": {name: principal.claims[name] for name in _CLAIMS if name in principal.claims},
        "key": None if principal.key is None else principal.key.hex(),
    }
    stored = store.put_ticket(ticket_key(ticket), value, now + ttl, now)
    if isinstance(stored, Deferred):
        return stored.addCallback(lambda _: (ticket, ttl))
    return ticket, ttl


def redeem(
    store: StateStore, route: RoutePolicy, request: HandshakeRequest, now: float
) -> Accept | Deferred[Accept] | None:
    """
    The session a ticket in C{request}'s query opens, if it carries one (a
    L{Deferred} of it when the store answers later).

    @raise Unauthorized: an unknown, used or expired ticket, or one of
        another route (401).
    @raise MalformedHandshake: the parameter sent twice (400).
    """
    values = request.query.get(TICKET_QUERY, ())
    if not values:
        return None
    if len(values) > 1:
        raise MalformedHandshake("query parameter ticket sent more than once")
    ticket = values[0]
    if not 0 < len(ticket) <= _MAX_TICKET_LENGTH:
        raise Unauthorized("malformed ticket")
    value = store.take_ticket(ticket_key(ticket), now)
    if isinstance(value, Deferred):
        return value.addCallback(_opens, route)
    return _opens(value, route)


def _opens(value: Mapping[str, Any] | None, route: RoutePolicy) -> Accept:
    """The session a taken ticket's C{value} opens on C{route}."""
    if value is None or value.get("route") != route.path:
        raise Unauthorized("unknown, used or expired ticket")
    expires_at = value.get("expires_at")
    claims = value.get("claims")
    key = value.get("key")
    principal = Principal(
        str(value["consumer"]),
        TICKET_METHOD,
        claims=dict(claims) if isinstance(claims, Mapping) else {},
        key=bytes.fromhex(key) if isinstance(key, str) else None,
        issued_by=str(value["method"]),
    )
    if not issuer_known(route, principal):
        raise Unauthorized("ticket's credential no longer accepted")
    return Accept(
        principal,
        expires_at=None if expires_at is None else float(expires_at),
        credential=Credential(query=TICKET_QUERY),
    )


def issuer_known(route: RoutePolicy, principal: Principal) -> bool:
    """
    Whether one of C{route}'s methods named C{principal.issued_by} still
    knows the ticket's consumer and the key that accepted its issuing
    credential (L{Principal.key}: the consumer's API key, its password, the
    JWT verification key): after a reload that removed them, it does not.
    """
    issued_by, name, digest = principal.issued_by, principal.consumer, principal.key
    for method in route.authenticators:
        if getattr(method, "name", None) != issued_by:
            continue
        consumers = getattr(method, "consumers", None)
        consumer = consumers.by_name(name) if consumers is not None else None
        if consumers is not None and consumer is None:
            continue
        if digest is None:
            return True
        if issued_by == "key":
            if consumer is not None and digest in consumer.key_digests:
                return True
        elif issued_by == "basic":
            password = consumer.password if consumer is not None else None
            if password is not None and hmac.compare_digest(digest, key_digest(password)):
                return True
        elif getattr(method, "key_digest", None) == digest:
            return True
    return False
