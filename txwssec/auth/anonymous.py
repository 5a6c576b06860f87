"""
The C{anonymous} method: no credential needed. It must be named explicitly
in a route's C{auth} list; a route never falls back to it.
"""

from __future__ import annotations

from zope.interface import implementer

from txwssec._schema import Table
from txwssec.auth.context import BuildContext
from txwssec.interfaces import IAuthenticator
from txwssec.types import Accept, HandshakeRequest, Principal, Verdict


@implementer(IAuthenticator)
class AnonymousAuthenticator:
    """Accepts every request as consumer C{"anonymous"}."""

    name = "anonymous"
    challenge = ""

    def authenticate(self, request: HandshakeRequest) -> Verdict:
        return Accept(Principal("anonymous", self.name))


def build(section: Table, context: BuildContext) -> AnonymousAuthenticator:
    """Build from C{[auth.anonymous]} (which takes no options)."""
    section.finish()
    return AnonymousAuthenticator()
