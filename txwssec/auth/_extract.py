"""
Finding a credential in a handshake: one header, one query parameter, or a
C{Sec-WebSocket-Protocol} marker followed by the secret.
"""

from __future__ import annotations

from dataclasses import dataclass

from txwssec.types import Credential, Deny, HandshakeRequest


@dataclass(frozen=True)
class Found:
    """A credential value and where it was carried."""

    value: str
    credential: Credential


def from_header(request: HandshakeRequest, header: str) -> Found | Deny | None:
    """The single value of C{header}; two or more are ambiguous (400)."""
    if not header:
        return None
    values = request.header_values(header)
    if not values:
        return None
    if len(values) > 1:
        return Deny(f"{header} header sent {len(values)} times", status=400)
    return Found(values[0], Credential(header=header.lower()))


def from_subprotocol(request: HandshakeRequest, marker: str) -> Found | Deny | None:
    """The entry that follows C{marker} in C{Sec-WebSocket-Protocol}."""
    if not marker or marker not in request.subprotocols:
        return None
    index = request.subprotocols.index(marker)
    if index + 1 >= len(request.subprotocols):
        return Deny(f'Sec-WebSocket-Protocol has "{marker}" with no credential after it')
    value = request.subprotocols[index + 1]
    return Found(value, Credential(subprotocols=(marker, value), marker=marker))


def from_query(request: HandshakeRequest, parameter: str) -> Found | Deny | None:
    """The single value of query parameter C{parameter}, when enabled."""
    if not parameter:
        return None
    values = request.query.get(parameter, ())
    if not values:
        return None
    if len(values) > 1:
        return Deny(f"query parameter {parameter} sent {len(values)} times", status=400)
    return Found(values[0], Credential(query=parameter))


def first_found(
    request: HandshakeRequest, header: str, subprotocol: str, query: str
) -> Found | Deny | None:
    """
    The credential from the first place that has one: header, then
    C{Sec-WebSocket-Protocol}, then query string.
    """
    for found in (
        from_header(request, header),
        from_subprotocol(request, subprotocol),
        from_query(request, query),
    ):
        if found is not None:
            return found
    return None


def find_bearer(
    request: HandshakeRequest, header: str, subprotocol: str, query: str
) -> Found | Deny | None:
    """
    A bearer token: C{Bearer <token>} in C{header} (the C{Bearer} prefix is
    optional for a header other than C{Authorization}; another scheme in
    C{Authorization}, such as C{Basic}, is not a bearer token), else the
    entry after the C{subprotocol} marker, else the C{query} parameter.
    """
    found = from_header(request, header)
    if isinstance(found, Found):
        scheme, space, rest = found.value.partition(" ")
        if space and scheme.lower() == "bearer":
            return Found(rest.strip(), found.credential)
        if header.lower() != "authorization":
            return found
    elif found is not None:
        return found
    return from_subprotocol(request, subprotocol) or from_query(request, query)


def is_printable_ascii(value: str) -> bool:
    """Whether C{value} is non-empty visible ASCII (no spaces, no controls)."""
    return bool(value) and value.isascii() and value.isprintable() and " " not in value
