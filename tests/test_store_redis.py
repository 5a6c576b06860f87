"""
The Redis state store (txwssec.store.redis) against a real redis-server:
two stores on one Redis are two nodes. Counts under a cap hold across them,
a dead node's leases expire by themselves while a live node's heartbeat
keeps its own, a ticket is taken once, failures add up, revocations reach
the other node's replica, and while Redis is away every call that needs it
fails with 503 (and it all comes back when Redis does).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from redisserver import RedisServer, redis_server  # noqa: F401
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from txwssec.errors import ServiceUnavailable
from txwssec.limits import TokenBucket
from txwssec.store.interface import AlongRefused
from txwssec.store.settings import StateSettings


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds)


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition never held")
        await sleep(0.02)


class Nodes:
    """Stores on one Redis, each one a node; stopped at the end."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.stores: list[Any] = []

    async def node(self, lease: float = 30.0, failure_limit: int = 3, timeout: float = 1.0) -> Any:
        from txwssec.store.redis import RedisStore

        settings = StateSettings("redis", port=self.server.port, prefix="test:", timeout=timeout)
        store = RedisStore(settings, failure_limit, reactor=reactor, lease=lease)
        store.start()
        self.stores.append(store)
        await until(lambda: store.ready)
        return store


@pytest.fixture
def nodes(redis_server: RedisServer) -> Iterator[Nodes]:  # noqa: F811
    made = Nodes(redis_server)
    yield made
    pytest_twisted.blockon(DeferredList([store.stop() for store in made.stores]))


@pytest_twisted.ensureDeferred
async def test_a_cap_holds_across_nodes(nodes: Nodes) -> None:
    a, b = await nodes.node(), await nodes.node()
    assert a.not_ready() is None
    assert await a.acquire("consumer", "john", 2) is True
    assert await b.acquire("consumer", "john", 2) is True
    assert await a.acquire("consumer", "john", 2) is False
    assert await b.acquire("consumer", "john", 2) is False
    # Each node counts its own.
    assert (a.count("consumer", "john"), b.count("consumer", "john")) == (1, 1)
    a.release("consumer", "john")  # (sent within FLUSH seconds)
    await until(lambda: nodes.server.command(b"ZCARD", b"test:conn:consumer:john") == b":1")
    assert await b.acquire("consumer", "john", 2) is True


@pytest_twisted.ensureDeferred
async def test_no_cap_needs_no_redis(nodes: Nodes) -> None:
    a = await nodes.node()
    assert a.acquire("address", "192.0.2.1", 0) is True
    assert a.count("address", "192.0.2.1") == 1


@pytest_twisted.ensureDeferred
async def test_racing_for_the_last_place_one_wins(nodes: Nodes) -> None:
    a, b = await nodes.node(), await nodes.node()
    results = await DeferredList(
        [store.acquire("consumer", "race", 3) for store in (a, b) * 4], consumeErrors=True
    )
    assert sorted(ok for _, ok in results) == [False] * 5 + [True] * 3


@pytest_twisted.ensureDeferred
async def test_the_address_cap_is_checked_along_with_the_consumer_step(nodes: Nodes) -> None:
    a, b = await nodes.node(), await nodes.node()
    ip = ("address", "192.0.2.5", 2)
    # Admission: counted on this node only (a full node refuses at once).
    assert a.acquire("address", "192.0.2.5", 2) is True
    assert b.acquire("address", "192.0.2.5", 2) is True
    # The consumer step takes both leases in one script, across nodes.
    assert await a.acquire("consumer", "john", 0, along=ip) is True
    assert await b.acquire("consumer", "jane", 5, along=ip) is True
    assert b.acquire("address", "192.0.2.5", 2) is True
    with pytest.raises(AlongRefused):
        await b.acquire("consumer", "john", 0, along=ip)
    assert b.count("consumer", "john") == 0
    assert await b.acquire("consumer", "jane", 5) is True  # nothing was taken for jane
    b.release("address", "192.0.2.5")  # the refused connection: it held no lease
    a.release("consumer", "john")
    a.release("address", "192.0.2.5")  # this one did: given back
    await until(lambda: nodes.server.command(b"ZCARD", b"test:conn:address:192.0.2.5") == b":1")
    assert b.acquire("address", "192.0.2.5", 2) is True
    assert await b.acquire("consumer", "john", 0, along=ip) is True
    # This node's own count refuses before any round trip.
    assert b.acquire("address", "192.0.2.5", 2) is False


