"""
Exceptions, close codes, and the one place that turns a refusal into bytes.

Every refusal of an opening handshake is a L{HandshakeRefused}. Its C{reason}
goes to the operator's log; the client only ever receives the fixed text of
L{FIXED_BODIES} for the status.
"""

from __future__ import annotations

from enum import IntEnum
from http import HTTPStatus


class CloseCode(IntEnum):
    """
    WebSocket close codes used by txwssec (see docs/guide.rst, "HTTP statuses and close codes").
    """

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    CREDENTIALS_EXPIRED = 3000
    FORBIDDEN = 3003
    TIMEOUT = 3008


#: The body sent with each refusal status. Nothing else ever reaches a client.
FIXED_BODIES: dict[int, str] = {
    400: "bad request",
    401: "authentication required",
    403: "forbidden",
    404: "not found",
    405: "method not allowed",
    426: "upgrade required",
    429: "too many requests",
    431: "request header fields too large",
    500: "internal error: see server log",
    502: "bad gateway",
    503: "service unavailable",
    504: "gateway timeout",
    505: "http version not supported",
}


class TxWSSecError(Exception):
    """
    Base class of every txwssec exception.
    """


class ConfigError(TxWSSecError):
    """
    The configuration is invalid. C{str()} names the key path, for example
    C{route[0].auth: unknown method "kerberos"}.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


class HandshakeRefused(TxWSSecError):
    """
    The opening handshake is refused with an HTTP status.

    @ivar status: the HTTP status code.
    @ivar reason: why, for the operator's log only.
    @ivar headers: extra response headers, such as C{WWW-Authenticate}.
    @ivar method: the authentication method that refused, if one did.
    @ivar counter: the name under which the refusal is counted, when it is
        a limit (C{"limit.max_connections"}...).
    """

    status = 400
    method: str | None = None

    def __init__(
        self,
        reason: str,
        headers: tuple[tuple[str, str], ...] = (),
        status: int | None = None,
        *,
        counter: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.headers = headers
        self.counter = counter
        if status is not None:
            self.status = status


class MalformedHandshake(HandshakeRefused):
    """400: the upgrade request is malformed or ambiguous."""

    status = 400


class Unauthorized(HandshakeRefused):
    """401: credentials are missing or invalid."""

    status = 401


class Forbidden(HandshakeRefused):
    """403: origin refused, or the consumer is not allowed on this route."""

    status = 403


class RouteNotFound(HandshakeRefused):
    """404: no route serves this path."""

    status = 404


class TooManyRequests(HandshakeRefused):
    """429: this client has too many connections or handshakes."""

    status = 429


class HeaderFieldsTooLarge(HandshakeRefused):
    """431: the handshake's header block is too large or has too many lines."""

    status = 431


class ServiceUnavailable(HandshakeRefused):
    """503: the server is at capacity."""

    status = 503


def http_refusal(status: int, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """
    Render an HTTP error response with the fixed body for C{status}.
    """
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body = (FIXED_BODIES.get(status, "error") + "\n").encode("ascii")
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
    ]
    lines.extend(f"{name}: {value}" for name, value in headers)
    head = "\r\n".join(lines) + "\r\n\r\n"
    return head.encode("latin-1") + body
