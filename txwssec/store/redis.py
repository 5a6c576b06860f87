"""
The Redis state store: L{IStateStore} shared by every process and machine
that uses the same Redis server and key prefix (C{[state] backend =
"redis"}).

What needs every node to agree is asked of Redis, atomically (the scripts
of L{txwssec.store.scripts}), and answers with a L{Deferred} that the
handshake pipeline waits for: a connection under a cap (C{acquire}, a lease
in a sorted set scored by its expiry, renewed by L{RedisStore.renew} while
the connection lives, so that a crashed node's leases heal by themselves),
the failure lockout (C{blocked_for}), a ticket's single use (C{take_ticket}:
C{GETDEL}) and its issue, a revocation (stored with its end and told to
every node on PUB/SUB), the session list. What is asked per frame, or must
answer at once, comes from this process's own view: revocations (a replica
loaded when the connection is made and kept in step by PUB/SUB), this
node's counts, the consumer buckets (a local bucket in front of a Redis
bucket that it reports to in batches: L{SharedBucket}).

While Redis cannot be reached (or answers slower than C{[state] timeout}),
every call that needs it fails with L{ServiceUnavailable} (503 at the
handshake) and the revocation replica is not trusted; open sessions carry
on. The client (txredisapi) connects again by itself; once it has, this
node's leases and sessions are written again, the replica reloaded, and the
store is ready. Each change is logged once (L{RedisLink}).

About 550 lines (over the usual 400): every operation of the interface,
its batching and its replicas, read together with the scripts they run.

Chosen client: txredisapi (Twisted-native, used by Synapse in production,
reconnects through L{twisted.application.internet.ClientService}, pipelines
commands on one connection, caches Lua scripts by SHA).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from itertools import count
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from txwssec.errors import ServiceUnavailable
from txwssec.limits import ConnectionCounter, TokenBucket
from txwssec.store import scripts
from txwssec.store.buckets import SharedBucket
from txwssec.store.interface import ADDRESS, AlongRefused, IStateStore, Lease
from txwssec.store.link import RedisLink
from txwssec.store.memory import _expire
from txwssec.store.settings import StateSettings

T = TypeVar("T")

#: How long a lease lasts without renewal (seconds); renewed every third.
LEASE = 30.0
#: The failure lockout's window (seconds), as L{txwssec.limits.FailureWindow}.
WINDOW = 60.0
#: Writes nobody waits for are sent in batches, at least this often (seconds).
FLUSH = 0.05
#: At most this many removals are kept while Redis is away.
MAX_KEPT = 100_000


def unavailable(reason: str = "state store unavailable") -> ServiceUnavailable:
    """The refusal of a handshake that needs Redis while it is away (503)."""
    return ServiceUnavailable(reason)


@implementer(IStateStore)
class RedisStore:
    """
    L{IStateStore} in Redis (see the module docstring). Call L{start} to
    connect and L{stop} to leave.

    @ivar node: this process's id among the nodes (its leases and messages).
    @ivar link: the connection's state (L{RedisLink}).
    """

    def __init__(
        self,
        settings: StateSettings,
        failure_limit: int = 0,
        *,
        reactor: IReactorTime,
        lease: float = LEASE,
    ) -> None:
        self.settings = settings
        self._failure_limit = failure_limit
        self.clock = reactor
        self.lease = lease
        self.node = secrets.token_hex(6)
        prefix = settings.prefix
        self._prefix = prefix
        self._revoked_key = prefix + "revoked"
        self._blocked_key = prefix + "blocked"
        self._session_keys = [prefix + "sessions", prefix + "sessions:records"]
        self._serial = count(1)
        self._counts: dict[str, ConnectionCounter] = {}
        self._held: dict[tuple[str, str], list[str]] = {}
        self._shared: dict[str, Any] = {}
        self._revoked: dict[str, float] = {}
        self._blocked: dict[str, float] = {}
        self._replicas = {prefix + "revoked": self._revoked, prefix + "blocked": self._blocked}
        self._writes: list[Any] = []
        self._flushing: Any = None
        self._sessions: dict[str, str] = {}
        self._listeners: list[Callable[[Mapping[str, Any]], None]] = []
        self.link = RedisLink(
            settings, prefix + "events", self._sync, self._message, self.synced, reactor=reactor
        )
        self._heartbeat = LoopingCall(self.renew)
        self._heartbeat.clock = reactor

    # -- life ------------------------------------------------------------------

    def start(self) -> None:
        """Connect (and keep connecting), renew leases every third of their life."""
        self.link.start()
        self._heartbeat.start(self.lease / 3, now=False)

    def stop(self) -> Deferred[None]:
        """Stop renewing and close the connections (what was written is sent first)."""
        if self._heartbeat.running:
            self._heartbeat.stop()
        self.flush()  # the sessions' last releases, before the connection closes
        return self.link.stop()

    @property
    def ready(self) -> bool:
        """Whether Redis answers and the revocation replica is loaded."""
        return self.link.ready

    def not_ready(self) -> str | None:
        """The readiness check (C{/readyz}): L{None}, or why not."""
        return None if self.link.ready else self.link.reason

    def _call(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        """Run C{script} if ready: its L{Deferred} fails with L{ServiceUnavailable}."""
        connection = self.link.connection
        if connection is None or not self.link.ready:
            return fail(unavailable())
        try:
            result: Deferred[Any] = connection.eval(script, keys, args)
        except Exception:  # txredisapi: "Not connected", raised at once
            return fail(unavailable())
        return result.addErrback(self._failed)

    def _command(self, *args: Any) -> Deferred[Any]:
        connection = self.link.connection
        if connection is None or not self.link.ready:
            return fail(unavailable())
        try:
            result: Deferred[Any] = connection.execute_command(*args)
        except Exception:  # txredisapi: "Not connected", raised at once
            return fail(unavailable())
        return result.addErrback(self._failed)

    def _failed(self, failure: Failure) -> Failure:
        if not failure.check(ServiceUnavailable):
            # The link notices a lost connection itself; a command that fails
            # otherwise (a timeout drops the connection too) is a 503 here.
            return Failure(unavailable(f"state store: {type(failure.value).__name__}"))
        return failure

    def _quietly(self, result: Deferred[Any]) -> None:
        """A write nobody waits for: its failure is the link's to log."""
        result.addErrback(lambda failure: None)

    def _write(self, op: str, first: str, second: str) -> None:
        """
        A write nobody waits for (a lease given back, a session listed or
        unlisted): batched, sent within L{FLUSH} seconds in one script, or
        before this node's next C{acquire} or C{sessions}. While Redis is
        away it is dropped: what Redis must hold is written again from this
        node's state when it is back, and what it should forget expires.
        """
        self._writes += (op, first, second)
        if self._flushing is None:
            self._flushing = self.clock.callLater(FLUSH, self.flush)

    def flush(self) -> None:
        """Send the batched writes now."""
        flushing, self._flushing = self._flushing, None
        if flushing is not None and flushing.active():
            flushing.cancel()
        writes, self._writes = self._writes, []
        if not writes:
            return
        if not self.link.ready:
            # Removals are kept for when Redis is back (it may still hold
            # what they remove); additions are written again from this
            # node's state then. Bounded: what is dropped expires by itself.
            self._writes = [
                value
                for i in range(0, min(len(writes), MAX_KEPT * 3), 3)
                if writes[i] != "sadd"
                for value in writes[i : i + 3]
            ]
            return
        ms = int(self.lease * 1000)
        for i in range(0, len(writes), 3 * 500):
            self._quietly(
                self._call(scripts.APPLY, self._session_keys, [ms, *writes[i : i + 3 * 500]])
            )

    def _taken_writes(self) -> list[Any]:
        """
        The batched writes, taken to go with this node's next script (not
        sent apart); sent apart now if there are many, or while Redis is
        away (L{flush} keeps the removals then).
        """
        if len(self._writes) > 3 * 500 or not self.link.ready:
            self.flush()
            return []
        flushing, self._flushing = self._flushing, None
        if flushing is not None and flushing.active():
            flushing.cancel()
        writes, self._writes = self._writes, []
        return writes

    # -- connection counts -------------------------------------------------------

    @property
    def failure_limit(self) -> int:
        """Failures per key per minute before the lockout (0: off)."""
        return self._failure_limit

    def counter(self, kind: str) -> ConnectionCounter:
        """This node's counter of C{kind}."""
        counter = self._counts.get(kind)
        if counter is None:
            counter = self._counts[kind] = ConnectionCounter()
        return counter

    def acquire(
        self, kind: str, key: str, cap: int, *, along: Lease | None = None
    ) -> bool | Deferred[bool]:
        """
        Counted on this node at once. Under a cap, also a lease in Redis, in
        one script with C{along}'s (the per-address lease of the connection,
        whose cap L{admission <txwssec.admission>} checked on this node
        only): a L{Deferred} of whether it was counted, failing with
        L{AlongRefused} when C{along}'s cap is the one reached. A per-address
        count alone (C{kind} L{ADDRESS}) is this node's: one round trip per
        handshake at most. If the caller cancels the L{Deferred}, leases
        that were taken are given back.
        """
        counter = self.counter(kind)
        if kind == ADDRESS:
            if cap and counter.count(key) >= cap:
                return False
            counter.acquire(key)
            return True
        leases = [(kind, key, cap)] if cap else []
        if along is not None and along[2]:
            leases.append(along)
        if not leases:
            counter.acquire(key)
            return True
        if not self.link.ready or self.link.connection is None:
            # 503 at once: no lease is sent, so none is given back either
            # (a flood of refused handshakes must not crowd out the
            # removals kept for when Redis is back, at most MAX_KEPT).
            return fail(unavailable())
        counter.acquire(key)
        members = [f"{self.node}:{next(self._serial):x}" for _ in leases]
        keys = [self._lease_key(lease_kind, lease_of) for lease_kind, lease_of, _ in leases]
        # This node's batched writes first, in the same script (its own
        # releases count: its view is never stale; one round trip).
        writes = self._taken_writes()
        args: list[Any] = [int(self.lease * 1000), len(writes), *writes]
        for (_, _, lease_cap), member in zip(leases, members, strict=True):
            args += (lease_cap, member)
        taken = self._call(scripts.ACQUIRE, [*self._session_keys, *keys], args)
        answer: Deferred[bool] = Deferred(lambda _: None)

        def counted(full: Any) -> None:
            full = int(full)
            if full == 0 and not answer.called:
                for (lease_kind, lease_of, _), member in zip(leases, members, strict=True):
                    self._held.setdefault((lease_kind, lease_of), []).append(member)
                    self._trim(lease_kind, lease_of)
                answer.callback(True)
                return
            counter.release(key)
            self._trim(kind, key)
            if full == 0:  # cancelled meanwhile: give them back
                for lease_key, member in zip(keys, members, strict=True):
                    self._write("zrem", lease_key, member)
            elif not answer.called:
                if leases[full - 1] is along:
                    answer.errback(AlongRefused(along))
                else:
                    answer.callback(False)

        def failed(failure: Failure) -> None:
            counter.release(key)
            self._trim(kind, key)
            # A call that timed out may still run in Redis: its leases go too,
            # and the removals it carried are sent again (additions are
            # written again from this node's state when Redis is back).
            for i in range(0, len(writes), 3):
                if writes[i] != "sadd":
                    self._write(*writes[i : i + 3])
            for lease_key, member in zip(keys, members, strict=True):
                self._write("zrem", lease_key, member)
            if not answer.called:
                answer.errback(failure)

        def broken(failure: Failure) -> None:  # (a bug above: no handshake left waiting)
            if not answer.called:
                answer.errback(failure)

        taken.addCallbacks(counted, failed).addErrback(broken)
        return answer

    def release(self, kind: str, key: str) -> None:
        self.counter(kind).release(key)
        self._trim(kind, key)

    def _trim(self, kind: str, key: str) -> None:
        """
        Give back the leases of C{kind} under C{key} beyond this node's
        connections. A connection may hold no lease (no cap; or, per
        address, refused before the consumer step): a lease goes when
        there are more than connections left. Also when a lease is taken,
        or refused, after a connection ended while it was asked of Redis
        (that connection's release found no lease to give back yet).
        """
        held = self._held.get((kind, key))
        count = self.counter(kind).count(key)
        while held and len(held) > count:
            self._write("zrem", self._lease_key(kind, key), held.pop())
        if not held:
            self._held.pop((kind, key), None)

    def count(self, kind: str, key: str) -> int:
        """This node's connections of C{kind} under C{key}."""
        return self.counter(kind).count(key)

    def total(self, kind: str) -> int:
        """This node's connections of C{kind}."""
        return self.counter(kind).total

    def keys(self, kind: str) -> int:
        """How many keys of C{kind} have connections on this node."""
        return len(self.counter(kind))

    def _lease_key(self, kind: str, key: str) -> str:
        return f"{self._prefix}conn:{kind}:{key}"

    def renew(self) -> Deferred[None]:
        """
        The heartbeat: renew this node's leases (connections, sessions), or
        write them again if Redis lost them, so that they expire only when
        this node stops renewing them.
        """
        if not self.link.ready:
            return succeed(None)
        # A failure is the link's business (it drops and makes the
        # connection again); the heartbeat goes on.
        try:
            renewing = self._renew()
        except Exception:  # txredisapi: "Not connected", raised at once
            return succeed(None)
        return renewing.addErrback(lambda failure: None)

    def _renew(self) -> Deferred[None]:
        connection = self.link.connection
        assert connection is not None
        ms = int(self.lease * 1000)
        leases = [
            (self._lease_key(kind, key), member)
            for (kind, key), members in self._held.items()
            for member in members
        ]
        calls = [
            connection.eval(
                scripts.RENEW,
                [key for key, _ in leases[i : i + 500]],
                [ms, *(member for _, member in leases[i : i + 500])],
            )
            for i in range(0, len(leases), 500)
        ]
        sessions = list(self._sessions.items())
        for i in range(0, len(sessions), 500):
            adds = [v for pair in sessions[i : i + 500] for v in ("sadd", *pair)]
            calls.append(connection.eval(scripts.APPLY, self._session_keys, [ms, *adds]))
        done: Deferred[Any] = gatherResults(calls, consumeErrors=True)
        return done.addCallback(lambda _: None)

    # -- shared rate buckets ---------------------------------------------------------

    def shared(self, key: str, make: Callable[[], T]) -> T:
        """
        The state shared under C{key} on this node; L{TokenBucket}s in what
        C{make} returns (a consumer's buckets) become L{SharedBucket}s.
        """
        value = self._shared.get(key)
        if value is None:
            value = self._shared[key] = self._sharing(key, make())
        result: T = value
        return result

    def _sharing(self, key: str, value: Any) -> Any:
        if not isinstance(value, tuple):
            return value
        shared = []
        for index, item in enumerate(value):
            if type(item) is TokenBucket:
                # (It learns what the other nodes left at its first report: a
                # new bucket starts full, as in memory.)
                item = SharedBucket(
                    item.rate, item.burst, item._last, f"{key}\x00{index}", self._report
                )
            shared.append(item)
        return tuple(shared)

    def _report(self, bucket: SharedBucket, used: float) -> None:
        if not self.link.ready:
            return  # the local bucket alone, until Redis is back
        key = f"{self._prefix}bucket:{bucket._key}"
        reported = self._call(scripts.BUCKET, [key], [bucket.rate, bucket.burst, used])
        reported.addCallbacks(lambda left: bucket.settle(float(left)), lambda failure: None)

    def forget(self, key: str) -> None:
        self._shared.pop(key, None)

    # -- failure lockout ---------------------------------------------------------

    def record_failure(self, key: str, now: float) -> None:
        """Counted in Redis; at the limit, every node's lockout replica learns it."""
        if not self.link.ready:
            return
        slot = int(now // WINDOW)
        base = f"{self._prefix}fail:{key}:"
        args = [int(WINDOW * 2000), now, WINDOW, self._failure_limit, key]
        args += [self.link.channel, self.node]
        keys = [f"{base}{slot}", f"{base}{slot - 1}", self._blocked_key]
        recorded = self._call(scripts.RECORD_FAILURE, keys, args)

        def blocked(until: Any) -> None:
            if float(until) > 0:
                self._replicate(self._blocked, key, float(until))

        recorded.addCallbacks(blocked, lambda failure: None)

    def blocked_for(self, key: str, now: float) -> float:
        """From this node's replica (as the memory window answers); 503 while it may be stale."""
        if not self.link.ready:
            raise unavailable("state store unavailable: lockouts unknown")
        until = self._blocked.get(key)
        if until is None or until <= now:
            return 0.0
        return WINDOW - (now % WINDOW)

    # -- tickets ---------------------------------------------------------------------

    def put_ticket(
        self, ticket: str, value: Mapping[str, Any], expires_at: float, now: float
    ) -> Deferred[None]:
        ms = max(1, int((expires_at - now) * 1000))
        text = json.dumps({"value": value, "expires_at": expires_at}, separators=(",", ":"))
        stored = self._command("SET", self._prefix + ticket, text, "PX", ms)
        return stored.addCallback(lambda _: None)

    def take_ticket(self, ticket: str, now: float) -> Deferred[Mapping[str, Any] | None]:
        def taken(text: Any) -> Mapping[str, Any] | None:
            if not isinstance(text, str | bytes):
                return None
            entry = json.loads(text)
            if entry["expires_at"] <= now:
                return None
            value: Mapping[str, Any] = entry["value"]
            return value

        return self._command("GETDEL", self._prefix + ticket).addCallback(taken)

    # -- revocations -------------------------------------------------------------

    def revoke(self, key: str, until: float, now: float) -> Deferred[None]:
        """Kept in Redis until C{until} and told to every node (PUB/SUB)."""
        message = json.dumps({"node": self.node, "op": "revoked", "key": key, "until": until})
        args = [key, until, now, self.link.channel, message]
        stored = self._call(scripts.REVOKE, [self._revoked_key], args)
        if self.link.ready:  # (else it failed: 503, nothing revoked anywhere)
            self._replicate(self._revoked, key, until)
        return stored.addCallback(lambda _: None)

    def revoked(self, key: str, now: float) -> bool:
        """From this node's replica; L{ServiceUnavailable} while it may be stale."""
        if not self.link.ready:
            raise unavailable("state store unavailable: revocations unknown")
        until = self._revoked.get(key)
        return until is not None and until > now

    def _replicate(self, replica: dict[str, float], key: str, until: float) -> None:
        _expire(replica, lambda until: until, self.clock.seconds())
        replica[key] = max(until, replica.get(key, until))

    # -- the session list ----------------------------------------------------------

    def add_session(self, session_id: str, record: Mapping[str, Any]) -> None:
        text = json.dumps({**record, "node": self.node}, separators=(",", ":"), default=str)
        self._sessions[session_id] = text
        self._write("sadd", session_id, text)

    def remove_session(self, session_id: str) -> None:
        if self._sessions.pop(session_id, None) is not None:
            self._write("srem", session_id, "")

    def sessions(self) -> Deferred[list[Mapping[str, Any]]]:
        """Every node's sessions (those of a node that died expire with its leases)."""

        def records(texts: list[Any]) -> list[Mapping[str, Any]]:
            return [json.loads(text) for text in texts]

        self.flush()
        return self._call(scripts.LIST_SESSIONS, self._session_keys, []).addCallback(records)

    # -- messages between nodes ---------------------------------------------------------

    def publish(self, message: Mapping[str, Any]) -> Deferred[None]:
        """Tell every other node C{message} (a JSON object)."""
        text = json.dumps({**message, "node": self.node}, separators=(",", ":"))
        return self._command("PUBLISH", self.link.channel, text).addCallback(lambda _: None)

    def listen(self, listener: Callable[[Mapping[str, Any]], None]) -> None:
        """Call C{listener} with each message of another node (and C{{"op": "synced"}})."""
        self._listeners.append(listener)

    def _message(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("node") == self.node:
            return
        op = message.get("op")
        if op in ("revoked", "blocked"):
            key, until = message.get("key"), message.get("until")
            if isinstance(key, str) and isinstance(until, int | float):
                replica = self._revoked if op == "revoked" else self._blocked
                self._replicate(replica, key, float(until))
        self._tell(message)

    def _tell(self, message: Mapping[str, Any]) -> None:
        for listener in list(self._listeners):
            listener(message)

    def _sync(self) -> Deferred[None]:
        """
        The link is up (commands and PUB/SUB): load the replicas (revocations,
        lockouts), write this node's leases and sessions again. Then the
        store is ready.
        """
        connection = self.link.connection
        assert connection is not None
        now = self.clock.seconds()
        loads = [
            connection.execute_command("ZRANGEBYSCORE", name, f"({now}", "+inf", "WITHSCORES")
            for name in self._replicas
        ]

        def replicas(results: list[list[Any]]) -> Deferred[Any]:
            writes = []
            for (name, replica), items in zip(self._replicas.items(), results, strict=True):
                for key, until in zip(items[::2], items[1::2], strict=True):
                    self._replicate(replica, str(key), float(until))
                # And written back: a Redis that restarted empty (it need
                # not persist anything) has them again, for the nodes that
                # start later.
                live = [v for key, until in replica.items() if until > now for v in (until, key)]
                for i in range(0, len(live), 1000):
                    writes.append(
                        connection.execute_command("ZADD", name, "GT", *live[i : i + 1000])
                    )
            return gatherResults([*writes, self._renew()], consumeErrors=True)

        def kept(_: Any) -> None:
            # The removals kept while Redis was away, once the link is ready.
            self.clock.callLater(0, self.flush)

        loaded: Deferred[Any] = gatherResults(loads, consumeErrors=True)
        return loaded.addCallback(replicas).addCallback(kept)

    def synced(self) -> None:
        """Tell the listeners that the replica was loaded again (after a loss)."""
        self._tell({"op": "synced"})
