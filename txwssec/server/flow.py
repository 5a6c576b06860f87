"""
The open connection's traffic for L{SecureServerProtocol}: every frame
header accounted against the route's limits (L{TrafficFlow.onFrameBegin}),
writes bounded for a peer that does not read (backpressure), the idle
timer, and the closes for a limit. The per-connection state is a
L{TrafficGuard}; this class is the protocol's side of it.

This runs for every frame and every write: keep it free of anything but
attribute reads and the guard's calls (see bench/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerProtocol

from txwssec import events
from txwssec._autobahn import fail_connection_quietly
from txwssec._hooks import OpenOnly
from txwssec._wire import READ_SIZE, FrameReader, lose_connection, write_at_once
from txwssec.compression import (
    deflated_bound,
)
from txwssec.deadlines import Deadline
from txwssec.errors import (
    CloseCode,
)
from txwssec.messages.sealed_route import log_rejected
from txwssec.messages.sealing import CLOSE_CODE, CLOSE_REASON, SealedSession, SealError
from txwssec.policy import RoutePolicy
from txwssec.server.context import ServerContext
from txwssec.session import Session
from txwssec.traffic import TrafficGuard, Violation

#: The most the writes held while one read is handled may hold (see
#: L{TrafficFlow._corked}): twice a read (the answers to a read of echoes,
#: with their frame headers, still leave in one write); beyond, they go to
#: the transport, whose buffer pauses the session when the peer does not
#: read (max_buffered_bytes).
CORK_LIMIT = 2 * READ_SIZE


# (mypy: Autobahn's own bases disagree on two names, seen with a second base.)
class TrafficFlow(FrameReader, OpenOnly, WebSocketServerProtocol):  # type: ignore[misc]
    """
    Limits, backpressure and idle checks of an open connection: a part of
    L{txwssec.server.SecureServerProtocol} (its base class).
    """

    factory: ServerContext
    session: Session | None = None
    route: RoutePolicy | None = None
    _idle_timer: Deadline | None = None
    #: Aborts an orderly close that the peer does not let finish.
    _loseTimer: Deadline | None = None
    #: The close timeout of an orderly close whose timer is not armed yet
    #: (see L{_armLinger}).
    _lingerFor: float = 0.0
    _last_message: float = 0.0
    _guard: TrafficGuard | None = None
    # Autobahn's per-connection size limits (set from the route).
    maxFramePayloadSize: int
    maxMessagePayloadSize: int
    _discard_writes: bool = False
    #: A sealed session's keys and counters (see L{txwssec.messages.sealing}),
    #: and the hello to send first. Its C{outgoing} is then the
    #: C{_outgoing} hook of L{OpenOnly.sendMessage}, which seals.
    _seal: SealedSession | None = None
    _sealHello: bytes | None = None
    _dropLogged: bool = False
    #: An event already said why the connection fails (see L{_fail_connection}).
    _failLogged: bool = False
    #: Writes held while a read is processed, written at once (L{_uncork}).
    _cork: list[bytes] | None = None
    #: The bytes L{_cork} holds (from L{CORK_LIMIT} on, they are written:
    #: see L{_corked}).
    _cork_size: int = 0

    def endSession(self, code: int, reason: str, event: str) -> None:
        """Close the session (see L{SecureServerProtocol.endSession})."""
        raise NotImplementedError

    def _unseal(self, payload: bytes, isBinary: bool) -> tuple[bytes, bool] | None:
        """
        Open a message of a sealed session; one that does not open closes
        the session with 1007 (see docs/sealed-v1.md).

        @return: the application's payload and type, or L{None}.
        """
        assert self._seal is not None
        try:
            return self._seal.unseal(payload, isBinary)
        except SealError as error:
            # Once closing, the counter stays put: nothing more opens.
            if self.state == self.STATE_OPEN:
                fields = self._sessionFields()
                log_rejected(error, **fields)
                self._closeForLimit("limit.sealed_message", CLOSE_CODE, CLOSE_REASON)
            return None

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
        """
        The opening handshake took longer than C{handshake_timeout}: see
        L{handshakeTimedOut}. (Autobahn's timer holds this method bound
        before a route's class takes over the connection, so this calls the
        route class's own.)
        """
        self.handshakeTimedOut()

    def handshakeTimedOut(self) -> None:
        """
        The opening handshake took longer than C{handshake_timeout}: drop
        the connection (a gateway that waits for its upstream answers 504).
        """
        if self.state == self.STATE_CONNECTING:
            self.factory.events.emit(
                events.LIMIT_EXCEEDED, limit="limit.handshake_timeout", peer=self.peer
            )
            self._dropLogged = True
        WebSocketServerProtocol.onOpenHandshakeTimeout(self)

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
            self._uncork()
            WebSocketServerProtocol.sendData(self, data, sync, chopsize)
            return
        cork = self._cork
        if cork is not None:
            cork.append(data)
            self._cork_size += len(data)
            if self._cork_size > CORK_LIMIT:
                self._corked()
        else:
            transport: Any = self.transport
            transport.write(data)
        state = self.state
        if state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif state == self.STATE_CONNECTING:
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)
        if self.logOctets:
            self.logTxOctets(data, False)

    def _sendParts(self, header: bytes, payload: bytes, sync: bool, chopsize: int | None) -> None:
        """
        A large frame's header and payload, held as two buffers while the
        writes are held (L{_uncork} gathers them in one C{sendmsg}: no
        joined copy of the payload); else written joined by L{sendData}.
        The limits see the frame as one write, as before.
        """
        cork = self._cork
        if cork is None or sync or chopsize or self.send_queue or self._discard_writes:
            self.sendData(header + payload, sync, chopsize)
            return
        size = len(header) + len(payload)
        guard = self._guard
        if guard is not None and guard.writes_blocked and guard.wrote(size):
            self._slowConsumer()
            return
        cork.append(header)
        cork.append(payload)
        self._cork_size += size
        if self._cork_size > CORK_LIMIT:
            self._corked()
        state = self.state
        if state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += size
        elif state == self.STATE_CONNECTING:
            self.trafficStats.preopenOutgoingOctetsWireLevel += size
        if self.logOctets:
            self.logTxOctets(header + payload, False)

    def _cork_writes(self) -> None:
        """Hold the writes until L{_uncork} (while one read is processed)."""
        self._cork = []

    def _corked(self) -> None:
        """
        The held writes passed L{CORK_LIMIT}: write them now, and hold the
        next ones. The transport's buffer, not the cork, then holds what the
        peer does not read, and pauses this producer when full: an
        application that writes a lot while handling one read (a flood in
        C{onMessage}) meets C{max_buffered_bytes}, as its writes did before
        they were held.
        """
        self._uncork()
        self._cork = []

    def _uncork(self) -> None:
        """
        Write what was held, at once: one C{send} for all the frames that
        answer one read (echoes, pongs, a close), instead of Twisted's
        write-when-writable, which costs an epoll registration, a loop
        turn and its removal per read. On a TCP connection whose buffer is
        empty the bytes go straight to the socket in one C{sendmsg}, as
        asyncio's transports do (L{send_now}: no joined copy, and no
        128 KiB cap per call, which left a tail of two 64 KiB echoes to
        Twisted's write); what the socket does not take, or any other
        transport (TLS), gets the ordinary C{transport.writeSequence}.
        """
        cork = self._cork
        self._cork = None
        self._cork_size = 0
        if not cork:
            return
        write_at_once(self.transport, cork)

    def _closeConnection(self, abort: bool = False) -> None:
        # What was written before the close goes first: a TLS transport
        # drops writes that come after its loseConnection. Then, when it
        # all went to a plain TCP socket, the orderly close without
        # Twisted's wait for a writable socket (lose_connection), which
        # needs no close timer unless something is written meanwhile; an
        # abort, or anything else, as Autobahn closes, the timer first.
        self._uncork()
        if not abort and lose_connection(
            self.transport, self._armLinger if self._lingerFor else None
        ):
            return
        self._armLinger()
        WebSocketServerProtocol._closeConnection(self, abort)

    def _armLinger(self) -> None:
        """
        Arm the orderly close's timer (see
        L{txwssec.server.SecureServerProtocol.dropConnection}), if one is
        due: the peer must let the close finish within C{_lingerFor} seconds.
        """
        delay = self._lingerFor
        if delay:
            self._lingerFor = 0.0
            self._loseTimer = self.factory.deadlines.call_later(delay, self._abortLingering)

    def _abortLingering(self) -> None:
        """The orderly close did not finish in time: reset the connection."""
        raise NotImplementedError

    def _slowConsumer(self) -> None:
        # The close frame is the last thing written; what the application
        # sends after it is dropped, and the close timeout aborts the TCP
        # connection if the peer never reads it.
        self._guard = None
        self._closeForLimit("limit.max_buffered_bytes", CloseCode.TRY_AGAIN_LATER, "slow consumer")
        self._discard_writes = True

    def _closeForLimit(self, limit: str, code: int, reason: str) -> None:
        """Tell the observers and fail the connection for C{limit} (a counter name)."""
        self.factory.events.emit(
            events.LIMIT_EXCEEDED, limit=limit, code=int(code), **self._sessionFields()
        )
        self._failLogged = True
        self._fail_connection(code, reason)

    def _fail_connection(self, code: int = 1001, reason: str = "going away") -> None:
        # Autobahn logs a warn line for every failed connection; when an
        # event has already said why (a limit, a message rule), that line
        # only doubles the log.
        if self._failLogged:
            fail_connection_quietly(self, code, reason)
        else:
            super()._fail_connection(code, reason)

    def _sessionFields(self) -> dict[str, Any]:
        """The named log fields that say whose connection this is."""
        session = self.session
        return {
            "peer": self.peer,
            "route": session.route if session else None,
            "consumer": session.consumer if session else None,
        }
