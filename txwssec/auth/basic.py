"""
HTTP Basic authentication against scrypt / PBKDF2 password hashes.
"""

from __future__ import annotations

import base64
import binascii
from collections import Counter

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
from txwssec.passwords import DUMMY_HASH, dummy_hash_like, verify_password
from txwssec.types import Accept, Deny, HandshakeRequest, Principal, Verdict

#: Longer Authorization values are refused without being decoded.
MAX_CREDENTIALS_LENGTH = 1024


@implementer(IAuthenticator)
class BasicAuthenticator:
    """
    Accepts C{Authorization: Basic ...} for consumers that have a password.

    Hashes are verified in the reactor's thread pool. An unknown user name
    costs the same hash as a known one (with the parameters of the first
    configured password), and gets the same answer.

    Hashing is deliberately slow, so the work in flight is bounded: at most
    C{max_per_address} verifications per client address (more at once get
    429, and do not wait in the queue) and C{max_pending} in all (503).
    Without that, a burst of concurrent guesses would all be hashed before
    the first failure counts towards C{auth_failures_per_minute}.
    """

    name = "basic"
    #: The header this method reads credentials from (the gateway strips it).
    credential_headers = ("authorization",)

    def __init__(
        self,
        consumers: ConsumerDirectory,
        realm: str = "wssec",
        reactor: IReactorThreads | None = None,
        max_per_address: int = 2,
        max_pending: int = 64,
    ) -> None:
        self.consumers = consumers
        self.realm = realm
        self.challenge = f'Basic realm="{realm}", charset="UTF-8"'
        self._reactor = reactor
        self.max_per_address = max_per_address
        self.max_pending = max_pending
        self._in_flight: Counter[str] = Counter()
        stored = [c.password for c in consumers.names().values() if c.password]
        self._dummy = dummy_hash_like(stored[0]) if stored else DUMMY_HASH

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
        host = request.host
        if self._in_flight[host] >= self.max_per_address:
            return Deny("too many password checks at once from this address", status=429)
        if self._in_flight.total() >= self.max_pending:
            return Deny("too many password checks pending", status=503)
        consumer = self.consumers.by_name(user)
        stored = consumer.password if consumer is not None else None
        credential = found.credential

        def verified(ok: bool) -> Verdict:
            if ok and stored is not None:
                return Accept(Principal(user, self.name), credential=credential)
            return Deny("wrong user name or password")

        def done(result: bool) -> bool:
            self._in_flight[host] -= 1
            if not self._in_flight[host]:
                del self._in_flight[host]
            return result

        self._in_flight[host] += 1
        reactor = self._reactor or default_reactor()
        d: Deferred[bool] = deferToThreadPool(
            reactor,
            reactor.getThreadPool(),
            verify_password,
            password,
            stored or self._dummy,
        )
        return d.addBoth(done).addCallback(verified)


def build(section: Table, context: BuildContext) -> BasicAuthenticator:
    """Build from C{[auth.basic]}."""
    realm = section.string("realm", "wssec")
    section.finish()
    if not realm.isprintable() or '"' in realm or "\\" in realm:
        raise section.error("realm", "must be printable and contain no quotes or backslashes")
    return BasicAuthenticator(context.consumers, realm=realm)
