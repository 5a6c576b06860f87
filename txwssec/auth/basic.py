"""
HTTP Basic authentication against scrypt / PBKDF2 password hashes.
"""

from __future__ import annotations

import base64
import binascii
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from txwssec._reactor import default_reactor
from txwssec._schema import Table
from txwssec.auth._extract import from_header
from txwssec.auth.context import BuildContext
from txwssec.consumers import ConsumerDirectory, key_digest
from txwssec.interfaces import IAuthenticator
from txwssec.limits import address_key
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
    C{max_per_address} verifications per client address (an IPv6 /64, see
    L{txwssec.limits.address_key}; more at once get 429, and do not wait in
    the queue) and C{max_pending} in all (503). Without that, a burst of
    concurrent guesses would all be hashed before the first failure counts
    towards C{auth_failures_per_minute}.

    So that a flood cannot starve the consumers' own logins, the budget is
    shared out: checks for user names that are not consumers with a
    password hold at most half of C{max_pending} (503 beyond). Checks for
    one consumer's name beyond C{max_per_consumer} are refused (429) only
    for an address that already has a check for that name in flight: an
    address's first check for a name is always admitted (within its own
    and the global caps), so guesses from many addresses at one name never
    lock that consumer out. At most C{max_running} hashes run at once; the
    others wait in a queue that serves consumers' names first, and takes
    turns between client addresses (round robin), so a new address waits
    behind at most one check per address already waiting. A waiting check
    whose L{Deferred} is cancelled (its client left) leaves the queue
    without being hashed.
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
        max_per_consumer: int = 8,
        max_running: int = 4,
        verify: Callable[[str, str], Deferred[bool]] | None = None,
    ) -> None:
        """
        @param verify: checks a password against a stored hash (default:
            L{verify_password} in the reactor's thread pool).
        """
        self.consumers = consumers
        self.realm = realm
        self.challenge = f'Basic realm="{realm}", charset="UTF-8"'
        self._reactor = reactor
        self.max_per_address = max_per_address
        self.max_pending = max_pending
        self.max_per_consumer = max_per_consumer
        self._in_flight: Counter[str] = Counter()
        self._per_consumer: Counter[str] = Counter()
        #: (consumer, address) -> checks in flight for that name from that address.
        self._per_consumer_address: Counter[tuple[str, str]] = Counter()
        self._unknown = 0
        self._queue = FairQueue(verify or self._verify_in_thread, max_running)
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
        host = address_key(request.host)
        if self._in_flight[host] >= self.max_per_address:
            return Deny("too many password checks at once from this address", status=429)
        consumer = self.consumers.by_name(user)
        stored = consumer.password if consumer is not None else None
        known = stored is not None
        if self._in_flight.total() >= self.max_pending:
            return Deny("too many password checks pending", status=503)
        if not known and self._unknown >= self.max_pending // 2:
            return Deny("too many password checks pending for unknown users", status=503)
        pair = (user, host)
        if (
            known
            and self._per_consumer[user] >= self.max_per_consumer
            and self._per_consumer_address[pair]
        ):
            # Only an address already checking this name is refused; a new
            # address gets its turn in the queue, so a flood of guesses from
            # many addresses cannot lock the consumer out.
            return Deny("too many password checks at once for this consumer", status=429)
        credential = found.credential

        def verified(ok: bool) -> Verdict:
            if ok and stored is not None:
                # The session records which password hash accepted it: a
                # reload that changes the password closes it (txwssec.lifecycle).
                principal = Principal(user, self.name, key=key_digest(stored))
                return Accept(principal, credential=credential)
            return Deny("wrong user name or password")

        def done(result: bool) -> bool:
            _decrement(self._in_flight, host)
            if known:
                _decrement(self._per_consumer, user)
                _decrement(self._per_consumer_address, pair)
            else:
                self._unknown -= 1
            return result

        self._in_flight[host] += 1
        if known:
            self._per_consumer[user] += 1
            self._per_consumer_address[pair] += 1
        else:
            self._unknown += 1
        d = self._queue.submit(host, known, password, stored or self._dummy)
        return d.addBoth(done).addCallback(verified)

    def _verify_in_thread(self, password: str, stored: str) -> Deferred[bool]:
        reactor = self._reactor or default_reactor()
        return deferToThreadPool(
            reactor, reactor.getThreadPool(), verify_password, password, stored
        )


def _decrement(counter: Counter[Any], key: object) -> None:
    counter[key] -= 1
    if not counter[key]:
        del counter[key]


_Job = tuple[str, str, "Deferred[bool]"]


class FairQueue:
    """
    Runs password checks at most C{max_running} at once. Waiting checks are
    served in two classes, consumers' names first, and within a class one
    check per client address in turn (round robin), so a client with many
    checks waiting delays another client by at most one check per turn.
    Cancelling a waiting check's L{Deferred} removes it from the queue: it
    is never hashed. A running hash cannot be stopped; it keeps its slot
    until it ends.
    """

    def __init__(self, run: Callable[[str, str], Deferred[bool]], max_running: int) -> None:
        self._run = run
        self.max_running = max(1, max_running)
        self.running = 0
        #: Per class (known, unknown): address -> its waiting checks, in turn order.
        self._waiting: tuple[dict[str, deque[_Job]], dict[str, deque[_Job]]] = ({}, {})

    def submit(self, address: str, known: bool, password: str, stored: str) -> Deferred[bool]:
        """Queue a check; fires with its result once it has run."""
        waiting = self._waiting[0 if known else 1]

        def cancel(result: Deferred[bool]) -> None:
            jobs = waiting.get(address)
            if jobs is None:
                return  # running: it keeps its slot until the hash ends
            for job in jobs:
                if job[2] is result:
                    jobs.remove(job)
                    break
            if not jobs:
                del waiting[address]

        result: Deferred[bool] = Deferred(cancel)
        waiting.setdefault(address, deque()).append((password, stored, result))
        self._start()
        return result

    def __len__(self) -> int:
        """Checks waiting (not running)."""
        return sum(len(jobs) for waiting in self._waiting for jobs in waiting.values())

    def _start(self) -> None:
        while self.running < self.max_running:
            job = self._next()
            if job is None:
                return
            password, stored, result = job
            self.running += 1
            self._run(password, stored).addBoth(self._finished, result)

    def _next(self) -> _Job | None:
        for waiting in self._waiting:
            if waiting:
                address = next(iter(waiting))
                jobs = waiting.pop(address)
                job = jobs.popleft()
                if jobs:
                    waiting[address] = jobs  # to the end of the turn
                return job
        return None

    def _finished(self, outcome: Any, result: Deferred[bool]) -> None:
        self.running -= 1
        self._start()
        if not result.called:  # not cancelled while it ran
            result.callback(outcome)


def build(section: Table, context: BuildContext) -> BasicAuthenticator:
    """Build from C{[auth.basic]}."""
    realm = section.string("realm", "wssec")
    section.finish()
    if not realm.isprintable() or '"' in realm or "\\" in realm:
        raise section.error("realm", "must be printable and contain no quotes or backslashes")
    return BasicAuthenticator(context.consumers, realm=realm)
