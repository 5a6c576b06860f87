"""
Connection counters: global, per client address, per consumer.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from functools import lru_cache

#: IPv6 clients are counted per /64: one host usually has a whole /64, and
#: would otherwise escape per-address limits by rotating its interface ID.
IPV6_KEY_PREFIX = 64


#: How many addresses L{address_key} and the client address remember (a
#: pure function of a string: remembered, it is not parsed again for every
#: connection of the same client; a flood of new addresses only evicts).
ADDRESSES_REMEMBERED = 4096


@lru_cache(maxsize=ADDRESSES_REMEMBERED)
def address_key(host: str) -> str:
    """
    The key an address is counted under for per-address caps and the
    failed-authentication window: an IPv4 address as written, an IPv6
    address as its /64 (C{2001:db8::/64}), an IPv4-mapped IPv6 address as
    its IPv4 address. Anything else (a UNIX socket's peer) is kept, cut to
    64 characters.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        network = ipaddress.IPv6Network((address, IPV6_KEY_PREFIX), strict=False)
        return str(network)
    return str(address)


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


class TokenBucket:
    """
    A token bucket refilled lazily from a clock reading: C{rate} tokens per
    second up to C{burst}. No timer runs; each L{take} costs one clock read.
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = now

    def available(self, now: float) -> float:
        """The tokens there are at C{now} (nothing is taken)."""
        tokens = self._tokens + (now - self._last) * self.rate
        return self.burst if tokens > self.burst else tokens

    def take(self, amount: float, now: float) -> bool:
        """
        Take C{amount} tokens if available.

        @return: whether they were available (if not, none are taken).
        """
        tokens = self._tokens + (now - self._last) * self.rate
        if tokens > self.burst:  # (not min(): this runs for every frame)
            tokens = self.burst
        self._last = now
        if tokens < amount:
            self._tokens = tokens
            return False
        self._tokens = tokens - amount
        return True


class FailureWindow:
    """
    Counts events (failed authentications) per key over a sliding minute,
    with a bound on how many keys it remembers.

    Each key keeps a fixed-window pair (current and previous minute), and the
    estimate is weighted like a sliding window: cheap and close enough.

    At C{max_keys} the least recently failed key is forgotten. With keys
    from L{address_key} (at most 24 characters for an IPv6 /64), 100,000
    keys take about 20 MiB.
    """

    def __init__(self, limit: int, window: float = 60.0, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._counts: dict[str, tuple[int, int, int]] = {}

    def _estimate(self, key: str, now: float) -> tuple[int, int, int, float]:
        slot = int(now // self.window)
        stored_slot, current, previous = self._counts.get(key, (slot, 0, 0))
        if stored_slot == slot - 1:
            current, previous = 0, current
        elif stored_slot != slot:
            current, previous = 0, 0
        elapsed = (now % self.window) / self.window
        return slot, current, previous, current + previous * (1 - elapsed)

    def record(self, key: str, now: float) -> None:
        """Count one event for C{key}."""
        slot, current, previous, _ = self._estimate(key, now)
        if self._counts.pop(key, None) is None and len(self._counts) >= self.max_keys:
            self._forget_oldest()
        # Re-inserted at the end: the first key is the least recently failed.
        self._counts[key] = (slot, current + 1, previous)

    def blocked_for(self, key: str, now: float) -> float:
        """
        Seconds until C{key} may try again (0 when it may now).
        """
        if key not in self._counts:
            return 0.0
        estimate = self._estimate(key, now)[3]
        if estimate < self.limit:
            return 0.0
        return self.window - (now % self.window)

    def _forget_oldest(self) -> None:
        # Dicts keep insertion order: the first key failed least recently.
        del self._counts[next(iter(self._counts))]

    def __len__(self) -> int:
        return len(self._counts)
