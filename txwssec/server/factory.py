"""
The secure server factory: it holds what a listener's connections share
(the policy, admission, timers, the session registry, the observers).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from autobahn.exception import PayloadExceededError
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet.interfaces import IReactorTime
from twisted.python.reflect import namedAny

from txwssec._reactor import default_reactor
from txwssec.admission import Admission
from txwssec.deadlines import Deadlines
from txwssec.events import Events
from txwssec.messages.validation import validator_for
from txwssec.observers import CounterObserver, TextLogObserver, securityLog
from txwssec.policy import RoutePolicy, ServerPolicy
from txwssec.readiness import Readiness
from txwssec.revocations import Revocations
from txwssec.server.context import ServerContext
from txwssec.server.protocol import SecureServerProtocol
from txwssec.sessions import SessionRegistry
from txwssec.store import CountView, StateStore


class SecureServerFactory(WebSocketServerFactory):
    """
    An Autobahn server factory enforcing a L{ServerPolicy}.

    @ivar policy: the policy.
    @ivar clock: the reactor used for timers.
    @ivar deadlines: the connections' timers (L{Deadlines} on C{clock}).
    @ivar admission: connection counters and caps (L{Admission}), in the state
        store given (C{store}: shared with other processes), or in memory.
    @ivar registry: the open sessions by id, consumer and route
        (L{SessionRegistry}); C{sessions} is its index by consumer.
    @ivar revocations: revoked tokens, in the state store (L{Revocations}):
        a revoked token is refused with 401.
    @ivar readiness: the checks of C{GET /readyz} (L{Readiness}).
    @ivar upstreamPools: the gateway's upstream pools by route path.
    @ivar events: the observers of this server's events (L{Events}): the
        counters and the text log from the start; add your own with
        C{events.add(observer)}.
    @ivar counters: events by name (fed by the events): C{handshake.refused.<status>},
        C{session.opened}, C{session.expired|revoked|idle}, and one
        C{limit.<name>} per limit that refused a handshake or closed a
        connection (C{limit.message_rate}, C{limit.max_buffered_bytes}...),
        and C{application.error} per error in an application hook.
    """

    protocol = SecureServerProtocol  # type: ignore[assignment]
    #: Set when the server stops (see L{txwssec.lifecycle.drain}): every
    #: handshake still running, or arriving, gets 503.
    stopping = False

    def __init__(
        self,
        policy: ServerPolicy | RoutePolicy,
        *,
        reactor: IReactorTime | None = None,
        server: str = "txwssec",
        store: StateStore | None = None,
    ) -> None:
        if reactor is None:
            reactor = default_reactor()
        super().__init__(reactor=reactor, server=server)
        if isinstance(policy, RoutePolicy):
            policy = ServerPolicy.single(policy)
        self._protocols = {route.path: (route, _resolve(route)) for route in policy.routes}
        for route in policy.routes:
            validator_for(route.messages)  # compiled now: a bad schema fails here
        self.policy = policy
        self.clock: IReactorTime = reactor
        self.setProtocolOptions(**policy.protocol_options())
        self.deadlines = Deadlines(reactor)
        # Autobahn's own per-connection timers (handshake timeouts,
        # auto-ping) go to the same heap: exact, and no DelayedCall each.
        self._batched_timer = self.deadlines
        self.admission = Admission(policy, store)
        self.registry = SessionRegistry(self.admission.store)
        self.revocations = Revocations(self.admission.store, reactor)
        self.readiness = Readiness()
        self.counters: Counter[str] = Counter()
        self.events = Events([CounterObserver(self.counters), TextLogObserver()])
        self.upstreamPools: dict[str, Any] = {}

    def usePolicy(self, policy: ServerPolicy) -> None:
        """
        Serve new handshakes with C{policy} (a reload, see
        L{txwssec.lifecycle}). Everything that can fail (resolving the
        routes' classes: L{TypeError}) is done before anything changes; a
        handshake already running and the open sessions keep the route
        they started with. Listeners and the state store stay.
        """
        protocols = {route.path: (route, _resolve(route)) for route in policy.routes}
        options = policy.protocol_options()
        self._protocols = protocols
        self.policy = self.admission.policy = policy
        self.setProtocolOptions(**options)
        # Upstream pools start again from the new routes' upstreams.
        self.upstreamPools = {}

    @property
    def connections(self) -> CountView:
        """Admitted connections, in total and per client address."""
        return self.admission.connections

    @property
    def sessions(self) -> dict[str, set[Any]]:
        """The open sessions by consumer (see L{registry})."""
        return self.registry.by_consumer

    def sessionOpened(self, protocol: Any) -> None:
        """Track an open session (see L{registry})."""
        self.registry.add(protocol, self.clock.seconds())

    def sessionClosed(self, protocol: Any) -> None:
        """Stop tracking a session."""
        self.registry.remove(protocol)

    def openSessions(self, route: str | None = None) -> list[Any]:
        """
        The sessions that are open now (not closing), on C{route} (a path)
        or on every application route: a new list, so that sessions may
        close while the caller goes through it. Gateway sessions are left
        out: their messages come from their upstream.

        @raise ValueError: C{route} is a gateway route.
        """
        self._notGateway(route)
        return self.registry.open(route, gateways=False)

    def _notGateway(self, route: str | None) -> None:
        known = self._protocols.get(route) if route is not None else None
        if known is not None and known[0].upstream is not None:
            raise ValueError(
                f"route {route} is a gateway route: its clients' messages come from their upstream"
            )

    def broadcast(
        self, payload: bytes, isBinary: bool = False, *, route: str | None = None
    ) -> int:
        """
        Send one message to every open session of C{route} (a path; all
        application routes if L{None}), from any handler or timer. Sessions
        that are closing, or that close during the broadcast (a slow
        consumer), are skipped. So are sessions whose route's
        C{max_message_size} (which bounds what is sent too) is below the
        message's size, with one warning. For application routes only:
        gateway sessions are left out, their clients' messages come from
        their upstream.

        @return: how many sessions it was sent to.
        @raise ValueError: C{route} is a gateway route.
        """
        self._notGateway(route)
        sent = too_big = 0
        size = len(payload)
        for protocol in self.registry.open(route, gateways=False):
            policy = protocol.route
            if policy is not None and size > policy.max_message_size:
                too_big += 1
                continue
            try:
                if protocol.sendMessage(payload, isBinary):
                    sent += 1
            except PayloadExceededError:  # compressed, a little over the limit
                too_big += 1
        if too_big:
            securityLog.warn(
                "broadcast of {size} bytes not sent to {count} sessions: over max_message_size",
                size=size,
                count=too_big,
            )
        return sent

    def protocolFor(self, route: RoutePolicy) -> type[SecureServerProtocol] | None:
        """
        The protocol class serving C{route}: its own (a class, or an import
        string resolved when this factory was made), the gateway's for an
        upstream route, or L{None} for this factory's C{protocol}.
        """
        cached = self._protocols.get(route.path)
        if cached is not None and cached[0] is route:
            return cached[1]
        return _resolve(route)  # a route of another policy

    def upstreamPool(self, route: RoutePolicy) -> Any:
        """
        The round-robin pool of C{route}'s upstream, one per route (see
        L{txwssec.gateway.upstream.pool_for}, named by its import string:
        the server does not import the gateway).
        """
        return namedAny("txwssec.gateway.upstream.pool_for")(self, route)

    def revoke(self, consumer: str) -> int:
        """
        Close every open session of C{consumer} with 3003.

        @return: how many sessions were closed.
        """
        return self.registry.revoke(consumer)


#: The gateway's client leg, the protocol of an upstream route without its
#: own: an import string, so that the server does not import the gateway
#: (which builds on it).
GATEWAY_PROTOCOL = "txwssec.gateway.GatewayProtocol"


def _resolve(route: RoutePolicy) -> type[SecureServerProtocol] | None:
    """
    The protocol class of C{route} (see L{RoutePolicy.protocol}): its class,
    or the class its import string names; the gateway's for an upstream
    route without one.

    @raise TypeError: it is not a L{SecureServerProtocol} subclass (a
        L{txwssec.gateway.GatewayProtocol} subclass for an upstream route).
    """
    protocol: Any = route.protocol
    if isinstance(protocol, str):
        try:
            protocol = namedAny(protocol)
        except (AttributeError, ValueError, ImportError) as error:
            raise TypeError(f"route {route.path}: cannot import protocol {protocol!r}") from error
    if protocol is not None and not (
        isinstance(protocol, type) and issubclass(protocol, SecureServerProtocol)
    ):
        raise TypeError(f"route {route.path}: protocol must subclass SecureServerProtocol")
    if route.upstream is not None:
        gateway: type[SecureServerProtocol] = namedAny(GATEWAY_PROTOCOL)
        if protocol is None:
            return gateway
        if not issubclass(protocol, gateway):
            raise TypeError(
                f"route {route.path}: an upstream route's protocol must subclass GatewayProtocol"
            )
    resolved: type[SecureServerProtocol] | None = protocol
    return resolved


#: The factory implements what its protocols need of it.
_implements: type[ServerContext] = SecureServerFactory
