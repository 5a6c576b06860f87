"""
Token revocations, kept in the state store (L{txwssec.store}) so that every
process sees them: a token by its C{jti} until it expires, or every token
of a consumer issued (C{iat}) before a time.

The store keeps a revocation as a key and an end (C{revoke(key, until,
now)}, C{revoked(key, now)}). A consumer's revocation is kept under
C{consumer:<name>} until C{issued_before + HORIZON}; a token issued at
C{iat} is revoked when C{revoked(key, iat + HORIZON)} holds, that is when
C{iat < issued_before}, while C{revoked(key, now)} holds too (L{HORIZON}
after C{issued_before}: tokens issued before it have expired by then, when
their lifetime is shorter). A backend must therefore compare C{until} with the
C{now} it is given, as L{txwssec.store.MemoryStore} does.

The check applies to principals authenticated by a token: whose claims
have an C{exp} (the C{jwt} method's always do; a client certificate's
claims do not). A token without C{iat} counts as issued before any
consumer revocation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from txwssec.errors import Unauthorized
from txwssec.policy import RoutePolicy
from txwssec.store import StateStore
from txwssec.types import Principal

#: How long a consumer's revocation lasts after its C{issued_before}: 30
#: days, longer than any token lifetime it is meant for.
HORIZON = 30 * 86400.0


class Revocations:
    """
    Revoke tokens and ask whether a principal's token is revoked.

    @param store: the state store.
    @param clock: the reactor's clock.
    """

    def __init__(self, store: StateStore, clock: IReactorTime) -> None:
        self.store = store
        self.clock = clock

    def revoke_token(self, jti: str, expires_at: float) -> Deferred[None] | None:
        """
        Revoke the token with id C{jti} until C{expires_at} (its C{exp}): a
        L{Deferred} that fires once stored, when the store is another
        process's.
        """
        return self.store.revoke(f"jti:{jti}", expires_at, self.clock.seconds())

    def revoke_consumer(self, consumer: str, issued_before: float) -> Deferred[None] | None:
        """Revoke every token of C{consumer} issued before C{issued_before} (as above)."""
        return self.store.revoke(
            f"consumer:{consumer}", issued_before + HORIZON, self.clock.seconds()
        )

    def is_revoked(self, principal: Principal) -> bool:
        """Whether C{principal}'s token (its claims) is revoked now."""
        claims = principal.claims
        if "exp" not in claims:
            return False
        store, now = self.store, self.clock.seconds()
        jti = claims.get("jti")
        if isinstance(jti, str) and store.revoked(f"jti:{jti}", now):
            return True
        key = f"consumer:{principal.consumer}"
        # A revocation of the consumer lasts (now), and is of a later time
        # than the token's iat (without iat: any revocation that lasts).
        if not store.revoked(key, now):
            return False
        iat = _issued(claims)
        return iat is None or store.revoked(key, iat + HORIZON)

    def refuse(self, principal: Principal, route: RoutePolicy) -> None:
        """
        Refuse C{principal} on C{route} if its token is revoked: the check of
        a handshake, a ticket's issue and its redemption.

        @raise Unauthorized: revoked (401, with the route's methods' challenges).
        """
        if not self.is_revoked(principal):
            return
        challenges = [a.challenge for a in route.authenticators if a.challenge]
        revoked = Unauthorized("token revoked", tuple(("WWW-Authenticate", c) for c in challenges))
        revoked.method = principal.method
        raise revoked


def matches(
    principal: Principal,
    *,
    jti: str | None = None,
    consumer: str | None = None,
    issued_before: float | None = None,
) -> bool:
    """
    Whether a live session's C{principal} matches a revocation: its token's
    C{jti}, or its C{consumer} and a token issued before C{issued_before}.
    """
    claims = principal.claims
    if "exp" not in claims:
        return False
    if jti is not None:
        return claims.get("jti") == jti
    if consumer is None or issued_before is None:
        return False
    iat = _issued(claims)
    return principal.consumer == consumer and (iat is None or iat < issued_before)


def _issued(claims: Mapping[str, Any]) -> float | None:
    """A token's C{iat}, if it has a number there."""
    iat = claims.get("iat")
    if isinstance(iat, int | float) and not isinstance(iat, bool):
        return float(iat)
    return None
