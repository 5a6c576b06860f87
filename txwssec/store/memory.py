"""
The in-memory state store: everything in this process, bounded, shrinking
back as connections end and entries expire.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from zope.interface import implementer

from txwssec.limits import ConnectionCounter, FailureWindow
from txwssec.store.interface import IStateStore, Lease

T = TypeVar("T")


@implementer(IStateStore)
class MemoryStore:
    """
    L{IStateStore} in this process's memory.

    @ivar failures: the failure lockout's window (L{FailureWindow}).
    """

    def __init__(self, failure_limit: int = 0) -> None:
        self._counts: dict[str, ConnectionCounter] = {}
        self._shared: dict[str, Any] = {}
        self.failures = FailureWindow(failure_limit)
        self._tickets: dict[str, tuple[Mapping[str, Any], float]] = {}
        self._revoked: dict[str, float] = {}
        self._sessions: dict[str, Mapping[str, Any]] = {}

    @property
    def failure_limit(self) -> int:
        """Failures per key per minute before the lockout (0: off)."""
        return self.failures.limit

    def counter(self, kind: str) -> ConnectionCounter:
        """The counter of C{kind} (made when first used)."""
        counter = self._counts.get(kind)
        if counter is None:
            counter = self._counts[kind] = ConnectionCounter()
        return counter

    def acquire(self, kind: str, key: str, cap: int, *, along: Lease | None = None) -> bool:
        counter = self.counter(kind)
        if cap and counter.count(key) >= cap:
            return False
        counter.acquire(key)
        return True

    def release(self, kind: str, key: str) -> None:
        self.counter(kind).release(key)

    def count(self, kind: str, key: str) -> int:
        return self.counter(kind).count(key)

    def total(self, kind: str) -> int:
        return self.counter(kind).total

    def keys(self, kind: str) -> int:
        return len(self.counter(kind))

    def shared(self, key: str, make: Callable[[], T]) -> T:
        value: T | None = self._shared.get(key)
        if value is None:
            value = self._shared[key] = make()
        return value

    def forget(self, key: str) -> None:
        self._shared.pop(key, None)

    def record_failure(self, key: str, now: float) -> None:
        self.failures.record(key, now)

    def blocked_for(self, key: str, now: float) -> float:
        return self.failures.blocked_for(key, now)

    def put_ticket(
        self, ticket: str, value: Mapping[str, Any], expires_at: float, now: float
    ) -> None:
        _expire(self._tickets, lambda entry: entry[1], now)
        self._tickets[ticket] = (value, expires_at)

    def take_ticket(self, ticket: str, now: float) -> Mapping[str, Any] | None:
        entry = self._tickets.pop(ticket, None)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def revoke(self, key: str, until: float, now: float) -> None:
        _expire(self._revoked, lambda until: until, now)
        self._revoked[key] = max(until, self._revoked.get(key, until))

    def revoked(self, key: str, now: float) -> bool:
        until = self._revoked.get(key)
        return until is not None and until > now

    def add_session(self, session_id: str, record: Mapping[str, Any]) -> None:
        self._sessions[session_id] = record

    def remove_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def sessions(self) -> list[Mapping[str, Any]]:
        return list(self._sessions.values())

    def publish(self, message: Mapping[str, Any]) -> None:
        """Nobody else to tell: this process is the only one."""

    def listen(self, listener: Callable[[Mapping[str, Any]], None]) -> None:
        """Nobody else publishes."""


def _expire(entries: dict[str, Any], expiry: Callable[[Any], float], now: float) -> None:
    """
    Drop the entries expired at C{now} when their count reaches a power of
    two (64 or more): amortised constant time per entry, and memory bounded
    by about twice the live entries.
    """
    if len(entries) >= 64 and len(entries) & (len(entries) - 1) == 0:
        for key in [key for key, value in entries.items() if expiry(value) <= now]:
            del entries[key]
