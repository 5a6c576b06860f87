"""
Connection counters: global, per client address, per consumer.
"""

from __future__ import annotations

from collections import Counter


class ConnectionCounter:
    """
    Counts live connections in total and per key (an IP address or a
    consumer name). Keys whose count drops to zero are forgotten, so memory
    follows live connections only.
    """

    def __init__(self) -> None:
        self.total = 0
        self._per_key: Counter[str] = Counter()

    def count(self, key: str) -> int:
        """Live connections for C{key}."""
        return self._per_key.get(key, 0)

    def acquire(self, key: str) -> None:
        """One more connection for C{key}."""
        self.total += 1
        self._per_key[key] += 1

    def release(self, key: str) -> None:
        """One connection fewer for C{key}."""
        self.total -= 1
        remaining = self._per_key[key] - 1
        if remaining > 0:
            self._per_key[key] = remaining
        else:
            del self._per_key[key]

    def __len__(self) -> int:
        """How many keys have live connections."""
        return len(self._per_key)
