"""
Admission: who may open a connection now. Global and per-address caps, the
failed-authentication window per address, and per-consumer caps with the
buckets a consumer's connections share.
"""

from __future__ import annotations

from txwssec.errors import ServiceUnavailable, TooManyRequests
from txwssec.limits import ConnectionCounter, FailureWindow, TokenBucket
from txwssec.logs import bounded
from txwssec.policy import RoutePolicy, ServerPolicy

ConsumerBuckets = tuple[TokenBucket | None, TokenBucket | None]


class Admission:
    """
    Connection admission for one server policy. All state is in memory and
    shrinks back as connections end.
    """

    def __init__(self, policy: ServerPolicy) -> None:
        self.policy = policy
        self.connections = ConnectionCounter()
        self.consumers = ConnectionCounter()
        self.auth_failures = FailureWindow(policy.auth_failures_per_minute)
        self._buckets: dict[str, ConsumerBuckets] = {}

    def admit(self, host: str, now: float) -> None:
        """
        Count a connection from C{host}, or refuse it.

        @raise ServiceUnavailable: the server is at C{max_connections}.
        @raise TooManyRequests: C{host} is at C{max_connections_per_ip}, or
            has failed authentication too often (with C{Retry-After}).
        """
        policy = self.policy
        if policy.auth_failures_per_minute:
            wait = self.auth_failures.blocked_for(host, now)
            if wait:
                raise TooManyRequests(
                    f"auth_failures_per_minute reached for {bounded(host)}",
                    (("Retry-After", str(max(1, round(wait)))),),
                    counter="limit.auth_failures",
                )
        if policy.max_connections and self.connections.total >= policy.max_connections:
            raise ServiceUnavailable("max_connections reached", counter="limit.max_connections")
        per_ip = policy.max_connections_per_ip
        if per_ip and self.connections.count(host) >= per_ip:
            raise TooManyRequests(
                f"max_connections_per_ip reached for {bounded(host)}",
                counter="limit.max_connections_per_ip",
            )
        self.connections.acquire(host)

    def release(self, host: str) -> None:
        """Forget a connection counted by L{admit}."""
        self.connections.release(host)

    def authentication_failed(self, host: str, now: float) -> None:
        """Count a failed authentication from C{host}."""
        if self.policy.auth_failures_per_minute:
            self.auth_failures.record(host, now)

    def admit_consumer(self, route: RoutePolicy, consumer: str, now: float) -> ConsumerBuckets:
        """
        Count a connection of C{consumer} on C{route}, or refuse it.

        @return: the message and byte buckets shared by the consumer's
            connections on the route (L{None} where off).
        @raise TooManyRequests: at C{connections_per_consumer}.
        """
        limits = route.limits
        key = _consumer_key(route, consumer)
        cap = limits.connections_per_consumer
        if cap and self.consumers.count(key) >= cap:
            raise TooManyRequests(
                f"connections_per_consumer reached for {bounded(consumer)}",
                counter="limit.connections_per_consumer",
            )
        self.consumers.acquire(key)
        buckets = self._buckets.get(key)
        if buckets is None:
            messages = bytes_ = None
            if limits.consumer_messages_per_second:
                rate = limits.consumer_messages_per_second
                messages = TokenBucket(rate, limits.message_burst(rate), now)
            if limits.consumer_bytes_per_second:
                rate = limits.consumer_bytes_per_second
                bytes_ = TokenBucket(rate, limits.byte_burst(rate, route.max_message_size), now)
            buckets = self._buckets[key] = (messages, bytes_)
        return buckets

    def release_consumer(self, route: RoutePolicy, consumer: str) -> None:
        """Forget a connection counted by L{admit_consumer}."""
        key = _consumer_key(route, consumer)
        self.consumers.release(key)
        if not self.consumers.count(key):
            self._buckets.pop(key, None)


def _consumer_key(route: RoutePolicy, consumer: str) -> str:
    return f"{route.path}\x00{consumer}"
