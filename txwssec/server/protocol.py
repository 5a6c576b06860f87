"""
The secure server protocol: an Autobahn protocol whose opening handshake
runs txwssec's pipeline (L{SecureServerProtocol.secureHandshake}, top to
bottom in one function) and whose session ends when its credentials do.
Reading the request and answering refusals is L{HandshakeIO}; the open
connection's limits, backpressure and idle timer are L{TrafficFlow}.

A little over 400 lines: the pipeline and everything that ends a session
(expiry, revocation, application errors, the orderly close), read together.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, NoReturn

import txaio
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.compress import (
    PerMessageDeflate,
)
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from txwssec import events
from txwssec._autobahn import (
    cancel_close_timer,
    connection_lost_quietly,
    copy_options_at_once,
    drop_connection_quietly,
)
from txwssec._cycles import FiredWhenOpen, FiredWithProtocol
from txwssec._defer import is_deferred, is_waiting
from txwssec._ends import end_fields
from txwssec._hooks import run_hook, transport_details
from txwssec._wire import stop_read_ahead
from txwssec.admission import ConsumerBuckets
from txwssec.auth.chain import authenticate
from txwssec.compression import (
    BoundedDeflate,
    accept_deflate,
)
from txwssec.deadlines import Deadline
from txwssec.errors import (
    CloseCode,
    Forbidden,
    HandshakeRefused,
    ServiceUnavailable,
    Unauthorized,
)
from txwssec.logs import bounded
from txwssec.messages.sealed_route import negotiate_seal
from txwssec.messages.sealing import PROTOCOL as SEALED_PROTOCOL
from txwssec.messages.validation import MessageValidator, Refusal, validator_for
from txwssec.origin import listener_for
from txwssec.policy import RoutePolicy, ServerPolicy
from txwssec.refresh import is_refresh
from txwssec.server.context import ServerContext
from txwssec.server.flow import TrafficFlow
from txwssec.server.handshake import HandshakeIO
from txwssec.server.refreshing import SessionRefresh
from txwssec.server.ticketing import TicketIssuer
from txwssec.session import Session
from txwssec.subprotocols import select_subprotocol
from txwssec.tickets import redeem
from txwssec.traffic import TrafficGuard
from txwssec.types import Accept, HandshakeRequest


# (mypy: two bases that share Autobahn's, whose own bases disagree on two names.)
class SecureServerProtocol(HandshakeIO, TrafficFlow, SessionRefresh, TicketIssuer):  # type: ignore[misc]
    """
    A WebSocket server protocol whose handshake is authenticated.

    Subclass it and override C{onOpen}, C{onMessage} and C{onClose} as with
    any Autobahn protocol; do not override C{onConnect}. Once open,
    C{self.session} tells who is connected (C{session.principal}) and until
    when (C{session.expires_at}); C{self.route} is the route's policy.

    The session is closed with 3000 when its credentials expire, 3003 when
    they are revoked, and 3008 after C{idle_timeout} without a message or
    when a ping goes unanswered. The route's L{RouteLimits} close it with
    1008 (rates, fragments, control frames), 1009 (message size) and 1013
    (a peer that does not read). This protocol registers itself as the
    transport's producer to learn when the peer stops reading.

    Hooks may be coroutines (C{async def}). An exception in a hook, or a
    coroutine or L{Deferred} of one that fails, closes this connection
    with 1011 and is logged once with its traceback (an error in
    C{onClose} is only logged). C{sendMessage} to a connection that is not
    open does nothing and returns L{False}. Every close ends with an
    orderly TCP close once the peer's close frame has arrived (see
    L{dropConnection}).
    """

    #: Autobahn's logger for this protocol, pinned at "info" whatever txaio's
    #: global level: Autobahn's debug lines quote raw handshakes and frames,
    #: credentials included.
    log = txaio.make_logger(level="info")  # type: ignore[attr-defined]
    #: Empty: the options are copied by L{_connectionMade} (see copy_options).
    CONFIG_ATTRS: list[str] = []
    factory: ServerContext
    session: Session | None = None
    route: RoutePolicy | None = None
    #: The server policy this connection's handshake started with.
    handshakePolicy: ServerPolicy | None = None
    _refusal: HandshakeRefused | None = None
    _admitted_host: str | None = None
    #: The admitted address, kept after release: a failed authentication
    #: counts even if the client reset the connection before the verdict.
    _client_host: str | None = None
    _pipelineStarted: bool = False
    #: The pipeline's result while a step waits (a password hash, an
    #: identity provider, an upstream): cancelled if the client leaves.
    _pending: Deferred[str | None] | None = None
    #: Step 4 waits on a method (see L{_deny}).
    _authenticating: bool = False
    _consumer_admitted: tuple[RoutePolicy, str] | None = None
    _idle_timer: Deadline | None = None
    #: Aborts an orderly close that the peer does not let finish.
    _loseTimer: Deadline | None = None
    _last_message: float = 0.0
    #: When the session opened (for its duration in C{session.closed}).
    _openedAt: float = 0.0
    _guard: TrafficGuard | None = None
    #: The route's message rules, compiled (None: the route checks nothing).
    _validator: MessageValidator | None = None
    # Autobahn's per-connection size limits (set from the route).
    maxFramePayloadSize: int
    maxMessagePayloadSize: int
    _discard_writes: bool = False
    #: Autobahn's Deferred that fires with this protocol when the connection
    #: ends, forgotten once fired (see L{txwssec._cycles}); made when first
    #: read, as C{is_open}.
    is_closed = FiredWithProtocol(madeWhenRead=True)
    is_open = FiredWhenOpen()

    def __init__(self) -> None:
        # Autobahn's WebSocketProtocol.__init__, but for what is made when
        # first read: is_open and is_closed (above), the transport details
        # (txwssec._wire.LazyTransportDetails).
        self.set_valid_events(["message"])

    def _connectionMade(self) -> None:
        copy_options_at_once(self, WebSocketServerProtocol.CONFIG_ATTRS)
        super()._connectionMade()

    # -- the handshake pipeline -------------------------------------------

    def onConnect(  # type: ignore[override]
        self, request: ConnectionRequest
    ) -> str | Deferred[str | None] | None:
        """
        Autobahn's handshake hook: run L{secureHandshake} and turn any
        refusal into a L{ConnectionDeny} (rendered by L{failHandshake}).
        """
        try:
            subprotocol = self.secureHandshake(request)
        except Exception:
            self._deny(Failure())
        if is_deferred(subprotocol):
            self._pending = subprotocol
            return subprotocol.addBoth(self._settled).addErrback(self._deny)
        return subprotocol

    def _settled(self, result: Any) -> Any:
        self._pending = None
        return result

    def _deny(self, failure: Failure) -> NoReturn:
        error = failure.value
        if isinstance(error, HandshakeRefused):
            self._refusal = error
        elif isinstance(error, CancelledError) and self._authenticating:
            # The client left before its authentication's verdict: that counts
            # as a failed authentication (Unauthorized), or leaving would buy
            # password checks that never count against the address.
            self._refusal = error = Unauthorized("client left before the authentication verdict")
        elif isinstance(error, CancelledError):
            # connectionLost cancelled the waiting step: nobody to answer.
            self._refusal = error = HandshakeRefused("connection lost during the handshake")
        else:
            self.factory.events.emit(events.HANDSHAKE_ERROR, peer=self.peer, failure=failure)
            self._refusal = error = HandshakeRefused("internal error", status=500)
        raise ConnectionDeny(error.status, error.reason)

    def secureHandshake(self, request: ConnectionRequest) -> str | Deferred[str | None] | None:
        """
        The pipeline, in order; the first refusal raises L{HandshakeRefused}.

        It runs synchronously while every step does, and then returns the
        subprotocol itself; a step that waits (a method that verifies a
        password in a thread, a gateway that connects to its upstream) makes
        the rest run when it is done, and the result a L{Deferred}.

        @return: the subprotocol to answer with, or L{None}.
        """
        factory = self.factory
        handshake = self.handshakeRequest(request)

        # 1. route lookup by path (404); the whole handshake uses this
        # policy, even if a reload swaps the factory's meanwhile
        self.handshakePolicy = policy = factory.policy
        route = policy.route_for(handshake.path)
        self.route = route
        self._useRoute(route)

        # 2. connection admission (503, 429); 503 while the server stops
        if factory.stopping:
            raise ServiceUnavailable("server shutting down")
        # (a shared store answers later: the rest waits, cancelled if the
        # client leaves, and a connection counted meanwhile is given back)
        admitted = factory.admission.admit(handshake.host, factory.clock.seconds())
        if admitted is not None:
            return admitted.addCallback(self._admitted, handshake)
        return self._admitted(None, handshake)

    def _admitted(self, _: None, handshake: HandshakeRequest) -> str | Deferred[str | None] | None:
        factory, route, policy = self.factory, self.route, self.handshakePolicy
        assert route is not None and policy is not None
        self._admitted_host = self._client_host = handshake.host

        # 3. Origin (403)
        origin = handshake.header_values("origin")
        if origin:
            origins = route.origins
            # The listener only matters to the default rule (no list).
            listener = (
                listener_for(self.transport, policy.public_origins)
                if origins.same_origin_only
                else None
            )
            if not origins.allows(origin[0], listener):
                raise Forbidden(f"origin {bounded(origin[0])!r} not allowed")

        # 4. authentication (401, 403): a one-time ticket, or the methods
        accept: Accept | Deferred[Accept] | None = None
        if route.tickets:
            accept = redeem(factory.admission.store, route, handshake, factory.clock.seconds())
        if accept is None:
            accept = authenticate(route.authenticators, handshake)
        if is_deferred(accept):
            self._authenticating = True
            return accept.addCallback(self._authenticated, handshake)
        return self._authenticated(accept, handshake)

    def _authenticated(
        self, accept: Accept, handshake: HandshakeRequest
    ) -> str | Deferred[str | None] | None:
        self._authenticating = False
        factory, route = self.factory, self.route
        assert route is not None
        if self.state == self.STATE_CLOSED:
            # The client went away while the authentication ran: admit no
            # consumer and open nothing (connectionLost released the rest).
            raise HandshakeRefused("connection lost during authentication")
        principal = accept.principal
        factory.revocations.refuse(principal, route)
        if route.consumers is not None and principal.consumer not in route.consumers:
            refusal = Forbidden(f"consumer {bounded(principal.consumer)!r} not allowed on route")
            refusal.method = principal.method
            raise refusal

        # 5. per-consumer caps (429)
        admitted = factory.admission.admit_consumer(
            route, principal.consumer, factory.clock.seconds(), self._admitted_host
        )
        if is_deferred(admitted):
            return admitted.addCallback(self._consumerAdmitted, handshake, accept)
        return self._consumerAdmitted(admitted, handshake, accept)

    def _consumerAdmitted(
        self, consumer_buckets: ConsumerBuckets, handshake: HandshakeRequest, accept: Accept
    ) -> str | Deferred[str | None] | None:
        route = self.route
        assert route is not None
        principal = accept.principal
        self._consumer_admitted = (route, principal.consumer)

        # 6. sealed payloads (400, 403), then the subprotocol: credentials
        #    consumed, never echoed
        sealed = negotiate_seal(route, principal.consumer, handshake.subprotocols)
        if sealed is not None:
            self._seal, self._sealHello = sealed
            self._outgoing = self._seal.outgoing
        subprotocol = self.negotiate(handshake, accept)
        if is_waiting(subprotocol):
            negotiated: Deferred[str | None] = ensureDeferred(subprotocol)
            return negotiated.addCallback(self._startSession, accept, consumer_buckets)
        return self._startSession(subprotocol, accept, consumer_buckets)

    def _startSession(
        self, subprotocol: str | None, accept: Accept, consumer_buckets: ConsumerBuckets
    ) -> str | None:
        # 7. the session, its timers armed when the connection opens
        route, clock, principal = self.route, self.factory.clock, accept.principal
        assert route is not None
        if self.factory.stopping:  # it stopped while this handshake waited
            raise ServiceUnavailable("server shutting down")
        if self._seal is not None:
            subprotocol = SEALED_PROTOCOL
        now = clock.seconds()
        not_after = now + route.max_lifetime if route.max_lifetime else None
        self.session = Session(principal, accept.expires_at, route.path, clock, not_after)
        self._guard = TrafficGuard(route.limits, route.max_message_size, now, consumer_buckets)
        self.factory.events.emit(
            events.HANDSHAKE_ACCEPTED,
            peer=self.peer,
            route=route.path,
            consumer=principal.consumer,
            method=principal.method,
            expires_at=self.session.expires_at,
            duration_s=self._handshakeDuration(),
        )
        return subprotocol

    def negotiate(
        self, handshake: HandshakeRequest, accept: Accept
    ) -> str | Deferred[str | None] | Coroutine[Any, Any, str | None] | None:
        """
        Step 6 of the pipeline: choose the subprotocol to answer with (see
        L{select_subprotocol}). A gateway overrides it to ask its upstream:
        an override may be a coroutine (C{async def}) or return a
        L{Deferred}.
        """
        route = self.route
        assert route is not None
        return select_subprotocol(handshake.subprotocols, route.subprotocols, accept)

    def _useRoute(self, route: RoutePolicy) -> None:
        protocol = self.factory.protocolFor(route)
        if protocol is not None and type(self) is not protocol:
            # The route's application class takes over this connection before
            # any application code runs. Route classes are subclasses of
            # SecureServerProtocol (checked by the policy), so the instance
            # layout is the same. Options the class sets itself win over the
            # factory's copies, as they would have at connectionMade; the
            # route's own limits, set next, win over both.
            self.__class__ = protocol
            for name in _own_options(protocol):
                self.__dict__.pop(name, None)
        self.maxMessagePayloadSize = self.maxFramePayloadSize = route.max_message_size
        self._validator = validator_for(route.messages)
        if route.compression:
            self.perMessageCompressionAccept = accept_deflate(route.max_message_size)

    # -- the open session -------------------------------------------------

    def _onOpen(self) -> None:
        deflate: Any = self._perMessageCompress
        if type(deflate) is PerMessageDeflate:
            # Same object and state, inflation that cannot truncate.
            deflate.__class__ = BoundedDeflate
        session = self.session
        route = self.route
        if session is not None and route is not None:
            factory = self.factory
            deadlines = factory.deadlines
            session.start(self._credentialsExpired, deadlines)
            self._openedAt = factory.clock.seconds()
            self._startRefresh(session, route)
            factory.sessionOpened(self)
            factory.events.emit(
                events.SESSION_OPENED,
                peer=self.peer,
                route=session.route,
                consumer=session.consumer,
                id=session.id,
                method=session.principal.method,
                expires_at=session.expires_at,
            )
            self.registerProducer(self, True)
            if self._sealHello is not None:
                WebSocketServerProtocol.sendMessage(self, self._sealHello, True)
                self._sealHello = None
            if route.idle_timeout:
                self._last_message = now = factory.clock.seconds()
                self._idle_timer = deadlines.call_at(now + route.idle_timeout, self._checkIdle)
        transport_details(self)
        run_hook(self, "onOpen", self.onOpen)

    # -- application hooks and errors ---------------------------------------

    def _onMessage(self, payload: bytes, isBinary: bool) -> None:
        # A whole message, in this order (see txwssec.messages.validation):
        # 0. a sealed session's message is opened (1007 if it does not):
        #    sealed frames are opaque to everything below;
        # 1. txwssec's own messages (wssec.refresh, see txwssec.refresh) are
        #    taken here, before validation, and never reach 2 or 3;
        # 2. the route's message rules (1003, 1007), on the plaintext;
        # 3. the application (on a gateway route, the upstream).
        if self._seal is not None:
            opened = self._unseal(payload, isBinary)
            if opened is None:
                return
            payload, isBinary = opened
        route = self.route
        if route is not None and route.refresh and not isBinary and is_refresh(payload):
            self._refreshMessage(payload)
            return
        validator = self._validator
        if validator is not None:
            refusal = validator.check(payload, isBinary)
            if refusal is not None:
                self._messageRefused(refusal, "client")
                return
        run_hook(self, "onMessage", self.onMessage, payload, isBinary)

    def _messageRefused(self, refusal: Refusal, direction: str) -> None:
        """Tell the observers, and close for a message the rules refused."""
        self.factory.events.emit(
            events.MESSAGE_REFUSED,
            rule=refusal.rule,
            direction=direction,
            code=refusal.code,
            detail=refusal.detail,
            **self._sessionFields(),
        )
        self._failLogged = True
        self._fail_connection(refusal.code, refusal.reason)

    def _onPing(self, payload: bytes) -> None:
        run_hook(self, "onPing", self.onPing, payload)

    def _onPong(self, payload: bytes) -> None:
        run_hook(self, "onPong", self.onPong, payload)

    def _onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        run_hook(self, "onClose", self.onClose, wasClean, code, reason)

    def _applicationFailed(self, hook: str, failure: Failure) -> None:
        """
        The application's C{hook} raised, or its coroutine or L{Deferred}
        failed: log it once, with the traceback, and close this connection
        with 1011 (an error in C{onClose} is only logged). Other
        connections are not affected.
        """
        self.factory.events.emit(
            events.APPLICATION_ERROR, hook=hook, failure=failure, **self._sessionFields()
        )
        if hook != "onClose":
            self._internalError()

    def _credentialsExpired(self) -> None:
        self.endSession(CloseCode.CREDENTIALS_EXPIRED, "credentials expired", "expired")

    def revoke(self) -> None:
        """Close this session because its credentials were revoked (3003)."""
        self.endSession(CloseCode.FORBIDDEN, "credentials revoked", "revoked")

    def goAway(self) -> None:
        """Close this session because the server stops (1001)."""
        if self.session is not None:
            self.session.stop()
        # (Autobahn's sendClose refuses 1001, a code for servers only.)
        self.sendCloseFrame(int(CloseCode.GOING_AWAY), b"server shutting down")

    def endSession(self, code: int, reason: str, event: str) -> None:
        """
        Close the connection with C{code} and a short C{reason}: the event
        C{session.<event>} (C{expired}, C{revoked}, C{idle}; none for C{""}).
        """
        session = self.session
        if event:
            self.factory.events.emit(f"session.{event}", code=int(code), **self._sessionFields())
        if session is not None:
            session.stop()
        self.sendClose(int(code), reason)

    def dropConnection(self, abort: bool = False) -> None:
        """
        Close the TCP connection: in order (a FIN, after every byte written)
        once the close handshake is complete, with a reset only when it was
        not (a close timeout, a handshake timeout).

        Autobahn aborts a server's connection as soon as it has both sent
        and received a close frame. An abort is a reset (SO_LINGER 0) that
        also discards what is still unsent: a browser then reports
        C{wasClean=false} for a routine close (3000, 1009...), and the close
        frame answering an invalid close frame (1002, 1007) never leaves.
        While a close the server started waits for the peer's reply,
        Autobahn keeps reading and discarding what the peer sends (the rest
        of an oversized message, say), so the reply is the last byte read
        and nothing unread is left to turn the close into a reset. An
        orderly close that the peer does not let finish (it stops reading)
        is reset after the close timeout.
        """
        if abort and self.wasClean:
            abort = False
        close_timeout = self.factory.policy.close_timeout
        if not abort and self.state != self.STATE_CLOSED and close_timeout > 0:
            # An orderly close waits until the peer has read every byte
            # written: a peer that answered the close but reads nothing
            # more would hold the connection forever. Bounded, then a reset:
            # the timer is armed by _closeConnection when the close waits
            # (TrafficFlow._armLinger), not for one that leaves at once.
            self._lingerFor = close_timeout
        if self._dropLogged or self.wasClean:
            # (For a clean close Autobahn's line is at debug level, which
            # this protocol's logger never writes.)
            drop_connection_quietly(self, abort)
        else:
            super().dropConnection(abort)

    def _abortLingering(self) -> None:
        self._loseTimer = None
        self.factory.events.emit(events.LIMIT_EXCEEDED, limit="limit.close_linger", peer=self.peer)
        transport: Any = self.transport
        transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Release everything this connection held, however it ended."""
        cancel_close_timer(self)
        stop_read_ahead(self.transport)
        pending = self._pending
        if pending is not None:
            # The client left while a step waited: a queued password check
            # is dropped before it is hashed, an upstream attempt is closed.
            self._pending = None
            pending.cancel()
        self._lingerFor = 0.0
        lose_timer = self._loseTimer
        if lose_timer is not None:
            lose_timer.cancel()
            self._loseTimer = None
        idle_timer = self._idle_timer
        if idle_timer is not None:
            idle_timer.cancel()
            self._idle_timer = None
        session = self.session
        if session is not None:
            session.stop()
            factory = self.factory
            factory.sessionClosed(self)
            if session.id and factory.events.wants(events.SESSION_CLOSED):
                factory.events.emit(
                    events.SESSION_CLOSED,
                    peer=self.peer,
                    route=session.route,
                    consumer=session.consumer,
                    id=session.id,
                    method=session.principal.method,
                    **end_fields(self, factory.clock.seconds() - self._openedAt),
                )
        admission = self.factory.admission
        if self._consumer_admitted is not None:
            # Released whatever happened after step 5 (502/504, a client that
            # left during the upstream connection, a refused subprotocol...).
            admission.release_consumer(*self._consumer_admitted)
            self._consumer_admitted = None
        if self._admitted_host is not None:
            admission.release(self._admitted_host)
            self._admitted_host = None
        self._guard = None
        connection_lost_quietly(self, reason or connectionDone, WebSocketServerProtocol)
        SecureServerProtocol.is_closed.release(self)

    def _connectionLost(self, reason: Any) -> None:
        # Autobahn's server _connectionLost without its debug line, which
        # formats the failure's traceback (hlval(reason)) on every
        # connection, whatever the log level.
        WebSocketProtocol._connectionLost(self, reason)
        self.factory.countConnections -= 1

    def dataReceived(self, data: bytes) -> None:
        # Autobahn's dataReceived formats its debug line's arguments (hltype,
        # hlval) on every read, whatever the log level, then does this. The
        # frames written in answer to one read leave in one write.
        self._cork_writes()
        try:
            self._dataReceived(data)
        except Exception:
            # A bug in txwssec or Autobahn while parsing (application hooks
            # have their own guard): 1011 rather than the reactor's reset.
            self._applicationFailed("dataReceived", Failure())
        self._uncork()


def _own_options(protocol: type[SecureServerProtocol]) -> tuple[str, ...]:
    """The Autobahn options an application protocol class sets itself."""
    names = _OWN_OPTIONS.get(protocol)
    if names is None:
        names = _OWN_OPTIONS[protocol] = tuple(
            name for name in WebSocketServerProtocol.CONFIG_ATTRS if hasattr(protocol, name)
        )
    return names


_OWN_OPTIONS: dict[type, tuple[str, ...]] = {}
