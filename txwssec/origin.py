"""
The Origin allow-list that stops cross-site WebSocket hijacking (CSWSH).

Origins are compared exactly on scheme, host and port (default ports made
explicit). A request without an Origin header (a non-browser client) is
allowed. C{null} is refused unless listed. C{"*"} allows every origin.
With no list at all, only same-origin browser requests are allowed: the
Origin must name the host the request was sent to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

Origin = tuple[str, str, int] | str  # (scheme, host, port), or "null"


def parse_origin(text: str) -> Origin:
    """
    Normalise an origin (C{scheme://host[:port]}, or C{null}).

    @raise ValueError: if C{text} is not an origin (paths, user info and
        queries are not allowed).
    """
    text = text.strip()
    if text == "null":
        return "null"
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("origin scheme must be http, https, ws or wss")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError("an origin is scheme://host[:port] only")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError("origin has no host")
    port = parts.port or _DEFAULT_PORTS[scheme]
    return (scheme, host, port)


@dataclass(frozen=True)
class OriginPolicy:
    """
    Which browser origins may open a connection.

    @ivar allowed: normalised allowed origins.
    @ivar any_origin: C{"*"} was listed.
    @ivar same_origin_only: no list was given.
    """

    allowed: frozenset[Origin] = frozenset()
    any_origin: bool = False
    same_origin_only: bool = True
    #: Header values accepted as written, without parsing (the configured
    #: texts, already normalised: a browser sends exactly these).
    allowed_texts: frozenset[str] = frozenset()

    @classmethod
    def from_list(cls, origins: Iterable[str] | None) -> OriginPolicy:
        """
        Build from configured origin texts; L{None} means same-origin only.

        @raise ValueError: for an entry that is not an origin.
        """
        if origins is None:
            return cls()
        entries = list(origins)
        allowed = frozenset(parse_origin(o) for o in entries if o != "*")
        return cls(
            allowed=allowed,
            any_origin="*" in entries,
            same_origin_only=False,
            allowed_texts=frozenset(_browser_form(o) for o in allowed if o != "null"),
        )

    def allows(self, origin_header: str | None, host_header: str, secure: bool) -> bool:
        """
        Whether a request with this Origin header (L{None} when absent) may
        connect. C{host_header} and C{secure} define "same origin".
        """
        if origin_header is None:
            return True
        if self.any_origin or origin_header in self.allowed_texts:
            return True
        try:
            origin = parse_origin(origin_header)
        except ValueError:
            return False
        if self.same_origin_only:
            return origin != "null" and origin == _request_origin(host_header, secure)
        return origin in self.allowed


def _request_origin(host_header: str, secure: bool) -> Origin | None:
    scheme = "https" if secure else "http"
    try:
        return parse_origin(f"{scheme}://{host_header}")
    except ValueError:
        return None


def _browser_form(origin: Origin) -> str:
    """
    The Origin header a browser sends for C{origin} (RFC 6454 section 6.1:
    lower-case scheme and host, the port only when not the default).
    """
    if isinstance(origin, str):
        return origin
    scheme, host, port = origin
    if ":" in host:
        host = f"[{host}]"
    if port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"