@pytest_twisted.ensureDeferred
async def test_a_dead_nodes_leases_expire(nodes: Nodes) -> None:
    dead = await nodes.node(lease=0.5)
    live = await nodes.node(lease=0.5)
    assert await live.acquire("consumer", "k", 3) is True  # renewed: the key lives on
    assert await dead.acquire("consumer", "k", 3) is True
    assert await dead.acquire("consumer", "k", 3) is True
    assert await live.acquire("consumer", "k", 3) is False
    # The node dies without releasing: no heartbeat, no ZREM.
    dead._heartbeat.stop()
    await dead.link.stop()
    await sleep(0.8)
    assert await live.acquire("consumer", "k", 3) is True
    assert await live.acquire("consumer", "k", 3) is True
    assert await live.acquire("consumer", "k", 3) is False


@pytest_twisted.ensureDeferred
async def test_the_heartbeat_keeps_a_long_connection_counted(nodes: Nodes) -> None:
    a = await nodes.node(lease=0.4)
    b = await nodes.node(lease=0.4)
    assert await a.acquire("consumer", "long", 1) is True
    await sleep(1.2)  # three lease lives
    assert await b.acquire("consumer", "long", 1) is False


@pytest_twisted.ensureDeferred
async def test_a_cancelled_acquire_gives_its_lease_back(nodes: Nodes) -> None:
    a = await nodes.node()
    pending = a.acquire("consumer", "c", 1)
    pending.addErrback(lambda failure: None)
    pending.cancel()
    assert a.count("consumer", "c") in (0, 1)
    await until(lambda: a.count("consumer", "c") == 0)
    await until(lambda: nodes.server.command(b"EXISTS", b"test:conn:consumer:c") == b":0")
    assert await a.acquire("consumer", "c", 1) is True


@pytest_twisted.ensureDeferred
async def test_a_ticket_is_taken_once_by_one_node(nodes: Nodes) -> None:
    a, b = await nodes.node(), await nodes.node()
    now = time.time()
    await a.put_ticket("ticket:t1", {"consumer": "john"}, now + 30, now)
    taken = await DeferredList([b.take_ticket("ticket:t1", now), a.take_ticket("ticket:t1", now)])
    assert sorted(repr(value) for _, value in taken) == ["None", "{'consumer': 'john'}"]
    await a.put_ticket("ticket:t2", {"consumer": "john"}, now + 30, now)
    assert await b.take_ticket("ticket:t2", now + 31) is None  # expired


@pytest_twisted.ensureDeferred
async def test_failures_add_up_across_nodes(nodes: Nodes) -> None:
    a, b = await nodes.node(failure_limit=3), await nodes.node(failure_limit=3)
    now = 600.0  # the start of a minute
    a.record_failure("192.0.2.1", now)
    b.record_failure("192.0.2.1", now)
    await sleep(0.2)
    assert a.blocked_for("192.0.2.1", now) == b.blocked_for("192.0.2.1", now) == 0
    a.record_failure("192.0.2.1", now)
    # The third, on a: both nodes' replicas learn the lockout.
    await until(lambda: b.blocked_for("192.0.2.1", now + 10) == 50.0)
    assert a.blocked_for("192.0.2.1", now + 10) == 50.0
    assert b.blocked_for("192.0.2.2", now + 10) == 0
    assert b.blocked_for("192.0.2.1", now + 130) == 0
    # A node that starts later loads the lockouts that have not ended by its
    # clock (real time). A lockout ends with its minute: failures counted in
    # the current minute could end theirs before the new node loads it (a
    # run 20 ms before a minute's end failed so); counted a window ahead,
    # it lasts a minute or more from now.
    later = time.time() + 60.0  # txwssec.store.redis.WINDOW
    for _ in range(3):
        a.record_failure("192.0.2.7", later)
    await until(lambda: a.blocked_for("192.0.2.7", later) > 0)
    c = await nodes.node(failure_limit=3)
    assert c.blocked_for("192.0.2.7", later) > 0


