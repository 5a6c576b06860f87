"""
The authenticator interface, as a zope.interface and as a typing.Protocol.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from txwssec.types import HandshakeRequest, Verdict


class IAuthenticator(Interface):
    """
    Decides whether an opening handshake carries a valid credential.
    """

    name = Attribute("The method name used in C{auth = [...]} and in logs.")
    challenge = Attribute(
        "The C{WWW-Authenticate} value sent with a 401, e.g. C{'Basic realm=\"x\"'}."
    )
    # Optional: credential_headers, credential_queries, credential_markers
    # (tuples of names) tell the gateway what to strip and the subprotocol
    # negotiation what never to echo; see txwssec.auth.credentials.

    def authenticate(request: HandshakeRequest) -> Verdict | Deferred[Verdict]:
        """
        Look for this method's credential in C{request}.

        @return: L{None} when no credential of this kind is present, an
            L{Accept} when it is valid, a L{Deny} when it is not; or a
            L{Deferred} firing with one of these. Raise only for bugs.
        """


@runtime_checkable
class Authenticator(Protocol):
    """
    The typing twin of L{IAuthenticator}, for static checking.
    """

    name: str
    challenge: str

    def authenticate(self, request: HandshakeRequest) -> Verdict | Deferred[Verdict]:
        """
        See L{IAuthenticator.authenticate}.
        """
