"""
HTTP Basic authentication against scrypt / PBKDF2 password hashes.
"""

from __future__ import annotations

import base64
import binascii

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from txwssec._reactor import default_reactor
from txwssec._schema import Table
from txwssec.auth._extract import from_header
from txwssec.auth.context import BuildContext
from txwssec.consumers import ConsumerDirectory
from txwssec.interfaces import IAuthenticator
from txwssec.passwords import DUMMY_HASH, verify_password
from txwssec.types import Accept, Deny, HandshakeRequest, Principal, Verdict

#: Longer Authorization values are refused without being decoded.
MAX_CREDENTIALS_LENGTH = 1024


@implementer(IAuthenticator)
class BasicAuthenticator:
    """
    Accepts C{Authorization: Basic ...} for consumers that have a password.

    Hashes are verified in the reactor's thread pool. An unknown user name
    costs the same hash as a known one, and gets the same answer.
    """

    name = "basic"

    def __init__(
        self,
        consumers: ConsumerDirectory,
        realm: str = "wssec",
        reactor: IReactorThreads | None = None,
    ) -> None:
        self.consumers = consumers
        self.realm = realm
        self.challenge = f'Basic realm="{realm}", charset="UTF-8"'
        self._reactor = reactor

    def authenticate(self, request: HandshakeRequest) -> Verdict | Deferred[Verdict]:
        found = from_header(request, "authorization")
        if found is None or isinstance(found, Deny):
            return found
        scheme, _, encoded = found.value.partition(" ")
        if scheme.lower() != "basic":
            return None
        encoded = encoded.strip()
        if len(encoded) > MAX_CREDENTIALS_LENGTH:
            return Deny("basic credentials too long")
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return Deny("malformed basic credentials")
        user, colon, password = decoded.partition(":")
        if not colon:
            return Deny("malformed basic credentials")
        consumer = self.consumers.by_name(user)
        stored = consumer.password if consumer is not None else None
        credential = found.credential

        def verified(ok: bool) -> Verdict:
            if ok and stored is not None:
                return Accept(Principal(user, self.name), credential=credential)
            return Deny("wrong user name or password")

        reactor = self._reactor or default_reactor()
        d = deferToThreadPool(
            reactor,
            reactor.getThreadPool(),
            verify_password,
            password,
            stored or DUMMY_HASH,
        )
        return d.addCallback(verified)


def build(section: Table, context: BuildContext) -> BasicAuthenticator:
    """Build from C{[auth.basic]}."""
    realm = section.string("realm", "wssec")
    section.finish()
    if not realm.isprintable() or '"' in realm or "\\" in realm:
        raise section.error("realm", "must be printable and contain no quotes or backslashes")
    return BasicAuthenticator(context.consumers, realm=realm)