@pytest_twisted.ensureDeferred
async def test_revocations_reach_every_node(nodes: Nodes) -> None:
    a, b = await nodes.node(), await nodes.node()
    now = time.time()
    heard: list[Any] = []
    b.listen(heard.append)
    await a.revoke("jti:one", now + 60, now)
    assert a.revoked("jti:one", now)
    await until(lambda: b.revoked("jti:one", now))
    assert heard and heard[0]["op"] == "revoked"
    # A node that starts later loads them.
    c = await nodes.node()
    assert c.revoked("jti:one", now)
    assert not c.revoked("jti:one", now + 61)
    assert not c.revoked("jti:two", now)


@pytest_twisted.ensureDeferred
async def test_the_session_list_covers_every_node(nodes: Nodes) -> None:
    a, b = await nodes.node(lease=0.5), await nodes.node(lease=0.5)
    a.add_session("a-1", {"id": "a-1", "consumer": "john", "opened_at": 1.0})
    b.add_session("b-1", {"id": "b-1", "consumer": "jane", "opened_at": 2.0})

    async def listed(store: Any) -> list[str]:
        return sorted(record["id"] for record in await store.sessions())

    await until(lambda: nodes.server.command(b"HLEN", b"test:sessions:records") == b":2")
    assert await listed(a) == ["a-1", "b-1"]
    b.remove_session("b-1")
    await until(lambda: nodes.server.command(b"HLEN", b"test:sessions:records") == b":1")
    assert await listed(b) == ["a-1"]
    # A node that dies: its records expire with its leases.
    a._heartbeat.stop()
    await a.link.stop()
    await sleep(0.7)
    assert await listed(b) == []


@pytest_twisted.ensureDeferred
async def test_consumer_buckets_are_shared(nodes: Nodes) -> None:
    a, b = await nodes.node(), await nodes.node()
    now = time.monotonic()
    made = lambda: (TokenBucket(10, 10, now), None)  # noqa: E731
    bucket_a, _ = a.shared("/echo\x00john", made)
    assert type(bucket_a).__name__ == "SharedBucket"
    await sleep(0.1)
    for _ in range(10):
        assert bucket_a.take(1, now)
    await sleep(0.1)  # the reports are in
    bucket_b, _ = b.shared("/echo\x00john", made)
    await until(lambda: not bucket_b.take(1, now))


@pytest_twisted.ensureDeferred
async def test_while_redis_is_away_calls_fail_with_503(nodes: Nodes) -> None:
    a = await nodes.node()
    assert await a.acquire("consumer", "held", 1) is True
    nodes.server.stop()
    await until(lambda: not a.ready)
    assert a.not_ready() is not None and a.not_ready().startswith("redis: ")
    for call in (
        lambda: a.acquire("consumer", "x", 1),
        lambda: a.take_ticket("ticket:t", 0.0),
        lambda: a.put_ticket("ticket:t", {}, 10.0, 0.0),
        lambda: a.sessions(),
        lambda: a.revoke("jti:x", 10.0, 0.0),
    ):
        result = call()
        assert isinstance(result, Deferred)
        with pytest.raises(ServiceUnavailable):
            await result
    with pytest.raises(ServiceUnavailable):
        a.revoked("jti:x", 0.0)
    with pytest.raises(ServiceUnavailable):
        a.blocked_for("192.0.2.1", 0.0)
    # Back: the node writes its leases again (Redis lost them).
    nodes.server.start()
    await until(lambda: a.ready)
    b = await nodes.node()
    assert await b.acquire("consumer", "held", 1) is False
    assert a.revoked("jti:x", 0.0) is False


