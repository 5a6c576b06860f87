"""
Running a route's authentication methods in order.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import maybeDeferred

from txwssec.errors import (
    Forbidden,
    HandshakeRefused,
    MalformedHandshake,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
)
from txwssec.interfaces import Authenticator
from txwssec.types import Accept, Deny, HandshakeRequest


async def authenticate(
    authenticators: Sequence[Authenticator], request: HandshakeRequest
) -> Accept:
    """
    Try C{authenticators} in order. The first that finds its credential
    decides: its L{Accept} is returned, its L{Deny} refuses. Later methods
    are not consulted after a L{Deny}, so a bad credential is never rescued
    by another one.

    @raise Unauthorized: no method found a credential, or one was invalid
        (401 with a C{WWW-Authenticate} challenge per method).
    @raise Forbidden: a method returned a 403 L{Deny}.
    @raise MalformedHandshake: a credential was ambiguous (400).
    """
    challenges = tuple(("WWW-Authenticate", a.challenge) for a in authenticators if a.challenge)
    for authenticator in authenticators:
        verdict = await maybeDeferred(authenticator.authenticate, request)
        if verdict is None:
            continue
        if isinstance(verdict, Accept):
            return verdict
        if not isinstance(verdict, Deny):
            raise TypeError(
                f"{authenticator.name} authenticator returned {type(verdict).__name__}"
            )
        reason = f"{authenticator.name}: {verdict.reason}"
        refusal: HandshakeRefused
        if verdict.status == 403:
            refusal = Forbidden(reason)
        elif verdict.status == 400:
            refusal = MalformedHandshake(reason)
        elif verdict.status == 429:
            refusal = TooManyRequests(reason, (("Retry-After", "1"),))
        elif verdict.status == 503:
            refusal = ServiceUnavailable(reason, (("Retry-After", "1"),))
        else:
            refusal = Unauthorized(reason, challenges)
        refusal.method = authenticator.name
        raise refusal
    raise Unauthorized("no credentials", challenges)
