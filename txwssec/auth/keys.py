"""
API key authentication: a key in a header, in C{Sec-WebSocket-Protocol}
(C{token, <key>}, for browsers), or (only when enabled) in the query string.
"""

from __future__ import annotations

from zope.interface import implementer

from txwssec._schema import Table
from txwssec.auth._extract import first_found, is_printable_ascii
from txwssec.auth.context import BuildContext
from txwssec.consumers import ConsumerDirectory, key_digest
from txwssec.interfaces import IAuthenticator
from txwssec.types import Accept, Deny, HandshakeRequest, Principal, Verdict

#: Longer keys are refused without being looked up.
MAX_KEY_LENGTH = 512


@implementer(IAuthenticator)
class KeyAuthenticator:
    """
    Accepts a request that carries a consumer's API key.

    @param header: header to read first (C{""} turns it off).
    @param subprotocol: marker in C{Sec-WebSocket-Protocol} followed by the
        key (C{""} turns it off).
    @param query: query parameter to read last; off (C{""}) by default because
        query strings end up in logs.
    """

    name = "key"

    def __init__(
        self,
        consumers: ConsumerDirectory,
        header: str = "apikey",
        subprotocol: str = "token",
        query: str = "",
    ) -> None:
        self.consumers = consumers
        self.header = header
        self.subprotocol = subprotocol
        self.query = query
        self.challenge = f'ApiKey header="{header}"' if header else "ApiKey"

    def authenticate(self, request: HandshakeRequest) -> Verdict:
        found = first_found(request, self.header, self.subprotocol, self.query)
        if found is None or isinstance(found, Deny):
            return found
        key = found.value
        if len(key) > MAX_KEY_LENGTH or not is_printable_ascii(key):
            return Deny("malformed key")
        consumer = self.consumers.by_key(key)
        if consumer is None:
            return Deny("unknown key")
        principal = Principal(consumer.name, self.name, key=key_digest(key))
        return Accept(principal, credential=found.credential)


def build(section: Table, context: BuildContext) -> KeyAuthenticator:
    """Build from C{[auth.key]}."""
    authenticator = KeyAuthenticator(
        context.consumers,
        header=section.string("header", "apikey"),
        subprotocol=section.string("subprotocol", "token"),
        query=section.string("query", ""),
    )
    section.finish()
    if not (authenticator.header or authenticator.subprotocol or authenticator.query):
        raise section.error("header", "header, subprotocol and query are all off")
    return authenticator