@pytest_twisted.ensureDeferred
async def test_a_release_while_the_link_is_down_is_sent_when_it_is_back(nodes: Nodes) -> None:
    a = await nodes.node()
    assert await a.acquire("consumer", "blip", 1) is True
    a.link.connection.transport.loseConnection()  # Redis keeps its data
    await until(lambda: not a.ready)
    a.release("consumer", "blip")
    a.flush()
    await until(lambda: a.ready)
    await until(lambda: nodes.server.command(b"EXISTS", b"test:conn:consumer:blip") == b":0")
    b = await nodes.node()
    assert await b.acquire("consumer", "blip", 1) is True


@pytest_twisted.ensureDeferred
async def test_an_acquire_while_the_link_is_down_queues_nothing(nodes: Nodes) -> None:
    """
    A handshake refused with 503 while Redis is away sent no lease: it
    queues no removal either, so a flood of them cannot push out the real
    removals kept for when Redis is back (at most MAX_KEPT).
    """
    a = await nodes.node()
    assert await a.acquire("consumer", "blip", 1) is True
    a.link.connection.transport.loseConnection()  # Redis keeps its data
    await until(lambda: not a.ready)
    for i in range(100):
        with pytest.raises(ServiceUnavailable):
            await a.acquire("consumer", f"flood{i}", 1, along=("address", "192.0.2.1", 5))
    assert a.counter("consumer").count("flood0") == 0
    a.release("consumer", "blip")
    a.flush()
    # Kept for when Redis is back: the one real removal, nothing else.
    assert a._writes[:2] == ["zrem", "test:conn:consumer:blip"] and len(a._writes) == 3
    await until(lambda: a.ready)
    await until(lambda: nodes.server.command(b"EXISTS", b"test:conn:consumer:blip") == b":0")


@pytest_twisted.ensureDeferred
async def test_a_slow_redis_gives_503_after_the_timeout(nodes: Nodes) -> None:
    a = await nodes.node(timeout=0.3)
    # Redis busy for 1.5 s (another client's DEBUG SLEEP, from a thread).
    busy = deferToThread(nodes.server.command, b"DEBUG", b"SLEEP", b"1.5")
    await sleep(0.1)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        await a.acquire("consumer", "slow", 1)
    assert time.monotonic() - started < 1.0
    await until(lambda: not a.ready)  # the connection is dropped, and made again
    await busy
    await until(lambda: a.ready)
    assert await a.acquire("consumer", "slow", 1) is True


@pytest_twisted.ensureDeferred
async def test_a_capped_acquire_carries_the_node_s_writes_in_one_script(nodes: Nodes) -> None:
    """
    One script per capped handshake: this node's batched writes (a release,
    a session listed) go with its next acquire, applied first (its own
    release counts at once), not in a script of their own.
    """
    from txwssec.store import scripts

    a = await nodes.node()
    assert await a.acquire("consumer", "john", 1) is True
    a.add_session("s-1", {"id": "s-1", "opened_at": 1.0})
    a.release("consumer", "john")
    connection = a.link.connection
    sent: list[str] = []
    real = connection.eval

    def eval(script: str, keys: list[str], args: list[Any]) -> Any:
        sent.append(script)
        return real(script, keys, args)

    connection.eval = eval
    assert await a.acquire("consumer", "john", 1) is True
    assert sent == [scripts.ACQUIRE]
    assert nodes.server.command(b"ZCARD", b"test:conn:consumer:john") == b":1"
    assert nodes.server.command(b"HEXISTS", b"test:sessions:records", b"s-1") == b":1"
    # Refused at the cap, its writes applied all the same.
    a.remove_session("s-1")
    assert await a.acquire("consumer", "john", 1) is False
    assert sent == [scripts.ACQUIRE] * 2
    assert nodes.server.command(b"HEXISTS", b"test:sessions:records", b"s-1") == b":0"
