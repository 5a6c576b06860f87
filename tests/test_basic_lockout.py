"""
A targeted flood of wrong passwords for one consumer's name, from many
addresses, cannot lock that consumer out: its own login from another
address is admitted and served after at most one check per attacking
address. Deterministic: the hasher's results are fired by hand.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred

from tests.test_hardening_basic import ManualHasher, request
from txwssec import Accept, BasicAuthenticator, Consumer, ConsumerDirectory, Deny
from txwssec.passwords import hash_password

STORED = hash_password("john-password", "pbkdf2-sha256")
CONSUMERS = ConsumerDirectory([Consumer("john", password=STORED)])
ATTACKERS = [f"198.51.100.{n}" for n in range(12)]


def test_flood_on_a_name_from_many_addresses_does_not_lock_it_out() -> None:
    hasher = ManualHasher()
    method = BasicAuthenticator(CONSUMERS, verify=hasher)  # the defaults
    answers = [
        method.authenticate(request(host, "john", f"wrong-{host}-{i}"))
        for i in range(10)
        for host in ATTACKERS
    ]
    # Each attacking address's first check is queued; the rest are 429 (john's
    # share of 8 is full, and these addresses already have a check for him).
    assert sum(isinstance(a, Deferred) for a in answers) == 12
    assert all(a.status == 429 for a in answers if isinstance(a, Deny))
    login = method.authenticate(request("192.0.2.7", "john", "john-password"))
    assert isinstance(login, Deferred), login
    results: list[object] = []
    login.addCallback(results.append)
    hashed_before = 0
    while not results:
        pending = [i for i, (_, d) in enumerate(hasher.started) if not d.called]
        password = hasher.started[pending[0]][0]
        hasher.finish(pending[0], ok=password == "john-password")
        hashed_before += password != "john-password"
    (accepted,) = results
    assert isinstance(accepted, Accept) and accepted.principal.consumer == "john"
    # Served after at most one check per attacking address (plus those running).
    assert hashed_before <= len(ATTACKERS) + method._queue.max_running


def test_second_check_from_an_address_beyond_the_share_is_refused() -> None:
    hasher = ManualHasher()
    method = BasicAuthenticator(CONSUMERS, verify=hasher, max_per_consumer=2)
    for host in ATTACKERS[:3]:
        assert isinstance(method.authenticate(request(host, "john", "x")), Deferred)
    again = method.authenticate(request(ATTACKERS[0], "john", "y"))
    assert isinstance(again, Deny)
    assert (again.status, again.reason) == (
        429,
        "too many password checks at once for this consumer",
    )


def test_cancelled_waiting_checks_are_never_hashed() -> None:
    hasher = ManualHasher()
    method = BasicAuthenticator(CONSUMERS, verify=hasher, max_running=1)
    waiting = [method.authenticate(request(host, "john", "wrong")) for host in ATTACKERS]
    assert all(isinstance(d, Deferred) for d in waiting)
    failures: list[object] = []
    for d in waiting:
        assert isinstance(d, Deferred)
        d.addErrback(lambda f: failures.append(f.trap(CancelledError)))
        d.cancel()  # the clients left
    assert len(failures) == len(ATTACKERS)
    assert len(hasher.started) == 1  # only the one already running
    assert len(method._queue) == 0
    login = method.authenticate(request("192.0.2.7", "john", "john-password"))
    assert isinstance(login, Deferred)
    results: list[object] = []
    login.addCallback(results.append)
    hasher.finish(0)  # the running hash ends; its result goes nowhere
    assert [p for p, _ in hasher.started] == ["wrong", "john-password"]
    hasher.finish(1, ok=True)
    assert isinstance(results[0], Accept)
    assert not method._in_flight and not method._per_consumer
    assert not method._per_consumer_address
