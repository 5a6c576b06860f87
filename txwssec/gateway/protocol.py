"""
The client leg of a gateway session (L{GatewayProtocol}): it opens the
upstream leg during its handshake and relays between the two.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any, NamedTuple

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from txwssec import events
from txwssec.admission import is_trusted_proxy
from txwssec.client import ClientTLS, SecureClientFactory
from txwssec.credentials import without_markers
from txwssec.errors import CloseCode, HandshakeRefused
from txwssec.gateway.forwarding import headers_without, stripped_names, target_without
from txwssec.gateway.held import turn_writes
from txwssec.gateway.relay import (
    FrameScanner,
    autobahn_control,
    autobahn_rest,
    feed_relay,
    wssec_message,
)
from txwssec.gateway.upstream import (
    BadGateway,
    GatewayTimeout,
    UpstreamPool,
    UpstreamProtocol,
    open_upstream,
    pool_for,
)
from txwssec.messages.sealed_route import is_seal_entry
from txwssec.messages.validation import Refusal
from txwssec.server import SecureServerProtocol
from txwssec.traffic import Violation
from txwssec.types import Accept, HandshakeRequest

#: Close codes that may be put on the wire (RFC 6455 section 7.4).
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


class GatewayProtocol(SecureServerProtocol):
    """
    The client leg of a gateway route (C{RoutePolicy(upstream=...)}).
    """

    upstream: UpstreamProtocol | None = None
    #: A client's protocol error, waiting for the upstream to close first.
    _pendingFailure: tuple[int, str] | None = None
    _drainTimer: IDelayedCall | None = None
    #: The frame relay, once the session is open (see L{txwssec.gateway.relay}).
    _scanner: FrameScanner | None = None
    _scanning: bool = False
    #: The upstream connection being opened, during the handshake: cancelled
    #: if the client leaves or its handshake_timeout comes first.
    _attempt: Deferred[UpstreamProtocol] | None = None
    #: The client's handshake_timeout came while the upstream connected.
    _handshakeExpired: bool = False
    #: Messages of the gateway's own waiting for a relayed message's end.
    _ownMessages: list[tuple[bytes, bool]] | None = None
    #: The upstream sent a txwssec control message (dropped, logged once).
    _wssecDropped: bool = False
    #: The upstream URLs being tried, during the handshake (L{negotiate}).
    _upstreamTries: _Tries | None = None
    #: The writes are held until the upstream's read that opens this leg
    #: is processed (L{releaseAfterRead}), not by the turn's end.
    _releaseAfterRead: bool = False

    def negotiate(self, handshake: HandshakeRequest, accept: Accept) -> Deferred[str | None]:
        """
        Open the upstream connection, and answer the client with the
        upstream's subprotocol (or the credential marker, if it chose none).

        The URLs of the route's pool are tried in turn (L{_tryUpstream}):
        plain callbacks on each attempt's L{Deferred}, no coroutine.

        @return: a L{Deferred} of the subprotocol, failing with
            L{BadGateway} when no upstream completed its handshake (502), or
            L{GatewayTimeout} when the last one tried timed out (504).
        """
        route = self.route
        assert route is not None and route.upstream is not None
        pool = pool_for(self.factory, route)
        policy = self.handshakePolicy or self.factory.policy
        names = stripped_names(route, policy)
        direct_peer = self._directPeer()
        headers = headers_without(
            handshake,
            names.headers,
            accept,
            direct_peer,
            trust_forwarded_for=bool(policy.trust_forwarded_for)
            and is_trusted_proxy(direct_peer, policy.trusted_proxies),
        )
        offered = [
            p
            for p in without_markers(handshake.subprotocols, names.markers)
            if p not in accept.credential.subprotocols
            # sealed here (sealed_upstream = "unseal"): the upstream sees plaintext
            and not (self._seal is not None and is_seal_entry(p))
        ]
        origin = handshake.header_values("origin")
        target = target_without(self.http_request_uri, names.queries, accept)
        self._upstreamTries = _Tries(
            pool,
            iter(pool.order()),
            target,
            origin[0] if origin else None,
            offered,
            headers,
            accept,
            policy.max_header_bytes,
        )
        return self._tryUpstream(BadGateway("no upstream"))

    def _tryUpstream(self, refusal: HandshakeRefused) -> Deferred[str | None]:
        """
        An attempt on the pool's next URL, or C{refusal} (the last URL's
        failure) when none is left.
        """
        tries = self._upstreamTries
        assert tries is not None
        url = next(tries.urls, None)
        if url is None:
            self._upstreamTries = None
            raise refusal
        route = self.route
        assert route is not None and route.upstream is not None
        clock = self.factory.clock
        pool = tries.pool
        settings = (
            route.upstream.ca_file,
            route.max_message_size,
            route.upstream.timeout,
            tries.max_header_bytes,
        )
        factory = pool.client_factory(
            url,
            settings,
            partial(
                SecureClientFactory,
                url,
                tls=ClientTLS(ca_file=route.upstream.ca_file),
                max_message_size=route.max_message_size,
                handshake_timeout=route.upstream.timeout,
                max_header_bytes=tries.max_header_bytes,
                reactor=clock,
            ),
        )
        pool.set_session(factory, url, tries.target, tries.origin, tries.offered, tries.headers)
        factory.protocol = UpstreamProtocol
        # A factory per connection: no "Starting/Stopping factory" lines.
        factory.noisy = False
        endpoint = partial(pool.endpoint, url, factory)
        attempt = open_upstream(factory, endpoint, route.upstream.timeout, clock)
        self._attempt = attempt
        return attempt.addCallbacks(
            self._upstreamOpened, self._upstreamFailed, callbackArgs=(url,), errbackArgs=(url,)
        )

    def _upstreamOpened(self, upstream: UpstreamProtocol, url: str) -> str | None:
        self._attempt = None
        tries, self._upstreamTries = self._upstreamTries, None
        assert tries is not None
        tries.pool.succeeded(url)
        if self.state == self.STATE_CLOSED:
            upstream.sendCloseFrame(CloseCode.GOING_AWAY, b"going away")
            raise HandshakeRefused("client left while the upstream connected")
        self.upstream = upstream
        upstream.attach(self)
        if upstream._reading and self._cork is None:
            # The upstream's 101 is being read: the client's 101 (and what
            # the upstream sent after its own, relayed) leaves at the end of
            # that read (releaseAfterRead), not of the reactor turn: no
            # timer and no turn of its own.
            self._cork = []
            self._releaseAfterRead = True
        chosen: str | None = upstream.websocket_protocol_in_use
        return chosen or tries.accept.credential.marker

    def _upstreamFailed(self, failure: Failure, url: str) -> Deferred[str | None] | Failure:
        self._attempt = None
        tries = self._upstreamTries
        assert tries is not None
        route = self.route
        assert route is not None
        error = failure.value
        if isinstance(error, CancelledError):
            # Cancelled by connectionLost or onOpenHandshakeTimeout: the
            # upstream connection is closed already.
            self._upstreamTries = None
            if not self._handshakeExpired:
                raise HandshakeRefused("client left while the upstream connected") from None
            tries.pool.failed(url)
            timeout = GatewayTimeout(
                f"{url}: no handshake within the client's handshake_timeout "
                f"({self.factory.policy.handshake_timeout:g} s)"
            )
            self.factory.events.emit(
                events.UPSTREAM_FAILED, url=url, kind="timeout", reason=timeout.reason
            )
            raise timeout from None
        if isinstance(error, GatewayTimeout):
            tries.pool.failed(url)
            self.factory.events.emit(
                events.UPSTREAM_FAILED,
                url=url,
                kind="timeout",
                reason=error.reason,
                route=route.path,
            )
            return self._tryUpstream(error)
        if isinstance(error, BadGateway):
            tries.pool.failed(url)
            self.factory.events.emit(
                events.UPSTREAM_FAILED,
                url=url,
                kind=error.kind,
                reason=error.reason,
                route=route.path,
            )
            return self._tryUpstream(error)
        self._upstreamTries = None
        return failure

    def handshakeTimedOut(self) -> None:
        """
        The client's C{handshake_timeout} came while the upstream was still
        connecting: the client gets 504 (the upstream is late, not the
        client), and the upstream connection is closed. Without an upstream
        in progress, the client is dropped as on any route.
        """
        attempt = self._attempt
        if attempt is None or self.state != self.STATE_CONNECTING:
            super().handshakeTimedOut()
            return
        self.openHandshakeTimeoutCall = None
        self._handshakeExpired = True
        attempt.cancel()

    def _directPeer(self) -> str:
        transport: Any = self.transport
        address = transport.getPeer()
        return str(getattr(address, "host", self.peer))

    def _onOpen(self) -> None:
        super()._onOpen()
        upstream = self.upstream
        if upstream is not None and self.state == self.STATE_OPEN:
            upstream.flush()
            if self._relays(upstream):
                self._startRelay(upstream)

    # -- the frame relay (see txwssec.gateway.relay) ------------------------------------

    def _relays(self, upstream: UpstreamProtocol) -> bool:
        """
        Whether data frames are relayed as they come: not with an extension
        (permessage-deflate: Autobahn inflates and checks the client's
        messages and sends them uncompressed to the upstream), nor for a
        subclass that reads the client's messages (overrides C{onMessage}),
        nor when the gateway unseals (sealed payloads: each message is opened
        whole), nor when the route has message rules
        (L{txwssec.messages.validation}: Autobahn assembles each message,
        bounded by C{max_message_size}).
        """
        return (
            self._seal is None
            and self._perMessageCompress is None
            and upstream._perMessageCompress is None
            and type(self).onMessage is GatewayProtocol.onMessage
            # nor with message rules: they check whole messages
            and self._validator is None
        )

    def _startRelay(self, upstream: UpstreamProtocol) -> None:
        """Relay data frames both ways as they come (see L{txwssec.gateway.relay})."""
        self._scanner = FrameScanner(
            self,
            masked=True,
            max_frame=self.maxFramePayloadSize,
            max_message=self.maxMessagePayloadSize,
            accounted=True,
            refresh=self._refreshes(),
        )
        upstream.startRelay(notices=self._refreshes())

    def _refreshes(self) -> bool:
        return self.route is not None and self.route.refresh

    def dataReceived(self, data: bytes) -> None:
        try:
            relayed = feed_relay(self, data)
        except Exception:
            self._applicationFailed("relay", Failure())
            return
        if relayed:
            # What Autobahn counts of the data it reads itself.
            self.trafficStats.incomingOctetsWireLevel += len(data)
        else:
            super().dataReceived(data)

    def _internalError(self) -> None:
        # The upstream sees a plain 1001, as for every close the gateway starts.
        self._stopDraining()
        self._closeUpstream(CloseCode.GOING_AWAY, b"going away")
        super()._internalError()

    def relayOpen(self) -> bool:
        return (
            self.state == self.STATE_OPEN and not self.failedByMe and self._pendingFailure is None
        )

    def relayAccount(self, opcode: int, length: int, starts_message: bool) -> Violation | None:
        if starts_message:
            self.trafficStats.incomingWebSocketMessages += 1
        return self._accountFrame(opcode, length, starts_message)

    def relayAccountMessages(self, count: int, octets: int) -> bool:
        # _accountFrame for count message-starting frames at once (one clock
        # read, one check of each bucket: TrafficGuard.messages).
        guard = self._guard
        if guard is not None:
            active = self._idle_timer is not None
            now = self.factory.clock.seconds() if guard.rated or active else 0.0
            if not guard.messages(count, octets, now):
                return False
            if active:
                self._last_message = now
        self.trafficStats.incomingWebSocketMessages += count
        return True

    def relayLimit(self, violation: Violation) -> None:
        self._limitExceeded(violation)

    def relayForward(self, frames: bytes) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.state == upstream.STATE_OPEN:
            upstream.holdWrite(frames)
        if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
            # As Autobahn does on data frames: traffic answers a ping.
            self._cancelAutoPingTimeoutCall()

    def relayControl(self, frame: bytes) -> bool:
        if self._cork is not None:
            return autobahn_control(self, frame) and self.relayOpen()
        # What Autobahn answers (a pong, the close reply) leaves once the
        # frame is processed, as on the server's reads, not at the end of
        # the turn: no timer (the close reply's was left with nothing to
        # send, the close having written it).
        self._cork = []
        try:
            return autobahn_control(self, frame) and self.relayOpen()
        finally:
            self._uncork()

    def relayStop(self, rest: bytes, inside: bool, so_far: int, binary: bool) -> None:
        self._scanner = None
        autobahn_rest(self, rest, inside, so_far, binary)

    def relayRefresh(self, payload: bytes) -> None:
        self._refreshMessage(payload)

    def relayWrite(self, frames: bytes) -> None:
        """
        Write frames relayed from the upstream: through L{sendData}, so that
        the slow-consumer limit counts them.
        """
        if self._ownMessages and not self._upstreamInside():
            self._flushOwn()
        self.sendData(frames)
        if self._ownMessages:
            # Once this read is relayed (the scanner then knows whether the
            # message ended): what waited goes out.
            self.factory.clock.callLater(0, self._flushIfIdle)

    # -- the gateway's own messages (wssec.refreshed, wssec.expiring) ----------

    def sendMessage(
        self,
        payload: bytes,
        isBinary: bool = False,
        fragmentSize: int | None = None,
        sync: bool = False,
        doNotCompress: bool = False,
    ) -> bool:
        """
        As L{SecureServerProtocol.sendMessage}; while the upstream's frames
        of a fragmented message are being relayed, a message of the
        gateway's own waits for that message's end (it cannot go between
        its frames).
        """
        if self._upstreamInside():
            if self._ownMessages is None:
                self._ownMessages = []
            self._ownMessages.append((payload, isBinary))
            return bool(self.state == self.STATE_OPEN)
        return super().sendMessage(payload, isBinary, fragmentSize, sync, doNotCompress)

    def _upstreamInside(self) -> bool:
        upstream = self.upstream
        scanner = upstream._scanner if upstream is not None else None
        return scanner is not None and scanner.inside

    def _flushIfIdle(self) -> None:
        if self._ownMessages and not self._upstreamInside():
            self._flushOwn()

    def _flushOwn(self) -> None:
        waiting, self._ownMessages = self._ownMessages or [], None
        for payload, binary in waiting:
            super().sendMessage(payload, binary)

    # -- writes, held until the end of the reactor turn (txwssec.gateway.held) --

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """
        As L{SecureServerProtocol.sendData}, held until the end of the
        reactor turn (the 101, relayed frames, the gateway's own frames),
        then sent at once (L{releaseWrites}).
        """
        if self._cork is None and not (sync or chopsize or self.send_queue):
            self._cork = []
            turn_writes(self.factory.clock).hold(self)
        super().sendData(data, sync, chopsize)

    def _cork_writes(self) -> None:
        # A read on this leg: what the leg holds already stays first (its
        # end, the server's _uncork, writes all of it).
        if self._cork is None:
            self._cork = []

    def releaseWrites(self) -> None:
        """Write what was held (the server's C{_uncork}: one C{send})."""
        self._uncork()

    def releaseAfterRead(self) -> None:
        """
        The upstream's read that opened this leg is processed: write what
        was held since (the 101 first), in one C{send}.
        """
        if self._releaseAfterRead:
            self._releaseAfterRead = False
            self._uncork()

    def relayMessage(self, payload: bytes, isBinary: bool) -> bool:
        """A whole message from the upstream (when frames are not relayed)."""
        return super().sendMessage(payload, isBinary)

    # -- client -> upstream ----------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.state == upstream.STATE_OPEN:
            upstream.sendMessage(payload, isBinary)

    def onPing(self, payload: bytes) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.state == upstream.STATE_OPEN:
            upstream.sendPing(payload)

    def onPong(self, payload: bytes) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.state == upstream.STATE_OPEN:
            upstream.sendPong(payload)

    def onCloseFrame(self, code: Any, reasonRaw: Any) -> bool:
        if self.state == self.STATE_OPEN:
            # The client closes: the upstream gets its code and reason.
            self._closeUpstream(code, reasonRaw)
        return bool(super().onCloseFrame(code, reasonRaw))

    # -- upstream -> client ----------------------------------------------------

    def messageFromUpstream(self, payload: bytes, isBinary: bool) -> None:
        """
        A whole message from the upstream (when frames are not relayed):
        checked against the route's C{upstream_schema}, then sent. One that
        breaks it closes the upstream with 1007 and the client with 1014.
        """
        if not isBinary and self._refreshes() and wssec_message(payload) is not None:
            self.wssecFromUpstream(payload)
            return
        validator = self._validator
        if validator is not None:
            refusal = validator.check_upstream(payload, isBinary)
            if refusal is not None:
                self._upstreamRefused(refusal)
                return
        self.relayMessage(payload, isBinary)

    def wssecFromUpstream(self, payload: bytes) -> None:
        """
        The upstream sent a txwssec control message (C{wssec.expiring}...)
        on a route with C{refresh = true}: only the gateway sends those to
        the client (which would act on a forged one: send a credential,
        believe a refresh), so it is dropped; the first of a session is an
        event (C{upstream.wssec_dropped}: its type, bounded).
        """
        if self._wssecDropped:
            return
        self._wssecDropped = True
        self.factory.events.emit(
            events.UPSTREAM_WSSEC_DROPPED,
            kind=wssec_message(payload) or "wssec.",
            **self._sessionFields(),
        )

    def _upstreamRefused(self, refusal: Refusal) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.downstream = None
            upstream._fail_connection(refusal.code, refusal.reason)
        self.factory.events.emit(
            events.MESSAGE_REFUSED,
            rule=refusal.rule,
            direction="upstream",
            code=int(CloseCode.BAD_GATEWAY),
            detail=refusal.detail,
            **self._sessionFields(),
        )
        self._fail_connection(CloseCode.BAD_GATEWAY, "upstream failed")

    def closeFromUpstream(self, code: int | None, reasonRaw: bytes | None) -> None:
        """The upstream sent a close frame: pass it on."""
        if self.state == self.STATE_OPEN:
            _sendClose(self, code, reasonRaw)

    def upstreamLost(self, wasClean: bool) -> None:
        """The upstream connection ended; without a close, that is 1014."""
        self.upstream = None
        if self._pendingFailure is not None:
            self._failNow()
            return
        if self.state == self.STATE_OPEN:
            self.factory.events.emit(
                events.UPSTREAM_LOST, peer=self.peer, route=self.route.path if self.route else "-"
            )
            _sendClose(self, CloseCode.BAD_GATEWAY, b"upstream failed")

    # -- sessions the gateway ends, and the end of the client ------------------

    def endSession(self, code: int, reason: str, event: str) -> None:
        self._stopDraining()
        self._closeUpstream(CloseCode.GOING_AWAY, b"going away")
        super().endSession(code, reason, event)

    def goAway(self) -> None:
        # The server stops: both legs get 1001.
        self._stopDraining()
        self._closeUpstream(CloseCode.GOING_AWAY, b"going away")
        super().goAway()

    def _fail_connection(self, code: int = 1001, reason: str = "going away") -> None:
        upstream = self.upstream
        if (
            code in _DRAINED_FAILURES
            and self._pendingFailure is None
            and self.state == self.STATE_OPEN
            and upstream is not None
            and upstream.state == upstream.STATE_OPEN
        ):
            self._drainUpstream(upstream, code, reason)
            return
        self._stopDraining()
        self._closeUpstream(CloseCode.GOING_AWAY, b"going away")
        super()._fail_connection(code, reason)

    def _protocol_violation(self, reason: str) -> bool:
        # While the upstream drains, the client's bytes stay unread.
        return bool(super()._protocol_violation(reason)) or self._pendingFailure is not None

    def _invalid_payload(self, reason: str) -> bool:
        return bool(super()._invalid_payload(reason)) or self._pendingFailure is not None

    def _drainUpstream(self, upstream: UpstreamProtocol, code: int, reason: str) -> None:
        """
        The client broke the protocol (1002, 1007): close the upstream first
        and fail the client once the upstream has closed (at most the close
        timeout later), so that the upstream's answers to the client's earlier
        messages, already on their way, reach the client before the close, as
        from a server that answers in order (Autobahn cases 3.2-3.4, 4.1.3-
        4.2.5, 5.15). Nothing the client sends meanwhile is read or relayed:
        the rest of its bytes are parsed again once the close is sent, and a
        second error then drops the connection, as Autobahn does.
        """
        self.failedByMe = True
        self._pendingFailure = (code, reason)
        transport: Any = self.transport
        transport.pauseProducing()
        _sendClose(upstream, CloseCode.GOING_AWAY, b"going away")
        self._drainTimer = self.factory.clock.callLater(
            self.factory.policy.close_timeout, self._failNow
        )

    def _failNow(self) -> None:
        pending = self._pendingFailure
        self._stopDraining()
        if pending is not None:
            self._fail_connection(*pending)
            if self.data and self.state == self.STATE_CLOSING:
                # The bytes held back since the error (the offending frame
                # first) are parsed now, not when the client next sends: a
                # client whose last frame was the error (a close frame with
                # a 1-byte body) sends nothing more, and would otherwise
                # wait for the close timeout and a reset.
                self.consumeData()

    def _stopDraining(self, resume: bool = True) -> None:
        timer, self._drainTimer = self._drainTimer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._pendingFailure is not None:
            self._pendingFailure = None
            if resume:
                transport: Any = self.transport
                transport.resumeProducing()

    def connectionLost(self, reason: Any = None) -> None:
        self._scanner = None
        self._stopDraining(resume=False)
        self._closeUpstream(CloseCode.GOING_AWAY, b"going away")
        super().connectionLost(reason)
        attempt = self._attempt
        if attempt is not None:
            # The client left while the upstream connected: close that
            # connection now, not when it answers or times out.
            attempt.cancel()

    def _closeUpstream(self, code: int | None, reasonRaw: bytes | None) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is None:
            return
        upstream.downstream = None
        if upstream.state == upstream.STATE_OPEN:
            _sendClose(upstream, code, reasonRaw)
        elif upstream.state != upstream.STATE_CLOSED:
            upstream.dropConnection(abort=True)

    # -- backpressure ------------------------------------------------------------

    def pauseProducing(self) -> None:
        """The client does not read: stop reading from the upstream."""
        super().pauseProducing()
        if self.upstream is not None:
            transport: Any = self.upstream.transport
            transport.pauseProducing()

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if self.upstream is not None:
            transport: Any = self.upstream.transport
            transport.resumeProducing()


class _Tries(NamedTuple):
    """What L{GatewayProtocol._tryUpstream} needs for each URL it tries."""

    pool: UpstreamPool
    urls: Iterator[str]
    target: str
    origin: str | None
    offered: list[str]
    headers: dict[str, str]
    accept: Accept
    max_header_bytes: int


#: Client failures the gateway holds until the upstream has closed: protocol
#: error and invalid payload (see L{GatewayProtocol._drainUpstream}). Limits
#: (1008, 1009, 1013) and timeouts close at once.
_DRAINED_FAILURES = frozenset({1002, 1007})


def _sendClose(protocol: Any, code: int | None, reasonRaw: bytes | None) -> None:
    """Send a close frame with C{code}, or none when it may not be sent."""
    if code is not None and code not in _SENDABLE and not 3000 <= code <= 4999:
        code, reasonRaw = None, None
    protocol.sendCloseFrame(code, (reasonRaw or b"")[:123] if code is not None else None)
