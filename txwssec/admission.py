"""
Admission: who may open a connection now. Global and per-address caps, the
failed-authentication window per address, and per-consumer caps with the
buckets a consumer's connections share.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from functools import lru_cache

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from txwssec._defer import is_deferred
from txwssec.errors import ServiceUnavailable, TooManyRequests
from txwssec.limits import ADDRESSES_REMEMBERED, FailureWindow, TokenBucket, address_key
from txwssec.logs import bounded
from txwssec.policy import ProxyNetwork, RoutePolicy, ServerPolicy
from txwssec.store import CountView, MemoryStore, StateStore
from txwssec.store.interface import ADDRESS, CONSUMER, AlongRefused

ConsumerBuckets = tuple[TokenBucket | None, TokenBucket | None]

#: At most this many X-Forwarded-For entries are looked at, from the right.
MAX_FORWARDED_ENTRIES = 32


def client_address(
    peer_host: str,
    forwarded_for: Iterable[str],
    trusted_proxies: Sequence[ProxyNetwork],
    hops: int,
) -> str:
    """
    The client's address: the address that connected (C{peer_host}), or,
    when that is a trusted proxy, the address it says it forwarded for.

    The X-Forwarded-For entries (all header lines, comma-separated) are
    walked from the right, at most C{hops} of them: each entry is believed
    only while the address it came from is in C{trusted_proxies}, and must
    parse as an IP address (L{ipaddress.ip_address}); the walk stops at the
    first address that is not a trusted proxy, at the first entry that is
    not an address (the last believed address is used), or after C{hops}.

    @return: an IP address in its normal text form (an IPv4-mapped IPv6
        address as IPv4), or C{peer_host} if it is not an IP address.
    """
    if not (hops and trusted_proxies):
        return _address_text(peer_host)
    current = _parse_address(peer_host)
    if current is None:
        return peer_host
    entries = [entry for value in forwarded_for for entry in value.split(",")]
    entries = entries[-min(hops, MAX_FORWARDED_ENTRIES) :]
    for entry in reversed(entries):
        if not any(current in network for network in trusted_proxies):
            break
        forwarded = _parse_address(entry.strip())
        if forwarded is None:
            break
        current = forwarded
    return str(current)


def is_trusted_proxy(host: str, trusted_proxies: Sequence[ProxyNetwork]) -> bool:
    """Whether the address C{host} is in one of C{trusted_proxies}."""
    address = _parse_address(host)
    return address is not None and any(address in network for network in trusted_proxies)


@lru_cache(maxsize=ADDRESSES_REMEMBERED)
def _address_text(peer_host: str) -> str:
    """C{peer_host} in its normal text form, if it is an IP address."""
    current = _parse_address(peer_host)
    return peer_host if current is None else str(current)


def _parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if len(text) > 64:  # longer than any address text (with a zone index)
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Admission:
    """
    Connection admission for one server policy. Its state (connection
    counts per client address and per consumer, the buckets a consumer's
    connections share, the failure lockout) is in a state store
    (L{txwssec.store}): in memory unless another is given, shrinking back
    as connections end.

    Client addresses are counted under L{address_key}: an IPv6 client's
    whole /64 shares one per-address cap and one failure window.

    @ivar store: the state store.
    @ivar connections: admitted connections, in total and per address key.
    @ivar consumers: connections per route and consumer.
    """

    def __init__(self, policy: ServerPolicy, store: StateStore | None = None) -> None:
        self.policy = policy
        if store is None:
            store = MemoryStore(policy.auth_failures_per_minute)
        self.store: StateStore = store
        self.connections = CountView(store, ADDRESS)
        self.consumers = CountView(store, CONSUMER)

    @property
    def auth_failures(self) -> FailureWindow:
        """The failure lockout's window, with the in-memory store."""
        failures: FailureWindow = getattr(self.store, "failures")  # noqa: B009
        return failures

    @auth_failures.setter
    def auth_failures(self, window: FailureWindow) -> None:
        setattr(self.store, "failures", window)  # noqa: B010

    def admit(self, host: str, now: float) -> Deferred[None] | None:
        """
        Count a connection from C{host}, or refuse it. With a store that
        asks another process (Redis), a L{Deferred} that fires when it is
        counted (cancelled: not counted); else L{None} once it is.

        @raise ServiceUnavailable: the server is at C{max_connections} (or
            the state store cannot answer).
        @raise TooManyRequests: C{host} is at C{max_connections_per_ip}, or
            has failed authentication too often (with C{Retry-After}).
        """
        host = address_key(host)
        if self.policy.auth_failures_per_minute:
            wait = self.store.blocked_for(host, now)
            if is_deferred(wait):
                return wait.addCallback(self._blocked, host).addCallback(self._count, host)
            self._blocked(wait, host)
        return self._count(None, host)

    def _blocked(self, wait: float, host: str) -> None:
        if wait:
            raise TooManyRequests(
                f"auth_failures_per_minute reached for {bounded(host)}",
                (("Retry-After", str(max(1, round(wait)))),),
                counter="limit.auth_failures",
            )

    def _count(self, _: None, host: str) -> Deferred[None] | None:
        policy, store = self.policy, self.store
        if policy.max_connections and store.total(ADDRESS) >= policy.max_connections:
            raise ServiceUnavailable("max_connections reached", counter="limit.max_connections")
        counted = store.acquire(ADDRESS, host, policy.max_connections_per_ip)
        if is_deferred(counted):
            return counted.addCallback(self._counted, host)
        if not counted:
            self._counted(counted, host)
        return None

    def _counted(self, counted: bool, host: str) -> None:
        if not counted:
            raise TooManyRequests(
                f"max_connections_per_ip reached for {bounded(host)}",
                counter="limit.max_connections_per_ip",
            )

    def release(self, host: str) -> None:
        """Forget a connection counted by L{admit}."""
        self.store.release(ADDRESS, address_key(host))

    def authentication_failed(self, host: str, now: float) -> None:
        """Count a failed authentication from C{host}."""
        if self.policy.auth_failures_per_minute:
            self.store.record_failure(address_key(host), now)

    def admit_consumer(
        self, route: RoutePolicy, consumer: str, now: float, host: str | None = None
    ) -> ConsumerBuckets | Deferred[ConsumerBuckets]:
        """
        Count a connection of C{consumer} on C{route}, or refuse it (a
        L{Deferred} when the store asks another process, as L{admit}).

        @param host: the address L{admit} counted the connection under: a
            store shared by several processes checks its per-address cap
            across them here, in the same step (one round trip).
        @return: the message and byte buckets shared by the consumer's
            connections on the route (L{None} where off).
        @raise TooManyRequests: at C{connections_per_consumer} (or
            C{max_connections_per_ip}, across processes).
        """
        key = _consumer_key(route, consumer)
        cap = route.limits.connections_per_consumer
        per_ip = self.policy.max_connections_per_ip
        if host is None or not per_ip:
            counted = self.store.acquire(CONSUMER, key, cap)
        else:
            host = address_key(host)
            counted = self.store.acquire(CONSUMER, key, cap, along=(ADDRESS, host, per_ip))
        if is_deferred(counted):
            counting = counted.addCallback(self._consumerCounted, route, consumer, now)
            return counting.addErrback(self._addressFull, host or "")
        return self._consumerCounted(counted, route, consumer, now)

    def _addressFull(self, failure: Failure, host: str) -> ConsumerBuckets:
        failure.trap(AlongRefused)
        raise TooManyRequests(
            f"max_connections_per_ip reached for {bounded(host)}",
            counter="limit.max_connections_per_ip",
        )

    def _consumerCounted(
        self, counted: bool, route: RoutePolicy, consumer: str, now: float
    ) -> ConsumerBuckets:
        if not counted:
            raise TooManyRequests(
                f"connections_per_consumer reached for {bounded(consumer)}",
                counter="limit.connections_per_consumer",
            )
        limits = route.limits

        def make() -> ConsumerBuckets:
            messages = bytes_ = None
            if limits.consumer_messages_per_second:
                rate = limits.consumer_messages_per_second
                messages = TokenBucket(rate, limits.message_burst(rate), now)
            if limits.consumer_bytes_per_second:
                rate = limits.consumer_bytes_per_second
                bytes_ = TokenBucket(rate, limits.byte_burst(rate, route.max_message_size), now)
            return messages, bytes_

        return self.store.shared(_consumer_key(route, consumer), make)

    def release_consumer(self, route: RoutePolicy, consumer: str) -> None:
        """Forget a connection counted by L{admit_consumer}."""
        key = _consumer_key(route, consumer)
        store = self.store
        store.release(CONSUMER, key)
        if not store.count(CONSUMER, key):
            store.forget(key)


def _consumer_key(route: RoutePolicy, consumer: str) -> str:
    return f"{route.path}\x00{consumer}"
