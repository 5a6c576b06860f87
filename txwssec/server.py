"""
The secure server: an Autobahn factory and protocol whose opening handshake
runs txwssec's pipeline (see L{SecureServerProtocol.secureHandshake}).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Coroutine, Iterable
from itertools import chain
from typing import TYPE_CHECKING, Any, NoReturn

import txaio
from autobahn.exception import PayloadExceededError
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import (
    PerMessageDeflate,
)
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from txwssec._autobahn import cancel_close_timer, connection_lost_quietly, copy_options
from txwssec._cycles import FiredWithProtocol
from txwssec._hooks import run_hook, transport_details
from txwssec._reactor import default_reactor
from txwssec._request import check_request_head
from txwssec.admission import Admission, ConsumerBuckets, client_address
from txwssec.auth.chain import authenticate
from txwssec.compression import (
    BoundedDeflate,
    ExtensionOffer,
    accept_deflate,
    deflated_bound,
    parse_extensions,
)
from txwssec.deadlines import Deadline, Deadlines
from txwssec.errors import (
    CloseCode,
    Forbidden,
    HandshakeRefused,
    HeaderFieldsTooLarge,
    MalformedHandshake,
    RouteNotFound,
    Unauthorized,
    http_refusal,
)
from txwssec.limits import ConnectionCounter
from txwssec.logs import bounded
from txwssec.origin import listener_for
from txwssec.policy import RoutePolicy, ServerPolicy
from txwssec.session import Session
from txwssec.subprotocols import select_subprotocol
from txwssec.tls import peer_certificate
from txwssec.traffic import TrafficGuard, Violation
from txwssec.types import Accept, HandshakeRequest

if TYPE_CHECKING:
    from txwssec.proxy import UpstreamPool


#: txwssec's own server events (refusals, sessions, limits), with named
#: fields. Module-level so that the namespace stays "txwssec.server" for
#: every application subclass (a Logger class attribute takes the class's).
securityLog = Logger(namespace="txwssec.server")


class SecureServerProtocol(WebSocketServerProtocol):
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
    factory: SecureServerFactory
    session: Session | None = None
    route: RoutePolicy | None = None
    _refusal: HandshakeRefused | None = None
    _admitted_host: str | None = None
    #: The admitted address, kept after release: a failed authentication
    #: counts even if the client reset the connection before the verdict.
    _client_host: str | None = None
    _pipelineStarted: bool = False
    _consumer_admitted: tuple[RoutePolicy, str] | None = None
    _idle_timer: Deadline | None = None
    #: Aborts an orderly close that the peer does not let finish.
    _loseTimer: Deadline | None = None
    _last_message: float = 0.0
    _guard: TrafficGuard | None = None
    # Autobahn's per-connection size limits (set from the route).
    maxFramePayloadSize: int
    maxMessagePayloadSize: int
    _discard_writes: bool = False
    #: Autobahn's Deferred that fires with this protocol when the connection
    #: ends, forgotten once fired (see L{txwssec._cycles}).
    is_closed = FiredWithProtocol()

    def _connectionMade(self) -> None:
        copy_options(self, WebSocketServerProtocol.CONFIG_ATTRS)
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
        if isinstance(subprotocol, Deferred):
            return subprotocol.addErrback(self._deny)
        return subprotocol

    def _deny(self, failure: Failure) -> NoReturn:
        error = failure.value
        if isinstance(error, HandshakeRefused):
            self._refusal = error
        else:
            securityLog.failure("handshake pipeline failed for {peer}", failure, peer=self.peer)
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

        # 1. route lookup by path (404)
        route = factory.policy.route_for(handshake.path)
        self.route = route
        self._useRoute(route)

        # 2. connection admission (503, 429)
        factory.admission.admit(handshake.host, factory.clock.seconds())
        self._admitted_host = self._client_host = handshake.host

        # 3. Origin (403)
        origin = handshake.header_values("origin")
        if origin and not route.origins.allows(
            origin[0], listener_for(self.transport, factory.policy.public_origins)
        ):
            raise Forbidden(f"origin {bounded(origin[0])!r} not allowed")

        # 4. authentication (401, 403)
        accept = authenticate(route.authenticators, handshake)
        if isinstance(accept, Deferred):
            return accept.addCallback(self._authenticated, handshake)
        return self._authenticated(accept, handshake)

    def _authenticated(
        self, accept: Accept, handshake: HandshakeRequest
    ) -> str | Deferred[str | None] | None:
        factory, route = self.factory, self.route
        assert route is not None
        if self.state == self.STATE_CLOSED:
            # The client went away while the authentication ran: admit no
            # consumer and open nothing (connectionLost released the rest).
            raise HandshakeRefused("connection lost during authentication")
        principal = accept.principal
        if route.consumers is not None and principal.consumer not in route.consumers:
            refusal = Forbidden(f"consumer {bounded(principal.consumer)!r} not allowed on route")
            refusal.method = principal.method
            raise refusal

        # 5. per-consumer caps (429)
        consumer_buckets = factory.admission.admit_consumer(
            route, principal.consumer, factory.clock.seconds()
        )
        self._consumer_admitted = (route, principal.consumer)

        # 6. subprotocol: credentials consumed, never echoed
        subprotocol = self.negotiate(handshake, accept)
        if isinstance(subprotocol, Deferred | Coroutine):
            negotiated: Deferred[str | None] = ensureDeferred(subprotocol)
            return negotiated.addCallback(self._startSession, accept, consumer_buckets)
        return self._startSession(subprotocol, accept, consumer_buckets)

    def _startSession(
        self, subprotocol: str | None, accept: Accept, consumer_buckets: ConsumerBuckets
    ) -> str | None:
        # 7. the session, its timers armed when the connection opens
        route, clock, principal = self.route, self.factory.clock, accept.principal
        assert route is not None
        now = clock.seconds()
        not_after = now + route.max_lifetime if route.max_lifetime else None
        self.session = Session(principal, accept.expires_at, route.path, clock, not_after)
        self._guard = TrafficGuard(route.limits, route.max_message_size, now, consumer_buckets)
        securityLog.info(
            "accepted {peer} on {route} as {consumer} by {method}",
            peer=self.peer,
            route=route.path,
            consumer=principal.consumer,
            method=principal.method,
            expires_at=self.session.expires_at,
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

    def handshakeRequest(self, request: ConnectionRequest) -> HandshakeRequest:
        """
        Build the L{HandshakeRequest} the authenticators see, keeping every
        header line (Autobahn's own dictionary folds duplicates together).

        @raise MalformedHandshake: a header line that is not C{name: value},
            or holds a control character (400).
        """
        head = self.http_request_data.decode("iso-8859-1")
        # The header lines, each with its CRLF: from after the request line
        # up to the blank line that ends the block.
        block = head[head.find("\r\n") + 2 : -2]
        if _CONTROL_CHARACTERS.search(block):
            # A bare CR, LF, NEL or other control character: other parsers
            # (Autobahn's own, an upstream's) would split the line there.
            raise MalformedHandshake("control character in a header line")
        if not _HEADER_BLOCK.fullmatch(block):
            # RFC 9112 section 5: a line that is not "name: value" (no
            # colon, no name, space before the colon, a folded line).
            raise MalformedHandshake("malformed header line")
        peer = str(self.peer)
        headers = tuple(
            (name.lower(), value.strip()) for name, value in _HEADER_LINE.findall(block)
        )
        policy = self.factory.policy
        host = client_address(
            _peer_host(peer),
            (value for name, value in headers if name == "x-forwarded-for"),
            policy.trusted_proxies,
            policy.trust_forwarded_for,
        )
        return HandshakeRequest(
            peer=peer,
            host=host,
            path=request.path,
            query={k: tuple(v) for k, v in request.params.items()},
            headers=headers,
            subprotocols=tuple(request.protocols),
            secure=ISSLTransport.providedBy(self.transport),
            peer_certificate=peer_certificate(self.transport),
        )

    def processHandshake(self) -> None:
        """
        Refuse an oversized header block (431) before Autobahn parses it,
        however slowly it arrives; then run the pipeline for the first
        request only. While it runs (authentication may wait on a thread or
        an upstream), the connection is not read: a client must wait for the
        101, and a second request on the same connection must never start
        a second pipeline.
        """
        if self._pipelineStarted:
            return
        policy = self.factory.policy
        end = self.data.find(b"\r\n\r\n")
        size = end
        if end < 0:
            # Bytes that may begin the final CRLFCRLF are not part of the
            # block: a block of exactly the limit passes however it is split.
            size = len(self.data)
            for tail in (b"\r\n\r", b"\r\n", b"\r"):
                if self.data.endswith(tail):
                    size -= len(tail)
                    break
        if size > policy.max_header_bytes:
            return self._refuse(HeaderFieldsTooLarge(f"header block over {size} bytes"))
        if end >= 0 and self.data.count(b"\r\n", 0, end) > policy.max_headers:
            return self._refuse(HeaderFieldsTooLarge("too many header lines"))
        if end >= 0:
            self._pipelineStarted = True
            self._transport().pauseProducing()
            try:
                # Before anything else reads the request: a body, malformed
                # extension offers (400).
                self.data = check_request_head(self.data, end)
            except HandshakeRefused as refusal:
                return self._refuse(refusal)
            super().processHandshake()

    def _parseExtensionsHeader(
        self, header: str, removeQuotes: bool = True
    ) -> list[ExtensionOffer]:
        """
        The client's extension offers, parsed strictly in place of Autobahn's
        parser (the header was checked by L{check_request_head}).
        """
        return parse_extensions(header)

    def succeedHandshake(self, res: Any) -> None:
        """Send the 101, then read again (frames that came early are kept)."""
        super().succeedHandshake(res)
        if self.state == self.STATE_OPEN:
            self._transport().resumeProducing()

    def _transport(self) -> Any:
        return self.transport

    def _refuse(self, refusal: HandshakeRefused) -> None:
        self._refusal = refusal
        self.failHandshake(refusal.reason, refusal.status)

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
        if route.compression:
            self.perMessageCompressionAccept = accept_deflate(route.max_message_size)

    # -- refusals ---------------------------------------------------------

    def failHandshake(
        self,
        reason: str,
        code: int = 400,
        responseHeaders: list[tuple[str, str]] | None = None,
    ) -> None:
        """
        The one place a refused handshake is logged and answered: the log
        gets the reason, the client a fixed body for the status.
        """
        refusal = self._refusal
        if refusal is None:
            # Autobahn's own checks (malformed upgrade): its reason can quote
            # header values, which may hold credentials; keep the words only.
            headers = tuple(responseHeaders or ())
            if code == 426:
                # RFC 9110 section 15.5.22: a 426 names the protocol to use.
                headers += (("Upgrade", "websocket"),)
            refusal = HandshakeRefused(_redact(reason), headers, code)
        self._refusal = None
        self.wasNotCleanReason = "handshake refused"
        factory = self.factory
        factory.counters[f"handshake.refused.{refusal.status}"] += 1
        if refusal.counter:
            factory.counters[refusal.counter] += 1
        if isinstance(refusal, Unauthorized) and self._client_host is not None:
            factory.admission.authentication_failed(self._client_host, factory.clock.seconds())
        path = self._requestPath()
        securityLog.info(
            "refused {peer} on {route} with {status} ({method}): {reason}",
            peer=bounded(self.peer),
            route=self._routeFor(path),
            path=bounded(path),
            status=refusal.status,
            method=refusal.method,
            reason=bounded(refusal.reason, _MAX_LOGGED_REASON),
        )
        self.sendData(http_refusal(refusal.status, refusal.headers))
        self.dropConnection(abort=False)

    def _requestPath(self) -> str:
        """
        The path of the request line (no query: it may carry credentials),
        as Autobahn parsed it or, for a request it refused, as sent.
        """
        path: str | None = getattr(self, "http_request_path", None)
        if path is None:
            head: bytes = getattr(self, "http_request_data", None) or self.data
            parts = head.split(b"\r\n", 1)[0].decode("iso-8859-1").split(" ")
            target = parts[1] if len(parts) > 1 else ""
            path = target.partition("?")[0].partition("#")[0]
        return path

    def _routeFor(self, path: str) -> str:
        """The route serving C{path} for the log: its path, or C{-}."""
        if self.route is not None:
            return self.route.path
        try:
            return self.factory.policy.route_for(path).path
        except RouteNotFound:
            return "-"

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
            factory.sessionOpened(self)
            factory.counters["session.opened"] += 1
            self.registerProducer(self, True)
            if route.idle_timeout:
                self._last_message = now = factory.clock.seconds()
                self._idle_timer = deadlines.call_at(now + route.idle_timeout, self._checkIdle)
        transport_details(self)
        run_hook(self, "onOpen", self.onOpen)

    # -- application hooks and errors ---------------------------------------

    def _onMessage(self, payload: bytes, isBinary: bool) -> None:
        run_hook(self, "onMessage", self.onMessage, payload, isBinary)

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
        securityLog.failure(
            "error in {hook} on {route} for {peer}",
            failure,
            hook=hook,
            **self._sessionFields(),
        )
        self.factory.counters["application.error"] += 1
        if hook != "onClose":
            self._internalError()

    def _internalError(self) -> None:
        """
        Close with 1011 after an error in this connection's code: the close
        handshake as for any close (nothing the peer sends after it reaches
        the application), or, before the connection opened or once it is
        closing, the TCP connection.
        """
        self.failedByMe = True
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(CloseCode.INTERNAL_ERROR, b"internal error")
        elif self.state != self.STATE_CLOSED and not self.closeHandshakeTimeoutCall:
            self.dropConnection(abort=True)

    def sendMessage(
        self,
        payload: bytes,
        isBinary: bool = False,
        fragmentSize: int | None = None,
        sync: bool = False,
        doNotCompress: bool = False,
    ) -> bool:
        """
        Send a message, as Autobahn's C{sendMessage}, if the connection is
        open; to a peer that is closing or gone it is a no-op (Autobahn
        raises), so that sending to other sessions (a broadcast) is safe
        from any handler.

        @return: whether the message was sent: L{False} if the connection
            was not open, or closed for a slow consumer instead of sending it.
        """
        if self.state != self.STATE_OPEN:
            return False
        WebSocketServerProtocol.sendMessage(
            self, payload, isBinary, fragmentSize, sync, doNotCompress
        )
        return bool(self.state == self.STATE_OPEN)

    def _checkIdle(self) -> None:
        # Messages do not move the timer (onFrameBegin only notes the time):
        # when it fires, it either closes or re-arms for the new deadline.
        assert self.route is not None
        if self.state != self.STATE_OPEN:
            # Already closing (expired, revoked, a limit): not idle.
            self._idle_timer = None
            return
        factory = self.factory
        deadline = self._last_message + self.route.idle_timeout
        if deadline > factory.clock.seconds():
            self._idle_timer = factory.deadlines.call_at(deadline, self._checkIdle)
            return
        self._idle_timer = None
        self.endSession(CloseCode.TIMEOUT, "idle timeout", "idle")

    # -- traffic limits ---------------------------------------------------

    def onFrameBegin(self) -> None:
        """
        Check each frame header against the route's limits, before its
        payload is read: size first (Autobahn closes 1009), then rates,
        fragments and control frames (1008). This runs for every frame.
        """
        frame = self.current_frame
        opcode: int = frame.opcode
        length: int = frame.length
        starts_message = False
        accounted = not self.failedByMe
        if opcode < 8:
            starts_message = not self.inside_message
            if starts_message and self._perMessageCompress is not None:
                self._limitWireSize(frame.rsv == 4)
            so_far = length if starts_message else self.message_data_total_length + length
            if 0 < self.maxFramePayloadSize < length or 0 < self.maxMessagePayloadSize < so_far:
                accounted = False  # Autobahn's size check refuses it (1009)
        if accounted:
            violation = self._accountFrame(opcode, length, starts_message)
            if violation is not None:
                self._limitExceeded(violation)
        WebSocketServerProtocol.onFrameBegin(self)

    def _accountFrame(self, opcode: int, length: int, starts_message: bool) -> Violation | None:
        """
        Account a received frame header (within the size limits) against
        the route's limits; a data message is activity for the idle timeout.

        @return: the limit exceeded, if any (the caller closes).
        """
        guard = self._guard
        if guard is None:
            return None
        # One clock read per frame at most, shared by the rate buckets and
        # the idle timer (a data message is activity; pings are not).
        active = starts_message and self._idle_timer is not None
        now = self.factory.clock.seconds() if guard.rated or active else 0.0
        if active:
            self._last_message = now
        return guard.frame(opcode, length, starts_message, now)

    def _limitWireSize(self, compressed: bool) -> None:
        """
        A compressed message is limited by its inflated size, exactly (by
        L{BoundedDeflate}). On the wire it can be a little longer (an
        incompressible one): Autobahn's own checks, which count wire bytes,
        get deflate's worst case for it instead of the limit.
        """
        route = self.route
        if route is not None:
            size = route.max_message_size
            if compressed:
                size = deflated_bound(size)
            self.maxMessagePayloadSize = self.maxFramePayloadSize = size

    def _limitExceeded(self, violation: Violation) -> None:
        self._closeForLimit(violation.counter, violation.code, violation.reason)

    def _max_message_size_exceeded(self, msg_size: int, max_msg_size: int, reason: str) -> None:
        self._closeForLimit("limit.max_message_size", CloseCode.MESSAGE_TOO_BIG, "message too big")

    def onOpenHandshakeTimeout(self) -> None:
        """The opening handshake took longer than C{handshake_timeout}."""
        if self.state == self.STATE_CONNECTING:
            self.factory.counters["limit.handshake_timeout"] += 1
            securityLog.info("handshake timeout: dropping {peer}", peer=self.peer)
        super().onOpenHandshakeTimeout()

    def onAutoPingTimeout(self) -> None:
        """The peer did not answer a ping in time: close 3008."""
        self.autoPingTimeoutCall = None
        # Forget the ping: a pong arriving late must not re-arm auto-ping
        # (and a second timeout) while the close handshake runs.
        self.autoPingPending = None
        if self.state != self.STATE_OPEN:
            return
        self._closeForLimit("limit.ping_timeout", CloseCode.TIMEOUT, "ping timeout")

    def pauseProducing(self) -> None:
        """The transport's buffer is full: the peer is not keeping up."""
        if self._guard is not None:
            self._guard.blocked()

    def resumeProducing(self) -> None:
        """The transport's buffer drained."""
        if self._guard is not None:
            self._guard.unblocked()

    def stopProducing(self) -> None:
        """The connection is going away."""

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """
        Write C{data}, unless the peer is too far behind (then close 1013).

        The common write (not chopped, not synchronous, nothing queued) goes
        to the transport here, as Autobahn's C{sendData} would, without the
        arguments of its debug line, which Autobahn formats on every write
        whatever the log level.
        """
        if self._discard_writes:
            return  # after the close for a slow consumer
        guard = self._guard
        if guard is not None and guard.writes_blocked and guard.wrote(len(data)):
            self._slowConsumer()
            return
        if sync or chopsize or self.send_queue:
            WebSocketServerProtocol.sendData(self, data, sync, chopsize)
            return
        transport: Any = self.transport
        transport.write(data)
        state = self.state
        if state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif state == self.STATE_CONNECTING:
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)
        if self.logOctets:  # type: ignore[attr-defined]
            self.logTxOctets(data, False)

    def _slowConsumer(self) -> None:
        # The close frame is the last thing written; what the application
        # sends after it is dropped, and the close timeout aborts the TCP
        # connection if the peer never reads it.
        self._guard = None
        self._closeForLimit("limit.max_buffered_bytes", CloseCode.TRY_AGAIN_LATER, "slow consumer")
        self._discard_writes = True

    def _closeForLimit(self, limit: str, code: int, reason: str) -> None:
        """Count, log and fail the connection for C{limit} (a counter name)."""
        self.factory.counters[limit] += 1
        securityLog.info(
            "limit {limit}: closing {peer} on {route} ({consumer}) with {code}",
            limit=limit,
            code=int(code),
            **self._sessionFields(),
        )
        self._fail_connection(code, reason)

    def _sessionFields(self) -> dict[str, Any]:
        """The named log fields that say whose connection this is."""
        session = self.session
        return {
            "peer": self.peer,
            "route": session.route if session else None,
            "consumer": session.consumer if session else None,
        }

    def _credentialsExpired(self) -> None:
        self.endSession(CloseCode.CREDENTIALS_EXPIRED, "credentials expired", "expired")

    def revoke(self) -> None:
        """Close this session because its credentials were revoked (3003)."""
        self.endSession(CloseCode.FORBIDDEN, "credentials revoked", "revoked")

    def endSession(self, code: int, reason: str, event: str) -> None:
        """
        Close the connection with C{code} and a short C{reason}, logging
        C{event} (C{expired}, C{revoked}, C{idle}).
        """
        session = self.session
        securityLog.info(
            "session {event}: closing {peer} on {route} ({consumer}) with {code}",
            event=event,
            code=int(code),
            **self._sessionFields(),
        )
        if session is not None:
            session.stop()
        self.factory.counters[f"session.{event}"] += 1
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
            # more would hold the connection forever. Bounded, then a reset.
            self._loseTimer = self.factory.deadlines.call_later(
                close_timeout, self._abortLingering
            )
        super().dropConnection(abort)

    def _abortLingering(self) -> None:
        self._loseTimer = None
        self.factory.counters["limit.close_linger"] += 1
        securityLog.info("close timeout: resetting {peer}", peer=self.peer)
        transport: Any = self.transport
        transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Release everything this connection held, however it ended."""
        cancel_close_timer(self)
        lose_timer = self._loseTimer
        if lose_timer is not None:
            lose_timer.cancel()
            self._loseTimer = None
        idle_timer = self._idle_timer
        if idle_timer is not None:
            idle_timer.cancel()
            self._idle_timer = None
        if self.session is not None:
            self.session.stop()
            self.factory.sessionClosed(self)
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
        # hlval) on every read, whatever the log level, then does this.
        try:
            self._dataReceived(data)
        except Exception:
            # A bug in txwssec or Autobahn while parsing (application hooks
            # have their own guard): 1011 rather than the reactor's reset.
            self._applicationFailed("dataReceived", Failure())


class SecureServerFactory(WebSocketServerFactory):
    """
    An Autobahn server factory enforcing a L{ServerPolicy}.

    @ivar policy: the policy.
    @ivar clock: the reactor used for timers.
    @ivar deadlines: the connections' timers (L{Deadlines} on C{clock}).
    @ivar admission: connection counters and caps (L{Admission}).
    @ivar counters: events by name: C{handshake.refused.<status>},
        C{session.opened}, C{session.expired|revoked|idle}, and one
        C{limit.<name>} per limit that refused a handshake or closed a
        connection (C{limit.message_rate}, C{limit.max_buffered_bytes}...),
        and C{application.error} per error in an application hook.
    """

    protocol = SecureServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        policy: ServerPolicy | RoutePolicy,
        *,
        reactor: IReactorTime | None = None,
        server: str = "txwssec",
    ) -> None:
        if reactor is None:
            reactor = default_reactor()
        super().__init__(reactor=reactor, server=server)
        if isinstance(policy, RoutePolicy):
            policy = ServerPolicy.single(policy)
        for route in policy.routes:
            if route.protocol is not None and not issubclass(route.protocol, SecureServerProtocol):
                raise TypeError(f"route {route.path}: protocol must subclass SecureServerProtocol")
            if route.upstream is not None and route.protocol is not None:
                from txwssec.proxy import GatewayProtocol

                if not issubclass(route.protocol, GatewayProtocol):
                    raise TypeError(
                        f"route {route.path}: an upstream route's protocol must subclass "
                        "GatewayProtocol"
                    )
        self.policy = policy
        self.clock: IReactorTime = reactor
        self.setProtocolOptions(**policy.protocol_options())
        self.deadlines = Deadlines(reactor)
        # Autobahn's own per-connection timers (handshake timeouts,
        # auto-ping) go to the same heap: exact, and no DelayedCall each.
        self._batched_timer = self.deadlines
        self.admission = Admission(policy)
        self.sessions: dict[str, set[SecureServerProtocol]] = {}
        self._routeSessions: dict[str, set[SecureServerProtocol]] = {}
        self.counters: Counter[str] = Counter()
        self._upstreamPools: dict[str, UpstreamPool] = {}

    @property
    def connections(self) -> ConnectionCounter:
        """Admitted connections, in total and per client address."""
        return self.admission.connections

    def sessionOpened(self, protocol: SecureServerProtocol) -> None:
        """Track an open session (for L{revoke})."""
        session = protocol.session
        assert session is not None
        self.sessions.setdefault(session.consumer, set()).add(protocol)
        self._routeSessions.setdefault(session.route, set()).add(protocol)

    def sessionClosed(self, protocol: SecureServerProtocol) -> None:
        """Stop tracking a session."""
        session = protocol.session
        assert session is not None
        indexes = ((self.sessions, session.consumer), (self._routeSessions, session.route))
        for index, key in indexes:
            live = index.get(key)
            if live is not None:
                live.discard(protocol)
                if not live:
                    del index[key]

    def openSessions(self, route: str | None = None) -> list[SecureServerProtocol]:
        """
        The sessions that are open now (not closing), on C{route} (a path)
        or on every route: a new list, so that sessions may close while the
        caller goes through it.
        """
        if route is None:
            candidates: Iterable[SecureServerProtocol] = chain.from_iterable(
                self._routeSessions.values()
            )
        else:
            candidates = self._routeSessions.get(route, ())
        return [protocol for protocol in candidates if protocol.state == protocol.STATE_OPEN]

    def broadcast(
        self, payload: bytes, isBinary: bool = False, *, route: str | None = None
    ) -> int:
        """
        Send one message to every open session of C{route} (a path; all
        routes if L{None}), from any handler or timer. Sessions that are
        closing, or that close during the broadcast (a slow consumer), are
        skipped. So are sessions whose route's C{max_message_size} (which
        bounds what is sent too) is below the message's size, with one
        warning. Meant for application routes: on a gateway route the
        clients' messages come from their upstream.

        @return: how many sessions it was sent to.
        """
        sent = too_big = 0
        size = len(payload)
        for protocol in self.openSessions(route):
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
        The protocol class serving C{route}: its own, the gateway's for an
        upstream route, or L{None} for this factory's C{protocol}.
        """
        if route.protocol is None and route.upstream is not None:
            from txwssec.proxy import GatewayProtocol

            return GatewayProtocol
        return route.protocol

    def upstreamPool(self, route: RoutePolicy) -> UpstreamPool:
        """The round-robin pool of C{route}'s upstream (one per route)."""
        from txwssec.proxy import UpstreamPool

        assert route.upstream is not None
        pool = self._upstreamPools.get(route.path)
        if pool is None:
            pool = self._upstreamPools[route.path] = UpstreamPool(route.upstream, self.clock)
        return pool

    def revoke(self, consumer: str) -> int:
        """
        Close every open session of C{consumer} with 3003.

        @return: how many sessions were closed.
        """
        live = list(self.sessions.get(consumer, ()))
        for protocol in live:
            protocol.revoke()
        return len(live)


