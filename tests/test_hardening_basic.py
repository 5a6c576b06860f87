"""
Basic authentication under a flood of password guesses: a consumer's own
login is still admitted and served first, whatever other addresses and
unknown user names have queued. Deterministic: the hasher is a function
whose results the test fires by hand, and nothing is timed.
"""

from __future__ import annotations

import base64

from twisted.internet.defer import Deferred

from txwssec import Accept, BasicAuthenticator, Consumer, ConsumerDirectory, Deny
from txwssec.passwords import hash_password
from txwssec.types import HandshakeRequest

STORED = hash_password("alice-password", "pbkdf2-sha256")
CONSUMERS = ConsumerDirectory(
    [Consumer("alice", password=STORED), Consumer("bob", password=STORED), Consumer("carol")]
)


class ManualHasher:
    """Records each check it is asked to run; the test fires them."""

    def __init__(self) -> None:
        self.started: list[tuple[str, Deferred[bool]]] = []

    def __call__(self, password: str, stored: str) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.started.append((password, d))
        return d

    def finish(self, index: int, ok: bool = False) -> None:
        self.started[index][1].callback(ok)


def request(host: str, user: str, password: str) -> HandshakeRequest:
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    return HandshakeRequest(
        peer=f"tcp4:{host}:1",
        host=host,
        path="/",
        query={},
        headers=(("authorization", f"Basic {encoded}"),),
        subprotocols=(),
    )


def authenticator(hasher: ManualHasher, **options: int) -> BasicAuthenticator:
    return BasicAuthenticator(CONSUMERS, max_pending=16, max_running=2, verify=hasher, **options)


def flood(method: BasicAuthenticator, user: str, addresses: int = 40) -> list[object]:
    """Two guesses from each of C{addresses} addresses (the attack's shape)."""
    return [
        method.authenticate(request(f"198.51.100.{n}", user, f"guess-{n}-{i}"))
        for n in range(addresses)
        for i in range(2)
    ]


def test_consumer_login_admitted_and_served_first_during_unknown_user_flood() -> None:
    hasher = ManualHasher()
    method = authenticator(hasher)
    answers = flood(method, "nobody")
    login = method.authenticate(request("192.0.2.1", "alice", "alice-password"))
    assert isinstance(login, Deferred), login  # not refused with 503
    admitted = [a for a in answers if isinstance(a, Deferred)]
    refused = [a for a in answers if isinstance(a, Deny)]
    # Unknown names hold at most half the budget; the rest get 503.
    assert len(admitted) == 8
    assert {(d.status, d.reason) for d in refused} == {
        (503, "too many password checks pending for unknown users")
    }
    assert len(hasher.started) == 2  # the pool is saturated
    results: list[object] = []
    login.addCallback(results.append)
    # The next free slot goes to the consumer's check, not to the 6 waiting
    # attacker checks queued before it.
    hasher.finish(0)
    assert [password for password, _ in hasher.started] == [
        "guess-0-0",
        "guess-0-1",
        "alice-password",
    ]
    hasher.finish(2, ok=True)
    (accepted,) = results
    assert isinstance(accepted, Accept)
    assert accepted.principal.consumer == "alice"


def test_consumer_login_admitted_while_another_consumer_is_guessed() -> None:
    """Guesses at bob's password from 12 addresses do not starve alice."""
    hasher = ManualHasher()
    method = BasicAuthenticator(
        CONSUMERS, max_pending=32, max_running=2, max_per_consumer=4, verify=hasher
    )
    answers = flood(method, "bob", addresses=12)
    flood(method, "nobody")
    login = method.authenticate(request("192.0.2.1", "alice", "alice-password"))
    assert isinstance(login, Deferred), login  # not refused with 503
    # Each address's first check; second checks only while bob's share of 4
    # was not full (the first two addresses).
    assert sum(isinstance(a, Deferred) for a in answers) == 12 + 2
    assert {(a.status, a.reason) for a in answers if isinstance(a, Deny)} == {
        (429, "too many password checks at once for this consumer")
    }
    results: list[object] = []
    login.addCallback(results.append)
    while not results:
        pending = [i for i, (_, d) in enumerate(hasher.started) if not d.called]
        hasher.finish(pending[0], ok=hasher.started[pending[0]][0] == "alice-password")
    assert isinstance(results[0], Accept)


def test_addresses_take_turns() -> None:
    """Within a class, the queue serves one check per address in turn."""
    hasher = ManualHasher()
    method = BasicAuthenticator(CONSUMERS, max_running=1, max_per_address=3, verify=hasher)
    for n in range(3):
        method.authenticate(request("203.0.113.1", "nobody", f"a{n}"))
    method.authenticate(request("203.0.113.2", "nobody", "b0"))
    for index in range(4):
        hasher.finish(index)
    assert [password for password, _ in hasher.started] == ["a0", "a1", "b0", "a2"]


def test_ipv6_addresses_of_one_64_share_the_per_address_cap() -> None:
    hasher = ManualHasher()
    method = authenticator(hasher)
    assert isinstance(method.authenticate(request("2001:db8::1", "nobody", "x")), Deferred)
    assert isinstance(method.authenticate(request("2001:db8::2", "nobody", "x")), Deferred)
    third = method.authenticate(request("2001:db8::3", "nobody", "x"))
    assert isinstance(third, Deny) and third.status == 429
    assert isinstance(method.authenticate(request("2001:db8:1::1", "nobody", "x")), Deferred)


def test_counters_return_to_zero() -> None:
    hasher = ManualHasher()
    method = authenticator(hasher)
    flood(method, "alice", addresses=3)
    flood(method, "nobody", addresses=3)
    for _ in range(100):
        pending = [i for i, (_, d) in enumerate(hasher.started) if not d.called]
        if not pending:
            break
        hasher.finish(pending[0])
    assert not method._in_flight and not method._per_consumer and method._unknown == 0
    assert method._queue.running == 0 and len(method._queue) == 0
