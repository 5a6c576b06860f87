"""
The state store's interface: a L{zope.interface} (L{IStateStore}, for
C{verifyObject} and adapters) and the same as a typing L{Protocol}
(L{StateStore}, for mypy).

Most calls answer at once: the traffic guard takes from shared buckets per
frame, and a networked backend answers those from its own process's view,
kept in step with the others (buckets reported in batches, a revocation
replica); that is its business, not the callers'. The calls that must be
atomic across processes (C{acquire} under a cap, C{blocked_for},
C{put_ticket}, C{take_ticket}, C{revoke}, C{sessions}, C{publish}) may
answer with a L{Deferred} instead: callers (the handshake pipeline, the
admin API) wait only when they get one, so the in-memory store keeps its
synchronous path. A networked backend that cannot answer fails them with
L{txwssec.errors.ServiceUnavailable} (503), and C{revoked} raises it while
its replica may be stale.

Keys are short texts chosen by txwssec (an address key, a route and
consumer, a token id), never secrets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

T = TypeVar("T")

#: Connection count kinds.
ADDRESS = "address"
CONSUMER = "consumer"

#: A count taken along with another (kind, key, cap): see C{acquire}.
Lease = tuple[str, str, int]


class AlongRefused(Exception):
    """C{acquire}'s C{along} count is the one at its cap."""


class IStateStore(Interface):
    """State shared by every process serving the same configuration."""

    failure_limit = Attribute("Failures per key per minute before the lockout (0: off).")

    # -- connection counts -------------------------------------------------

    def acquire(
        kind: str, key: str, cap: int, *, along: Lease | None = None
    ) -> bool | Deferred[bool]:
        """
        Count one more connection of C{kind} under C{key} if it has fewer
        than C{cap} (0: no cap).

        @param along: a count the same connection took before (its address:
            kind, key, cap), which a store shared by several processes may
            check across them only now, in the same atomic step; a store
            that counted it for good then (the memory one) ignores it.
        @return: whether it was counted; a L{Deferred} of it may fail with
            L{AlongRefused} (nothing counted: C{along}'s cap is reached).
        """

    def release(kind: str, key: str) -> None:
        """Count one connection fewer; a key at zero is forgotten."""

    def count(kind: str, key: str) -> int:
        """Live connections of C{kind} under C{key}."""

    def total(kind: str) -> int:
        """Live connections of C{kind}, all keys."""

    def keys(kind: str) -> int:
        """How many keys of C{kind} have live connections."""

    # -- shared rate buckets -----------------------------------------------

    def shared(key: str, make: Callable[[], Any]) -> Any:
        """The state shared under C{key} (made by C{make} if none)."""

    def forget(key: str) -> None:
        """Forget the state shared under C{key}."""

    # -- failure lockout ---------------------------------------------------

    def record_failure(key: str, now: float) -> None:
        """Count a failure (an authentication) for C{key}."""

    def blocked_for(key: str, now: float) -> float | Deferred[float]:
        """Seconds until C{key} may try again (0: now)."""

    # -- tickets -------------------------------------------------------------

    def put_ticket(
        ticket: str, value: Mapping[str, Any], expires_at: float, now: float
    ) -> Deferred[None] | None:
        """Keep C{value} under C{ticket} until C{expires_at} (it is C{now})."""

    def take_ticket(
        ticket: str, now: float
    ) -> Mapping[str, Any] | Deferred[Mapping[str, Any] | None] | None:
        """The value of C{ticket}, once: later calls and expired ones get L{None}."""

    # -- revocations ---------------------------------------------------------

    def revoke(key: str, until: float, now: float) -> Deferred[None] | None:
        """Revoke C{key} (C{jti:...}, C{consumer:...}) until C{until} (it is C{now})."""

    def revoked(key: str, now: float) -> bool:
        """Whether C{key} is revoked now."""

    # -- the session list ------------------------------------------------------

    def add_session(session_id: str, record: Mapping[str, Any]) -> None:
        """List an open session (id, consumer, route, method, peer, opened_at, expires_at)."""

    def remove_session(session_id: str) -> None:
        """Unlist a session whose connection ended."""

    def sessions() -> list[Mapping[str, Any]] | Deferred[list[Mapping[str, Any]]]:
        """The listed sessions' records."""

    # -- messages between processes ---------------------------------------------

    def publish(message: Mapping[str, Any]) -> Deferred[None] | None:
        """Tell the other processes sharing this store C{message} (a JSON object)."""

    def listen(listener: Callable[[Mapping[str, Any]], None]) -> None:
        """Call C{listener} with each message another process publishes."""


class StateStore(Protocol):
    """L{IStateStore}, for the type checker."""

    @property
    def failure_limit(self) -> int: ...

    def acquire(
        self, kind: str, key: str, cap: int, *, along: Lease | None = None
    ) -> bool | Deferred[bool]: ...

    def release(self, kind: str, key: str) -> None: ...

    def count(self, kind: str, key: str) -> int: ...

    def total(self, kind: str) -> int: ...

    def keys(self, kind: str) -> int: ...

    def shared(self, key: str, make: Callable[[], T]) -> T: ...

    def forget(self, key: str) -> None: ...

    def record_failure(self, key: str, now: float) -> None: ...

    def blocked_for(self, key: str, now: float) -> float | Deferred[float]: ...

    def put_ticket(
        self, ticket: str, value: Mapping[str, Any], expires_at: float, now: float
    ) -> Deferred[None] | None: ...

    def take_ticket(
        self, ticket: str, now: float
    ) -> Mapping[str, Any] | Deferred[Mapping[str, Any] | None] | None: ...

    def revoke(self, key: str, until: float, now: float) -> Deferred[None] | None: ...

    def revoked(self, key: str, now: float) -> bool: ...

    def add_session(self, session_id: str, record: Mapping[str, Any]) -> None: ...

    def remove_session(self, session_id: str) -> None: ...

    def sessions(self) -> list[Mapping[str, Any]] | Deferred[list[Mapping[str, Any]]]: ...

    def publish(self, message: Mapping[str, Any]) -> Deferred[None] | None: ...

    def listen(self, listener: Callable[[Mapping[str, Any]], None]) -> None: ...


class CountView:
    """
    One kind of connection count, read like a L{txwssec.limits.ConnectionCounter}
    (C{total}, C{count(key)}, C{len()}).
    """

    __slots__ = ("_kind", "_store")

    def __init__(self, store: StateStore, kind: str) -> None:
        self._store = store
        self._kind = kind

    @property
    def total(self) -> int:
        """Live connections, all keys."""
        return self._store.total(self._kind)

    def count(self, key: str) -> int:
        """Live connections under C{key}."""
        return self._store.count(self._kind, key)

    def __len__(self) -> int:
        """How many keys have live connections."""
        return self._store.keys(self._kind)
