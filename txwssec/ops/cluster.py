"""
Several processes sharing one state store (C{[state] backend = "redis"}):
what one node's admin API does to sessions reaches the sessions of every
node.

The admin API closes its own node's sessions and publishes what it did
(L{kick}, L{revoked}); every other node hears it through the store
(L{follow}) and closes its own matching sessions with 3003. After the
store comes back from an outage, each node closes the sessions whose
tokens were revoked while it could not hear (C{{"op": "synced"}}).

L{state_service} builds the Redis store for C{twistd wssec} and runs it
as a service: connected when the server starts, closed after the sessions
(it is added before them, so it stops after them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from txwssec.revocations import matches
from txwssec.store import StateStore
from txwssec.store.interface import ADDRESS, CONSUMER
from txwssec.store.settings import StateSettings


def close_matching(registry: Any, **revocation: Any) -> int:
    """Close (3003) the live sessions whose token the revocation matches."""
    closed = 0
    for protocol in registry:
        session = protocol.session
        if session is not None and matches(session.principal, **revocation):
            protocol.revoke()
            closed += 1
    return closed


def kick(store: StateStore, consumer: str | None, session_id: str | None) -> Any:
    """Tell the other nodes to close C{consumer}'s sessions, or the one with C{session_id}."""
    if session_id is not None:
        return store.publish({"op": "close", "id": session_id})
    return store.publish({"op": "close", "consumer": consumer})


def revoked(store: StateStore, **revocation: Any) -> Any:
    """Tell the other nodes to close the sessions a revocation matches."""
    return store.publish({"op": "close_matching", **revocation})


def follow(factory: Any) -> None:
    """Act on the other nodes' messages on C{factory}'s sessions."""

    def heard(message: Mapping[str, Any]) -> None:
        op, registry = message.get("op"), factory.registry
        if op == "close":
            session_id, consumer = message.get("id"), message.get("consumer")
            if isinstance(session_id, str):
                registry.revoke(session_id=session_id)
            elif isinstance(consumer, str):
                registry.revoke(consumer=consumer)
        elif op == "close_matching":
            jti, consumer = message.get("jti"), message.get("consumer")
            issued_before = message.get("issued_before")
            if isinstance(jti, str):
                close_matching(registry, jti=jti)
            elif isinstance(consumer, str) and isinstance(issued_before, int | float):
                close_matching(registry, consumer=consumer, issued_before=float(issued_before))
        elif op == "synced":
            revocations = factory.revocations
            for protocol in registry:
                session = protocol.session
                if session is not None and revocations.is_revoked(session.principal):
                    protocol.revoke()

    factory.admission.store.listen(heard)


class StateService(Service):
    """
    Runs a Redis store: connects on start; on stop, leaves once this
    process's connections are all released (their leases and session
    records go to Redis first), or after C{linger} seconds.

    twistd stops every service at once (the graceful stop closes the
    sessions meanwhile, see L{txwssec.lifecycle}), hence the wait.
    """

    def __init__(self, store: Any, linger: float, clock: Any) -> None:
        self.store = store
        self.linger = linger
        self.clock = clock

    def startService(self) -> None:
        super().startService()
        self.store.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        store, deadline = self.store, self.clock.seconds() + self.linger

        def released() -> bool:
            return not store.total(ADDRESS) and not store.total(CONSUMER)

        async def leave() -> None:
            while not released() and self.clock.seconds() < deadline:
                await deferLater(self.clock, 0.02)
            await store.stop()

        return Deferred.fromCoroutine(leave())


def state_store(settings: StateSettings, failure_limit: int, reactor: Any) -> Any:
    """The Redis store for C{settings} (imported only then: txredisapi is optional)."""
    from txwssec.store.redis import RedisStore

    return RedisStore(settings, failure_limit, reactor=reactor)
