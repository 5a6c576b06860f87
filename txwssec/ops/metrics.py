"""
Prometheus metrics of one server, with C{prometheus_client}, in a registry
of their own (never the global one: tests and several servers in one
process do not clash).

They are fed by an observer of the server's events (L{txwssec.events}),
never per message: handshakes, refusals, session ends and limits are
counted when their event is emitted. What changes per message is read at
scrape time instead, by a collector: the open connections per route, and
the messages and bytes of the open sessions (Autobahn's counters on each
connection) added to those of the sessions that have closed. So
C{wssec_messages_total} and C{wssec_bytes_total} are exact when scraped.

Labels stay low-cardinality: routes are configured paths (C{-} for a path
no route serves), methods configured names, statuses and limits fixed
lists; no peer address, no consumer name, no client-chosen close code
(C{code} is the code the server sent, or C{peer} when the peer closed).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from txwssec import events
from txwssec.sessions import SessionRegistry

#: The handshake duration histogram's buckets, in seconds.
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: The directions of C{messages_total} and C{bytes_total}.
DIRECTIONS = ("in", "out")


class Metrics:
    """
    The C{wssec_*} metrics of a server, fed by its events.

    @param factory: the server factory (its C{events} and C{registry}).
    @param registry: where the metrics are registered; a new
        L{CollectorRegistry} by default.
    @ivar registry: the registry to expose (see L{txwssec.ops.admin}).
    """

    def __init__(self, factory: Any, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        self.handshakes = Counter(
            "wssec_handshakes",
            "Opening handshakes by route, method and HTTP status (101: accepted).",
            ["route", "method", "status"],
            registry=registry,
        )
        self.handshake_duration = Histogram(
            "wssec_handshake_duration_seconds",
            "Time from a complete handshake request to the server's answer.",
            ["route"],
            buckets=HANDSHAKE_BUCKETS,
            registry=registry,
        )
        self.sessions_closed = Counter(
            "wssec_sessions_closed",
            "Sessions ended, by route and the close code the server sent (peer: the peer closed).",
            ["route", "code"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "wssec_auth_failures",
            "Handshakes refused by authentication (401, or 403 by a method).",
            ["route", "method"],
            registry=registry,
        )
        self.limit_violations = Counter(
            "wssec_limit_violations",
            "Connections refused or closed by a limit.",
            ["route", "limit"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "wssec_upstream_errors",
            "Gateway upstream failures (timeout, refused, lost).",
            ["route", "kind"],
            registry=registry,
        )
        self.refreshes = Counter(
            "wssec_refreshes",
            "In-band credential refreshes by outcome.",
            ["route", "outcome"],
            registry=registry,
        )
        self._handshake_children: dict[tuple[str, str, str], Any] = {}
        self._duration_children: dict[str, Any] = {}
        self._closed_children: dict[tuple[str, str], Any] = {}
        self.traffic = LiveTraffic(factory.registry)
        registry.register(self.traffic)
        self._handlers: Mapping[str, Callable[[Mapping[str, Any]], None]] = {
            events.HANDSHAKE_ACCEPTED: self._accepted,
            events.HANDSHAKE_REFUSED: self._refused,
            events.SESSION_CLOSED: self._closed,
            events.LIMIT_EXCEEDED: self._limit,
            events.UPSTREAM_FAILED: self._upstream,
            events.UPSTREAM_LOST: self._upstream,
            events.SESSION_REFRESHED: self._refresh,
            events.SESSION_REFRESH_REJECTED: self._refresh,
            events.MESSAGE_REFUSED: self._message_refused,
        }
        factory.events.add(self)

    def __call__(self, event: str, fields: Mapping[str, Any]) -> None:
        handler = self._handlers.get(event)
        if handler is not None:
            handler(fields)

    def _accepted(self, fields: Mapping[str, Any]) -> None:
        route = fields["route"]
        self._handshake(route, fields["method"], "101")
        duration = fields.get("duration_s")
        if duration is not None:
            self._duration(route).observe(duration)

    def _handshake(self, route: str, method: str, status: str) -> None:
        # The labelled children, found once (labels() costs a lock and more).
        key = (route, method, status)
        child = self._handshake_children.get(key)
        if child is None:
            child = self._handshake_children[key] = self.handshakes.labels(*key)
        child.inc()

    def _duration(self, route: str) -> Any:
        child = self._duration_children.get(route)
        if child is None:
            child = self._duration_children[route] = self.handshake_duration.labels(route)
        return child

    def _refused(self, fields: Mapping[str, Any]) -> None:
        route, status, method = fields["route"], fields["status"], fields["method"] or "-"
        self._handshake(route, method, str(status))
        duration = fields.get("duration_s")
        if duration is not None and route != "-":
            self._duration(route).observe(duration)
        if status == 401 or (status == 403 and fields["method"]):
            self.auth_failures.labels(route, method).inc()
        limit = fields.get("limit")
        if limit:
            self.limit_violations.labels(route, _limit_name(limit)).inc()

    def _closed(self, fields: Mapping[str, Any]) -> None:
        route = fields["route"]
        if fields.get("initiator") == "server":
            code = fields.get("code")
            label = "none" if code is None else str(code)
        else:
            label = "peer"
        key = (route, label)
        child = self._closed_children.get(key)
        if child is None:
            child = self._closed_children[key] = self.sessions_closed.labels(*key)
        child.inc()
        self.traffic.closed(route, fields)

    def _limit(self, fields: Mapping[str, Any]) -> None:
        self.limit_violations.labels(fields.get("route", "-"), _limit_name(fields["limit"])).inc()

    def _refresh(self, fields: Mapping[str, Any]) -> None:
        self.refreshes.labels(fields.get("route", "-"), fields["outcome"]).inc()

    def _message_refused(self, fields: Mapping[str, Any]) -> None:
        # Rules are a fixed set (binary, text, json, depth, schema): bounded.
        self.limit_violations.labels(fields.get("route", "-"), f"message.{fields['rule']}").inc()

    def _upstream(self, fields: Mapping[str, Any]) -> None:
        self.upstream_errors.labels(fields.get("route", "-"), fields.get("kind", "lost")).inc()


def _limit_name(counter: str) -> str:
    """C{limit.message_rate} -> C{message_rate}."""
    return counter.removeprefix("limit.")


class LiveTraffic:
    """
    A collector read at scrape time: C{wssec_connections_open{route}}, and
    C{wssec_messages_total} and C{wssec_bytes_total} by route and direction
    (the closed sessions' figures, kept by L{closed}, plus the open ones'
    counters).
    """

    def __init__(self, registry: SessionRegistry) -> None:
        self._registry = registry
        self._messages: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._bytes: defaultdict[tuple[str, str], int] = defaultdict(int)

    def closed(self, route: str, fields: Mapping[str, Any]) -> None:
        """Add a closed session's traffic (its C{session.closed} fields)."""
        messages, octets = self._messages, self._bytes
        messages[route, "in"] += fields.get("messages_in", 0)
        messages[route, "out"] += fields.get("messages_out", 0)
        octets[route, "in"] += fields.get("bytes_in", 0)
        octets[route, "out"] += fields.get("bytes_out", 0)

    def describe(self) -> list[Metric]:
        """The metric families (no samples: nothing is read to describe)."""
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        """The families with their samples, read now."""
        opened: defaultdict[str, int] = defaultdict(int)
        messages = defaultdict(int, self._messages)
        octets = defaultdict(int, self._bytes)
        for protocol in self._registry:
            session = protocol.session
            if session is None:
                continue
            route = session.route
            opened[route] += 1
            stats = getattr(protocol, "trafficStats", None)
            if stats is not None:
                messages[route, "in"] += stats.incomingWebSocketMessages
                messages[route, "out"] += stats.outgoingWebSocketMessages
                octets[route, "in"] += stats.incomingOctetsWireLevel
                octets[route, "out"] += stats.outgoingOctetsWireLevel
        connections, message_family, byte_family = self._families()
        for route, count in sorted(opened.items()):
            connections.add_metric([route], count)
        for (route, direction), value in sorted(messages.items()):
            message_family.add_metric([route, direction], value)
        for (route, direction), value in sorted(octets.items()):
            byte_family.add_metric([route, direction], value)
        yield from (connections, message_family, byte_family)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily]:
        return (
            GaugeMetricFamily(
                "wssec_connections_open", "Open WebSocket sessions by route.", labels=["route"]
            ),
            CounterMetricFamily(
                "wssec_messages",
                "WebSocket messages by route and direction (in: from clients).",
                labels=["route", "direction"],
            ),
            CounterMetricFamily(
                "wssec_bytes",
                "Bytes on the wire of open sessions by route and direction.",
                labels=["route", "direction"],
            ),
        )
