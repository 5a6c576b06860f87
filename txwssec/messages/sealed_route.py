"""
Sealed payloads on a server or gateway route: the handshake's step that
reads the client's offer and the route's L{Sealing} (400, 403), and the
operator's log line when a message does not open. The wire format and the
keys are L{txwssec.messages.sealing}.
"""

from __future__ import annotations

from twisted.logger import Logger

from txwssec.errors import Forbidden, MalformedHandshake
from txwssec.logs import bounded
from txwssec.messages.sealing import (
    OFFER_PREFIX,
    PROTOCOL,
    SealedSession,
    SealError,
    find_key,
    parse_offer,
    server_session,
)
from txwssec.policy import RoutePolicy

log = Logger(namespace="txwssec.server")


def negotiate_seal(
    route: RoutePolicy, consumer: str, offered: tuple[str, ...]
) -> tuple[SealedSession, bytes] | None:
    """
    Decide whether this session is sealed.

    @return: the server's side of the session and the hello to send first,
        or L{None} for a session in plaintext (the route's sealing is off,
        optional and not offered, or passed through to a gateway's
        upstream).
    @raise MalformedHandshake: an offer without C{wssec.sealed.v1}, or the
        reverse, or a malformed one (400).
    @raise Forbidden: the route requires sealing and the client did not
        offer it, or the consumer has no key with the offered id (403).
    """
    sealing = route.sealing
    wanted = PROTOCOL in offered
    if sealing.mode == "off":
        return None
    if route.upstream is not None and sealing.upstream == "passthrough":
        # The upstream seals: the offer goes to it untouched.
        if sealing.mode == "required" and not wanted:
            raise Forbidden(f"route requires {PROTOCOL}, not offered")
        return None
    try:
        offer = parse_offer(offered)
    except SealError as error:
        raise MalformedHandshake(f"Sec-WebSocket-Protocol: {error}") from None
    if offer is None or not wanted:
        if wanted or offer is not None:
            raise MalformedHandshake(
                f"Sec-WebSocket-Protocol: {PROTOCOL} needs one {OFFER_PREFIX}<...> entry and "
                "the reverse"
            )
        if sealing.mode == "required":
            raise Forbidden(f"route requires {PROTOCOL}, not offered")
        return None
    kid, client_nonce = offer
    key = find_key(sealing.keys.get(consumer, ()), kid)
    if key is None:
        raise Forbidden(f"no seal key with id {kid.hex()} for consumer {bounded(consumer)!r}")
    return server_session(key, client_nonce, route.path)


def is_seal_entry(entry: str) -> bool:
    """Whether a C{Sec-WebSocket-Protocol} entry belongs to the seal offer."""
    return entry == PROTOCOL or entry.startswith(OFFER_PREFIX)


def log_rejected(error: SealError, peer: str, route: str | None, consumer: str | None) -> None:
    """The operator's line for a sealed message that did not open (no key, no payload)."""
    log.warn(
        "sealed message rejected from {peer} on {route} ({consumer}): {check}",
        peer=peer,
        route=route,
        consumer=consumer,
        check=bounded(str(error)),
    )