def _own_options(protocol: type[SecureServerProtocol]) -> tuple[str, ...]:
    """The Autobahn options an application protocol class sets itself."""
    names = _OWN_OPTIONS.get(protocol)
    if names is None:
        names = _OWN_OPTIONS[protocol] = tuple(
            name for name in WebSocketServerProtocol.CONFIG_ATTRS if hasattr(protocol, name)
        )
    return names


_OWN_OPTIONS: dict[type, tuple[str, ...]] = {}


def _peer_host(peer: str) -> str:
    """The address part of Autobahn's peer string (C{tcp4:1.2.3.4:5})."""
    kind, _, rest = peer.partition(":")
    if kind in ("tcp4", "tcp6"):
        return rest.rsplit(":", 1)[0]
    return peer


#: The most characters of a refusal's reason that reach the log (the values
#: in it are bounded each, see L{bounded}; this bounds the rest).
_MAX_LOGGED_REASON = 1024

#: Characters no header line may hold (tab is allowed in values), including
#: the ones str.splitlines() breaks lines on (\x0b, \x0c, \x1c-\x1e, \x85),
#: and CR or LF anywhere but together, ending a line.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x85]|\r(?!\n)|(?<!\r)\n")

#: An HTTP field name (RFC 9110 section 5.1: a token).
_FIELD_NAME = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"

#: A block of header lines, each C{name: value} and its CRLF (control
#: characters are refused before this is tried).
_HEADER_BLOCK = re.compile(rf"(?:{_FIELD_NAME}:[^\r]*\r\n)*")

#: One header line's name and value.
_HEADER_LINE = re.compile(rf"({_FIELD_NAME}):([^\r]*)\r\n")


def _redact(reason: str) -> str:
    """
    Drop quoted values from an Autobahn failure reason: from the first quote
    to the last one of the same kind, so that a value holding quotes itself
    cannot end the redaction early.
    """
    return re.sub(r"([\"']).*\1", r"\1…\1", reason, flags=re.DOTALL)
