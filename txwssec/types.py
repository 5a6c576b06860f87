"""
Frozen value types that flow through the handshake pipeline.

An authenticator receives a L{HandshakeRequest} and returns an L{Accept}, a
L{Deny}, or L{None} when the request carries no credential of its kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography import x509


def _no_claims() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class HandshakeRequest:
    """
    The parts of a WebSocket opening handshake that security decisions need.

    @ivar peer: the client's address as C{"tcp4:1.2.3.4:5678"}.
    @ivar host: the client's IP address (after trusted X-Forwarded-For hops).
    @ivar path: the request path, without the query string.
    @ivar query: query parameters, each name mapped to all its values.
    @ivar headers: every header line in arrival order, names lower-cased.
    @ivar subprotocols: the entries of C{Sec-WebSocket-Protocol}, in order.
    @ivar secure: whether the connection arrived over TLS.
    @ivar peer_certificate: the client certificate presented over TLS and
        verified by OpenSSL against the listener's C{client_ca}, or L{None}.
    """

    peer: str
    host: str
    path: str
    query: Mapping[str, tuple[str, ...]]
    headers: tuple[tuple[str, str], ...]
    subprotocols: tuple[str, ...]
    secure: bool = False
    peer_certificate: x509.Certificate | None = None

    def header_values(self, name: str) -> tuple[str, ...]:
        """
        All values of header C{name} (case-insensitive), in arrival order.
        """
        wanted = name.lower()
        return tuple([value for key, value in self.headers if key == wanted])


@dataclass(frozen=True)
class Principal:
    """
    Who is on the other end of a connection.

    @ivar consumer: the consumer name from the configuration.
    @ivar method: the name of the authentication method that accepted it.
    @ivar claims: verified claims (JWT payload), empty for other methods.
    @ivar key: the SHA-256 digest of the server-side key that accepted the
        credential, when the method has one: the consumer's API key
        (C{key}), the verification key (C{jwt}). A reload closes the
        sessions whose key is gone (see L{txwssec.lifecycle}). Never logged.
        A session opened with a one-time ticket (method C{ticket}) has the
        issuing credential's C{key} and the claims revocations read
        (C{jti}, C{iat}, C{exp}; see L{txwssec.tickets}).
    @ivar issued_by: for a session opened with a one-time ticket, the method
        that authenticated the credential the ticket was issued to (C{key},
        C{jwt}...); L{None} otherwise.
    """

    consumer: str
    method: str
    claims: Mapping[str, Any] = field(default_factory=_no_claims)
    key: bytes | None = field(default=None, repr=False, compare=False)
    issued_by: str | None = None


@dataclass(frozen=True)
class Credential:
    """
    Where an accepted credential was carried, so it can be consumed: never
    echoed to the client and never forwarded upstream.

    @ivar header: the header that carried it, lower-cased, if any.
    @ivar query: the query parameter that carried it, if any.
    @ivar subprotocols: the C{Sec-WebSocket-Protocol} entries that carried it
        (the marker and the secret).
    @ivar marker: the subprotocol to answer with when the credential came
        through C{Sec-WebSocket-Protocol} and no application subprotocol is
        chosen (C{"token"}, C{"bearer"}).
    """

    header: str | None = None
    query: str | None = None
    subprotocols: tuple[str, ...] = ()
    marker: str | None = None


@dataclass(frozen=True)
class Accept:
    """
    An authenticator's verdict: the credential is valid.

    @ivar principal: who authenticated.
    @ivar expires_at: POSIX time at which the credential stops being valid,
        or L{None} if it does not expire.
    @ivar credential: where the credential was carried.
    """

    principal: Principal
    expires_at: float | None = None
    credential: Credential = field(default_factory=Credential)


@dataclass(frozen=True)
class Deny:
    """
    An authenticator's verdict: a credential of its kind is present but is
    not acceptable.

    @ivar reason: a short text for the operator's log. It must never contain
        the credential. The client never sees it.
    @ivar status: 401 for a missing or invalid credential, 403 for a valid
        credential that is not allowed here, 400 for an ambiguous one, 429
        or 503 when the method cannot take more work now.
    """

    reason: str
    status: int = 401


Verdict = Accept | Deny | None
