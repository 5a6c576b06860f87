"""
Running a route's authentication methods in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred

from txwssec._defer import is_waiting
from txwssec.errors import (
    Forbidden,
    HandshakeRefused,
    MalformedHandshake,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
)
from txwssec.interfaces import Authenticator
from txwssec.types import Accept, Deny, HandshakeRequest, Verdict


def authenticate(
    authenticators: Sequence[Authenticator], request: HandshakeRequest
) -> Accept | Deferred[Accept]:
    """
    Try C{authenticators} in order. The first that finds its credential
    decides: its L{Accept} is returned, its L{Deny} refuses. Later methods
    are not consulted after a L{Deny}, so a bad credential is never rescued
    by another one.

    Synchronous methods are called one after the other without a
    L{Deferred}; from the first method that returns a L{Deferred} or an
    awaitable on, the result is a L{Deferred} (and refusals are its
    failures).

    @raise Unauthorized: no method found a credential, or one was invalid
        (401 with a C{WWW-Authenticate} challenge per method).
    @raise Forbidden: a method returned a 403 L{Deny}.
    @raise MalformedHandshake: a credential was ambiguous (400).
    """
    return _tryFrom(authenticators, 0, request)


def _tryFrom(
    authenticators: Sequence[Authenticator], start: int, request: HandshakeRequest
) -> Accept | Deferred[Accept]:
    for index in range(start, len(authenticators)):
        verdict: Any = authenticators[index].authenticate(request)
        if is_waiting(verdict):
            waiting: Deferred[Verdict] = ensureDeferred(verdict)
            return waiting.addCallback(_decided, authenticators, index, request)
        if verdict is not None:
            return _decide(authenticators, index, verdict)
    raise Unauthorized("no credentials", _challenges(authenticators))


def _decided(
    verdict: Verdict,
    authenticators: Sequence[Authenticator],
    index: int,
    request: HandshakeRequest,
) -> Accept | Deferred[Accept]:
    if verdict is None:
        return _tryFrom(authenticators, index + 1, request)
    return _decide(authenticators, index, verdict)


def _decide(authenticators: Sequence[Authenticator], index: int, verdict: object) -> Accept:
    """Return an L{Accept}; raise the refusal a L{Deny} stands for."""
    if isinstance(verdict, Accept):
        return verdict
    authenticator = authenticators[index]
    if not isinstance(verdict, Deny):
        raise TypeError(f"{authenticator.name} authenticator returned {type(verdict).__name__}")
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
        refusal = Unauthorized(reason, _challenges(authenticators))
    refusal.method = authenticator.name
    raise refusal


def _challenges(authenticators: Sequence[Authenticator]) -> tuple[tuple[str, str], ...]:
    """One C{WWW-Authenticate} header per method that has a challenge."""
    return tuple(("WWW-Authenticate", a.challenge) for a in authenticators if a.challenge)
