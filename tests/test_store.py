"""
The state store's contract (L{txwssec.store.IStateStore}). Every test takes
the C{store} fixture: a second backend (Redis) is one more fixture param,
and must pass the same tests.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from zope.interface.verify import verifyObject

from txwssec.store import IStateStore, MemoryStore, StateStore

#: Makes a store with a failure limit (failures per key per minute).
Backend = Callable[[int], StateStore]

BACKENDS: dict[str, Backend] = {"memory": MemoryStore}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param]


@pytest.fixture
def store(backend: Backend) -> StateStore:
    return backend(3)


def test_provides_the_interface(store: StateStore) -> None:
    assert verifyObject(IStateStore, store)
    assert store.failure_limit == 3


# -- connection counts -------------------------------------------------------------


def test_acquire_up_to_the_cap(store: StateStore) -> None:
    assert store.acquire("address", "192.0.2.1", 2)
    assert store.acquire("address", "192.0.2.1", 2)
    assert not store.acquire("address", "192.0.2.1", 2)
    assert store.acquire("address", "192.0.2.2", 2)
    assert store.count("address", "192.0.2.1") == 2
    assert store.total("address") == 3
    assert store.keys("address") == 2


def test_no_cap(store: StateStore) -> None:
    for _ in range(100):
        assert store.acquire("consumer", "/echo\x00john", 0)
    assert store.count("consumer", "/echo\x00john") == 100


def test_kinds_are_apart(store: StateStore) -> None:
    store.acquire("address", "k", 0)
    assert store.count("consumer", "k") == 0
    assert store.total("consumer") == 0


def test_release_forgets_a_key_at_zero(store: StateStore) -> None:
    store.acquire("address", "a", 0)
    store.acquire("address", "a", 0)
    store.release("address", "a")
    assert store.count("address", "a") == 1
    store.release("address", "a")
    assert store.count("address", "a") == 0
    assert store.total("address") == 0
    assert store.keys("address") == 0


# -- shared state (a consumer's rate buckets) ------------------------------------


def test_shared_is_made_once(store: StateStore) -> None:
    made: list[object] = []

    def make() -> object:
        made.append(object())
        return made[-1]

    first = store.shared("/echo\x00john", make)
    assert store.shared("/echo\x00john", make) is first
    assert len(made) == 1
    store.forget("/echo\x00john")
    assert store.shared("/echo\x00john", make) is not first
    store.forget("unknown")  # no error


# -- failure lockout -------------------------------------------------------------


def test_failures_lock_out_at_the_limit(store: StateStore) -> None:
    assert store.blocked_for("192.0.2.1", 10.0) == 0
    for _ in range(3):
        store.record_failure("192.0.2.1", 10.0)
    assert store.blocked_for("192.0.2.1", 10.0) == 50.0
    assert store.blocked_for("192.0.2.2", 10.0) == 0
    # Two minutes on, the window has forgotten.
    assert store.blocked_for("192.0.2.1", 130.0) == 0


# -- tickets ---------------------------------------------------------------------


def test_a_ticket_is_taken_once(store: StateStore) -> None:
    store.put_ticket("t1", {"consumer": "john"}, expires_at=30.0, now=0.0)
    assert store.take_ticket("t1", 10.0) == {"consumer": "john"}
    assert store.take_ticket("t1", 10.0) is None
    assert store.take_ticket("unknown", 10.0) is None


def test_an_expired_ticket_is_refused(store: StateStore) -> None:
    store.put_ticket("t1", {"consumer": "john"}, expires_at=30.0, now=0.0)
    assert store.take_ticket("t1", 30.0) is None


def test_expired_tickets_are_swept(backend: Backend) -> None:
    store = backend(0)
    for n in range(1000):
        store.put_ticket(f"t{n}", {}, expires_at=n + 1.0, now=float(n))
    # The live ones are all there; most expired ones were dropped.
    assert store.take_ticket("t999", 999.5) == {}
    if isinstance(store, MemoryStore):
        assert len(store._tickets) < 600


# -- revocations -----------------------------------------------------------------


def test_revoked_until(store: StateStore) -> None:
    store.revoke("jti:abc", until=100.0, now=0.0)
    assert store.revoked("jti:abc", 99.0)
    assert not store.revoked("jti:abc", 100.0)
    assert not store.revoked("jti:other", 0.0)


def test_a_revocation_is_not_shortened(store: StateStore) -> None:
    store.revoke("consumer:john", until=100.0, now=0.0)
    store.revoke("consumer:john", until=50.0, now=0.0)
    assert store.revoked("consumer:john", 75.0)


# -- the session list --------------------------------------------------------------


def test_the_session_list(store: StateStore) -> None:
    record = {"id": "s1", "consumer": "john", "route": "/echo"}
    store.add_session("s1", record)
    store.add_session("s2", {**record, "id": "s2"})
    assert sorted(r["id"] for r in store.sessions()) == ["s1", "s2"]
    store.remove_session("s1")
    store.remove_session("unknown")
    assert [r["id"] for r in store.sessions()] == ["s2"]
