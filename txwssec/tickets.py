"""
One-time tickets (routes with C{tickets = true}): a client authenticated by
the route's methods (C{POST <path>}) gets an opaque ticket, which opens one
WebSocket session as the same consumer (C{GET <path>?ticket=<ticket>}),
within C{ticket_ttl} seconds and never past the issuing credential's
expiry. The HTTP side is L{txwssec.server.ticketing}.

Tickets are 256 random bits (C{secrets.token_urlsafe(32)}). The state
store keeps only their SHA-256 (L{ticket_key}), with the consumer, the
method that authenticated the issuing request, the route and the issuing
credential's expiry; redeeming one takes it from the store
(C{take_ticket}: atomic, so that of two handshakes racing with one ticket
exactly one gets it). A ticket is never logged.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from typing import Any

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


def ticket_key(ticket: str) -> str:
    """The state store's key for C{ticket}: its SHA-256, never the ticket."""
    return "ticket:" + hashlib.sha256(ticket.encode("utf-8", "replace")).hexdigest()


def issue(store: StateStore, route: RoutePolicy, accept: Accept, now: float) -> tuple[str, float]:
    """
    A new ticket for C{accept}'s consumer on C{route}.

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
    }
    store.put_ticket(ticket_key(ticket), value, now + ttl, now)
    return ticket, ttl


def redeem(
    store: StateStore, route: RoutePolicy, request: HandshakeRequest, now: float
) -> Accept | None:
    """
    The session a ticket in C{request}'s query opens, if it carries one.

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
    if value is None or value.get("route") != route.path:
        raise Unauthorized("unknown, used or expired ticket")
    expires_at = value.get("expires_at")
    return Accept(
        Principal(str(value["consumer"]), TICKET_METHOD),
        expires_at=None if expires_at is None else float(expires_at),
        credential=Credential(query=TICKET_QUERY),
    )
