"""
A consumer's rate bucket shared by several processes (the Redis store,
L{txwssec.store.redis}): a local bucket in front of one in Redis.
"""

from __future__ import annotations

from collections.abc import Callable

from txwssec.limits import TokenBucket


class SharedBucket(TokenBucket):
    """
    A consumer's bucket on this node, in front of the consumer's bucket in
    Redis: it takes locally (as L{TokenBucket}, per frame, no I/O) and
    reports what it took in batches (C{batch} tokens, about a twentieth of
    a second at the rate); Redis answers what the consumer has left across
    every node, and a local bucket with more is brought down to it. A
    consumer over its rate on several nodes together is thus caught within
    a batch per node.
    """

    __slots__ = ("_batch", "_key", "_report", "_used")

    def __init__(
        self,
        rate: float,
        burst: float,
        now: float,
        key: str,
        report: Callable[[SharedBucket, float], None],
    ) -> None:
        super().__init__(rate, burst, now)
        self._key = key
        self._report = report
        self._used = 0.0
        self._batch = max(1.0, rate / 20)

    def take(self, amount: float, now: float) -> bool:
        if not TokenBucket.take(self, amount, now):
            return False
        used = self._used + amount
        if used >= self._batch:
            self._used = 0.0
            self._report(self, used)
        else:
            self._used = used
        return True

    def settle(self, left: float) -> None:
        """Redis says the consumer has C{left} tokens, on every node together."""
        if left < self._tokens:
            self._tokens = left
