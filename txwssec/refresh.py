"""
In-band credential refresh (routes with C{refresh = true}): what a refresh
message is, how the new credential is checked, and the messages the server
answers with. The protocols' side (the hook at the start of the message
path, the session's timers) is L{txwssec.server.refreshing}.

A client sends, as one text message::

    {"type": "wssec.refresh", "token": "<credential>"}

A text message is a refresh message when it is a JSON object whose first
member is C{"type": "wssec.refresh"} (L{is_refresh} looks at its first
L{PREFIX_BYTES} bytes only, so that every other message costs one bounded
regular expression match). Such a message is consumed: it never reaches
message validation, the application or a gateway's upstream. The answer is
C{{"type": "wssec.refreshed", "expires_at": N}} or
C{{"type": "wssec.refresh_rejected", "reason": "<fixed text>"}} (the
session is then left as it was); the reasons are the values of L{REASONS}
and never quote the message or the credential.

The credential is checked by the route's own methods, each in turn as if
the client had presented it where that method reads credentials (its
C{Sec-WebSocket-Protocol} marker, else its header, else its query
parameter); the first that accepts it decides. Methods with no such place
(C{tls}, C{anonymous}) cannot refresh a session.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from txwssec.auth.chain import authenticate
from txwssec.errors import HandshakeRefused
from txwssec.interfaces import Authenticator
from txwssec.types import Accept, HandshakeRequest

#: The largest refresh message (bytes); a longer one is rejected ("message
#: too large") unread.
MAX_REFRESH_BYTES = 16384

#: A session's refresh messages are checked at most once per this many
#: seconds; one sooner (or while one is being checked) is rejected
#: ("too many refreshes") without looking at its credential.
MIN_INTERVAL = 1.0

#: How much of a text message L{is_refresh} looks at.
PREFIX_BYTES = 96

_PREFIX = re.compile(
    rb'[ \t\r\n]*\{[ \t\r\n]*"type"[ \t\r\n]*:[ \t\r\n]*"wssec\.refresh"[ \t\r\n]*[,}]'
)

_NOTICE = re.compile(
    rb'[ \t\r\n]*\{[ \t\r\n]*"type"[ \t\r\n]*:[ \t\r\n]*'
    rb'"wssec\.(?:expiring|refreshed|refresh_rejected)"[ \t\r\n]*[,}]'
)

#: Outcome (for events and metrics) -> the reason the client is sent.
REASONS = {
    "too_large": "message too large",
    "malformed": "malformed refresh message",
    "rate_limited": "too many refreshes",
    "invalid": "invalid credential",
    "forbidden": "credential not allowed",
    "unavailable": "try again later",
}


class RefreshRejected(Exception):
    """
    A refresh that leaves the session as it was.

    @ivar outcome: a key of L{REASONS} (for events and metrics).
    @ivar reason: the fixed text the client is sent.
    @ivar detail: what the operator's log says (bounded, never the credential).
    """

    def __init__(self, outcome: str, detail: str = "") -> None:
        super().__init__(REASONS[outcome])
        self.outcome = outcome
        self.reason = REASONS[outcome]
        self.detail = detail or self.reason


class ConsumerChanged(Exception):
    """The new credential names another consumer: the session closes with 3003."""


def is_refresh(payload: bytes) -> bool:
    """Whether the text message C{payload} is a refresh message (by its start)."""
    return _PREFIX.match(payload, 0, PREFIX_BYTES) is not None


def is_notice(payload: bytes) -> bool:
    """
    Whether a server's text message is one of its refresh messages
    (C{wssec.expiring}, C{wssec.refreshed}, C{wssec.refresh_rejected}).
    """
    return _NOTICE.match(payload, 0, PREFIX_BYTES) is not None


def read_token(payload: bytes) -> str:
    """
    The credential of a refresh message.

    @raise RefreshRejected: too large, not a JSON object, no string token.
    """
    if len(payload) > MAX_REFRESH_BYTES:
        raise RefreshRejected("too_large")
    try:
        message: Any = json.loads(payload)
    except ValueError:
        raise RefreshRejected("malformed", "not JSON") from None
    if not isinstance(message, dict) or message.get("type") != "wssec.refresh":
        raise RefreshRejected("malformed", "not a refresh object")
    token = message.get("token")
    if not isinstance(token, str) or not token:
        raise RefreshRejected("malformed", "token missing or not a string")
    return token


def presented(
    authenticator: Authenticator, token: str, base: HandshakeRequest
) -> HandshakeRequest | None:
    """
    C{base} with C{token} where C{authenticator} reads credentials, or
    L{None} if it reads none of the three places.
    """
    marker = _first(authenticator, "subprotocol", "credential_markers")
    if marker:
        return replace(base, subprotocols=(marker, token))
    header = _first(authenticator, "header", "credential_headers")
    if header:
        value = f"Bearer {token}" if header.lower() == "authorization" else token
        return replace(base, headers=((header.lower(), value),))
    query = _first(authenticator, "query", "credential_queries")
    if query:
        return replace(base, query={query: (token,)})
    return None


def _first(authenticator: Authenticator, option: str, declared: str) -> str:
    value = getattr(authenticator, option, "")
    if isinstance(value, str) and value:
        return value
    names = tuple(getattr(authenticator, declared, ()))
    return str(names[0]) if names else ""


async def verify(
    authenticators: Sequence[Authenticator], token: str, base: HandshakeRequest
) -> Accept:
    """
    Check C{token} with C{authenticators} (see the module's docstring).

    @raise RefreshRejected: no method accepted it: C{invalid}, or
        C{forbidden} / C{unavailable} when a method said so.
    """
    statuses: list[int] = []
    for authenticator in authenticators:
        request = presented(authenticator, token, base)
        if request is None:
            continue
        try:
            verdict: Any = authenticate([authenticator], request)
            if not isinstance(verdict, Accept):
                verdict = await verdict
        except HandshakeRefused as refusal:
            statuses.append(refusal.status)
            continue
        accept: Accept = verdict
        return accept
    if any(status in (429, 503) for status in statuses):
        raise RefreshRejected("unavailable")
    if 403 in statuses:
        raise RefreshRejected("forbidden")
    raise RefreshRejected("invalid")


def _number(value: float | None) -> float | int | None:
    if value is not None and value == int(value):
        return int(value)
    return value


def refreshed(expires_at: float | None) -> bytes:
    """The C{wssec.refreshed} message."""
    return json.dumps({"type": "wssec.refreshed", "expires_at": _number(expires_at)}).encode()


def rejected(reason: str) -> bytes:
    """The C{wssec.refresh_rejected} message (C{reason}: a value of L{REASONS})."""
    return json.dumps({"type": "wssec.refresh_rejected", "reason": reason}).encode()


def expiring(expires_at: float) -> bytes:
    """The C{wssec.expiring} message."""
    return json.dumps({"type": "wssec.expiring", "expires_at": _number(expires_at)}).encode()
