"""
The upstream leg of a gateway session: the pool of upstream URLs, the
client protocol that speaks to one, and the refusals (502, 504) when none
answers.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable
from typing import Any, Protocol

import txaio
from autobahn.twisted.util import create_transport_details
from autobahn.wamp.types import TransportDetails
from autobahn.websocket.protocol import (
    WebSocketClientProtocol,
    WebSocketProtocol,
    parseHttpHeader,
)
from autobahn.websocket.types import ConnectionResponse
from autobahn.websocket.utf8validator import Utf8Validator
from autobahn.websocket.util import parse_url
from autobahn.websocket.xormasker import XorMaskerNull
from twisted.internet.address import IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.tcp import Client as TCPClient
from twisted.python.failure import Failure

from txwssec._autobahn import copy_options_at_once, drop_connection_quietly
from txwssec._cycles import FiredWhenOpen, FiredWithProtocol, fire
from txwssec._wire import LazyTransportDetails, details_later, open_state, set_no_delay, tcp_peer
from txwssec.client import ResponseHeadTooLarge, SecureClientFactory, SecureClientProtocol
from txwssec.errors import HandshakeRefused
from txwssec.gateway.connect import LeanClient, lean_tcp_endpoint
from txwssec.gateway.forwarding import join_target
from txwssec.gateway.held import send_held, turn_writes
from txwssec.gateway.relay import FrameScanner, autobahn_control, autobahn_rest, feed_relay
from txwssec.policy import RoutePolicy, Upstream
from txwssec.traffic import Violation


class BadGateway(HandshakeRefused):
    """502: the upstream refused, failed TLS verification, or is unreachable."""

    status = 502
    #: The C{kind} of the C{upstream.failed} event: C{refused} (refused,
    #: unreachable, TLS), C{bad_response} (a response head over
    #: C{max_header_bytes}).
    kind = "refused"


class GatewayTimeout(HandshakeRefused):
    """504: the upstream did not complete its handshake in time."""

    status = 504


class ClientLeg(Protocol):
    """
    What the upstream leg needs of the client leg
    (L{txwssec.gateway.GatewayProtocol}): named here so that this module
    does not import the client leg's.
    """

    state: int
    STATE_CONNECTING: int
    STATE_OPEN: int
    transport: Any

    def relayWrite(self, frames: bytes) -> None: ...

    def messageFromUpstream(self, payload: bytes, isBinary: bool) -> None: ...

    def wssecFromUpstream(self, payload: bytes) -> None: ...

    def sendPing(self, payload: bytes | None = None) -> None: ...

    def sendPong(self, payload: bytes | None = None) -> None: ...

    def closeFromUpstream(self, code: int | None, reasonRaw: bytes | None) -> None: ...

    def upstreamLost(self, wasClean: bool) -> None: ...

    def _applicationFailed(self, hook: str, failure: Failure) -> None: ...

    def releaseAfterRead(self) -> None: ...


class UpstreamPool:
    """
    Round-robin over an upstream's URLs, with passive failure marking: a URL
    that failed within C{cooldown} seconds is tried after the others.
    """

    def __init__(self, upstream: Upstream, clock: IReactorTime) -> None:
        self.upstream = upstream
        self._clock = clock
        self._next = 0
        self._failed_at: dict[str, float] = {}
        self._endpoints: dict[str, IStreamClientEndpoint] = {}
        self._templates: dict[tuple[str, tuple[Any, ...]], SecureClientFactory] = {}
        self._targets: dict[tuple[str, str], tuple[str, _ParsedURL]] = {}

    def client_factory(
        self, url: str, settings: tuple[Any, ...], build: Callable[[], SecureClientFactory]
    ) -> SecureClientFactory:
        """
        A factory of its own for one connection to C{url}: a shallow copy
        of one built (by C{build}) once per C{url} and route C{settings}
        (what C{build} reads of the route: a reload that changes them builds
        another). Autobahn's factory constructor parses the URL, sets some 40
        protocol options and reseeds Python's C{random} (C{random.seed()},
        from C{os.urandom}) on every call; the caller then sets the
        connection's own target, subprotocols, Origin and headers with
        C{setSessionParameters}.
        """
        key = (url, settings)
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = build()
        factory: SecureClientFactory = object.__new__(type(template))
        factory.__dict__.update(template.__dict__)
        return factory

    def set_session(
        self,
        factory: SecureClientFactory,
        url: str,
        target: str,
        origin: str | None,
        protocols: list[str],
        headers: dict[str, str],
    ) -> None:
        """
        Autobahn's C{factory.setSessionParameters} for the client's
        C{target} on C{url} (L{join_target}), with the joined URL and its
        parsed parts (Autobahn's C{parse_url}, which raises on a URL it
        refuses, as before) kept for the next connection to the same
        target: joining and parsing cost about 20 us per connection. At most
        L{_TARGETS} targets are kept; the query values a method reads
        credentials from are not in C{target} (L{forwarded_target}).
        """
        key = (url, target)
        entry = self._targets.get(key)
        if entry is None:
            joined = join_target(url, target)
            entry = (joined, parse_url(joined))
            if len(self._targets) >= _TARGETS:
                self._targets.clear()
            self._targets[key] = entry
        joined, (secure, host, port, resource, path, params) = entry
        factory.url = joined
        factory.isSecure = secure
        factory.host = host
        factory.port = port
        factory.resource = resource
        factory.path = path
        factory.params = {name: list(values) for name, values in params.items()}
        factory.origin = origin
        factory.protocols = protocols or []
        factory.useragent = None
        factory.headers = headers or {}
        factory.proxy = None

    def endpoint(self, url: str, factory: SecureClientFactory) -> IStreamClientEndpoint:
        """
        The endpoint for C{url} (TCP, in verified TLS for C{wss://}), made
        with the first connection's C{factory} and kept: the TLS options
        (CA file read, context made) are built once per upstream URL. To
        an IP address, TCP is L{txwssec.gateway.connect}'s (fewer system
        calls); else the factory's C{endpoint()}.
        """
        endpoint = self._endpoints.get(url)
        if endpoint is None:
            endpoint = self._endpoints[url] = upstream_endpoint(factory, self.upstream.timeout)
        return endpoint

    def order(self) -> list[str]:
        """The URLs to try for one connection, best first."""
        urls = self.upstream.urls
        start = self._next
        self._next = (self._next + 1) % len(urls)
        rotated = [*urls[start:], *urls[:start]]
        now = self._clock.seconds()
        cooldown = self.upstream.cooldown

        def down(url: str) -> bool:
            return now - self._failed_at.get(url, -cooldown) < cooldown

        return [u for u in rotated if not down(u)] + [u for u in rotated if down(u)]

    def failed(self, url: str) -> None:
        """Mark C{url} as failing now."""
        self._failed_at[url] = self._clock.seconds()

    def succeeded(self, url: str) -> None:
        """Mark C{url} as healthy."""
        self._failed_at.pop(url, None)


#: The first byte of a close frame (FIN, opcode 8).
_CLOSE_FRAME = 0x88
#: The close codes from 1000 to 2999 that Autobahn accepts from a peer.
_CLOSE_CODES = frozenset(WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED)
#: Twisted's TCP connection timeout (C{TCP4ClientEndpoint}'s default), seconds.
_CONNECT_TIMEOUT = 30.0
#: Autobahn's C{parse_url}: secure, host, port, resource, path, query parameters.
_ParsedURL = tuple[bool, str, int, str, str, dict[str, list[str]]]
#: How many upstream targets a pool keeps parsed (see L{UpstreamPool.set_session}).
_TARGETS = 256


class UpstreamProtocol(SecureClientProtocol):
    """
    The upstream leg of a gateway session. Messages are held until the
    client leg is open (the upstream may speak right after its 101).
    """

    downstream: ClientLeg | None = None
    # Autobahn's size limits (set from the factory's options).
    maxFramePayloadSize: int
    maxMessagePayloadSize: int
    # Autobahn's, read by the handshake below.
    tcpNoDelay: bool
    openHandshakeTimeout: float
    perMessageCompressionOffers: list[Any]
    version: int
    logOctets: bool
    logFrames: bool
    autoPingInterval: float
    serverConnectionDropTimeout: float
    #: The frame relay, once the session is open (see L{txwssec.gateway.relay}).
    _scanner: FrameScanner | None = None
    _scanning: bool = False
    #: Writes held until the next turn's end (L{txwssec.gateway.held}).
    _cork: list[bytes] | None = None
    #: sendCloseFrame is sending: sendData sends at once.
    _closeNow: bool = False
    #: A read before the relay is being processed (see dataReceived).
    _reading: bool = False
    _transport_details: Any = LazyTransportDetails(is_server=False)

    #: Autobahn's Deferreds of the connection's open and end, made when
    #: first read (nothing in the gateway reads them), as the server leg's.
    is_open = FiredWhenOpen()
    is_closed = FiredWithProtocol(madeWhenRead=True)

    def __init__(self) -> None:
        # SecureClientProtocol's __init__ and Autobahn's, but for is_open and
        # is_closed (above): two txaio futures less per connection.
        self.set_valid_events(["message"])
        self.opened = Deferred()
        self.closed = Deferred()
        self._held: list[tuple[bytes, bool]] = []

    # -- writes, held until the next turn's end (txwssec.gateway.held) ------------

    def holdWrite(self, data: bytes) -> None:
        """
        Write C{data} after what was held before, at the end of the next
        reactor turn (L{txwssec.gateway.held.TurnWrites.holdLater}).
        """
        cork = self._cork
        if cork is None:
            self._cork = [data]
            turn_writes(self.factory.reactor).holdLater(self)
        else:
            cork.append(data)

    def releaseWrites(self) -> None:
        """Write what was held (see L{txwssec.gateway.held.send_held})."""
        cork, self._cork = self._cork, None
        if cork:
            send_held(self.transport, cork)

    def _closeConnection(self, abort: bool = False) -> None:
        # What was held goes before the close; an abort drops it, as
        # Twisted's abortConnection drops what its buffer holds.
        if abort:
            self._cork = None
        else:
            self.releaseWrites()
        super()._closeConnection(abort)

    def _onOpen(self) -> None:
        self.registerProducer(self, True)
        super()._onOpen()

    # -- the upstream handshake, without Autobahn's debug arguments --------------
    #
    # Autobahn's client evaluates the arguments of a debug line (hltype(),
    # hlval(): a qualified name and click.style() each) in connectionMade,
    # _connectionMade, startHandshake, _actuallyStartHandshake, sendData
    # and _onConnect, whatever the log level: about 5% of a gateway
    # handshake (bench/RESULTS.md, "Gateway and TLS (issue 19)"). These do
    # the same work without them.

    def connectionMade(self) -> None:
        transport: Any = self.transport
        kind = type(transport)
        if kind is LeanClient or kind is TCPClient:
            # Plain TCP: the peer as Autobahn's peer2str writes it; the
            # transport details (os.getpid(), a thread id: two system calls,
            # and nothing to note at open without TLS) when first read.
            address = transport.getPeer()
            self.peer = tcp_peer(address.host, address.port, isinstance(address, IPv6Address))
            details_later(self)
        else:
            details = create_transport_details(transport, False)
            details.channel_framing = TransportDetails.CHANNEL_FRAMING_WEBSOCKET
            self._transport_details = details
            self.peer = details.peer
        # Autobahn's option as its _connectionMade will copy it (read here
        # before the copy, it raised an AttributeError: never set).
        set_no_delay(self)
        self._connectionMade()

    def _connectionMade(self) -> None:
        # Autobahn's client _connectionMade: its options copied from the
        # factory, then WebSocketProtocol._connectionMade's state without
        # its fixed costs (a pformat of the 23 options for a debug line,
        # whatever the log level; the options looked up again): the same
        # state (tests/test_gateway_connect.py compares it with Autobahn's).
        copy_options_at_once(self, WebSocketClientProtocol.CONFIG_ATTRS)
        factory = self.factory
        state = open_state()
        state["serverConnectionDropTimeoutCall"] = None
        if factory.proxy is not None:
            state["state"] = WebSocketProtocol.STATE_PROXY_CONNECTING
        state["utf8validator"] = Utf8Validator()  # Autobahn's, as before
        self.__dict__.update(state)
        timeout = self.openHandshakeTimeout
        covered = factory.attemptTimeout
        if timeout > 0 and not (covered is not None and 0 < covered <= timeout):
            # (Not under an attempt whose own timer, armed before this
            # connection began and no later, abandons the connection first:
            # this timer could never fire. One timer less per handshake.)
            self.openHandshakeTimeoutCall = factory._batched_timer.call_later(
                self.openHandshakeTimeout, self.onOpenHandshakeTimeout
            )
        if factory.proxy is not None:
            self.startProxyConnect()
        else:
            self.startHandshake()

    def startHandshake(self) -> None:
        """
        Send the upgrade request: Autobahn's C{_actuallyStartHandshake}
        (no C{onConnecting} hook, no compression offers: the gateway's
        upstream leg makes none), written to the transport directly.
        """
        factory = self.factory
        lines = [f"GET {factory.resource} HTTP/1.1"]
        if factory.useragent:
            lines.append(f"User-Agent: {factory.useragent}")
        lines += [
            f"Host: {factory.host}:{factory.port}",
            "Upgrade: WebSocket",
            "Connection: Upgrade",
            "Pragma: no-cache",
            "Cache-Control: no-cache",
        ]
        lines += [f"{name}: {value}" for name, value in factory.headers.items()]
        self.websocket_key = base64.b64encode(os.urandom(16))
        lines.append(f"Sec-WebSocket-Key: {self.websocket_key.decode()}")
        if factory.origin:
            lines.append(f"Origin: {factory.origin}")
        if factory.protocols:
            lines.append(f"Sec-WebSocket-Protocol: {','.join(factory.protocols)}")
        offers = [offer.get_extension_string() for offer in self.perMessageCompressionOffers]
        if offers:
            lines.append(f"Sec-WebSocket-Extensions: {','.join(offers)}")
        lines.append(
            f"Sec-WebSocket-Version: {WebSocketProtocol.SPEC_TO_PROTOCOL_VERSION[self.version]}"
        )
        self.http_request_data = data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf8")
        # Sent now, not held for a turn as the leg's other writes are
        # (L{holdWrite}): nothing else is written on this leg before the
        # upstream's 101 to join it, and holding it cost two timer calls
        # and a reactor turn per handshake. What sendData counts, counted.
        self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)
        if self.logOctets:
            self.logTxOctets(data, False)
        self.releaseWrites()  # (nothing is held before the request)
        send_held(self.transport, [data])

    def _onConnect(self, response: ConnectionResponse) -> None:
        self.onConnect(response)

    def processHandshake(self) -> None:
        """
        The upstream's response head: when it is whole, within
        C{max_header_bytes}, and a plain 101 that passes every check of
        Autobahn's client (status line, C{Upgrade}, C{Connection}, one
        C{Sec-WebSocket-Accept} matching the key, at most one
        C{Sec-WebSocket-Protocol}, one that was offered, no extension), the
        session opens here at once; anything else goes through
        L{SecureClientProtocol.processHandshake} and Autobahn's own code,
        which waits for more, or fails the handshake with its reason.

        Autobahn's version formats its debug lines' arguments (the response
        decoded, C{hltype}) whatever the log level and goes through a
        Deferred (C{txaio.as_future}) and two closures to call
        C{onConnect} and C{_onOpen}.
        """
        data = self.data
        end = data.find(b"\r\n\r\n", max(0, self._headSearched - 3))
        if end < 0 or end > self.factory.max_header_bytes:
            super().processHandshake()  # waits for more, or fails
            return
        end += 4
        try:
            status, headers, counts = parseHttpHeader(data[:end])
        except ValueError:
            super().processHandshake()
            return
        chosen = _switched(status, headers, counts, self.websocket_key, self.factory.protocols)
        if chosen is None:
            super().processHandshake()  # fails, with Autobahn's reason
            return
        self.http_response_data = data[:end]
        self.http_status_line = status
        self.http_headers = headers
        self.websocket_extensions_in_use = []
        self.websocket_protocol_in_use = chosen or None
        self.data = data[end:]
        self.state = WebSocketProtocol.STATE_OPEN
        timer = self.openHandshakeTimeoutCall
        if timer is not None:
            timer.cancel()
            self.openHandshakeTimeoutCall = None
        self.inside_message = False
        self.current_frame = None  # type: ignore[assignment]
        self.websocket_version = self.version
        if self.autoPingInterval:
            self.autoPingPendingCall = self.factory._batched_timer.call_later(
                self.autoPingInterval, self._sendAutoPing
            )
        response = ConnectionResponse(
            self.peer, headers, self.websocket_version, chosen or None, []
        )
        try:
            self._onConnect(response)
        except Exception:
            failure = Failure()
            self.log.error("onConnect failed with {fail}", fail=failure)
            self._fail_connection(1000, f"{failure}")
            return
        if self.trackedTimings:
            self.trackedTimings.track("onOpen")
        self._onOpen()
        fire(self, "is_open", None)  # (txaio.resolve, made only if read)
        if self.data:
            self.consumeData()

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """
        Autobahn's C{sendData} (the frames Autobahn writes on this leg: the
        close, pongs, messages when frames are not relayed) without the
        arguments of its debug line (C{hltype}, twice C{hlval}), as the
        server's C{TrafficFlow.sendData} does; held (L{holdWrite}).
        """
        if sync or chopsize or self.send_queue:
            self.releaseWrites()
            super().sendData(data, sync, chopsize)
            return
        if self._closeNow:
            # A close frame: sent now, after what was held (see sendCloseFrame).
            cork, self._cork = self._cork or [], None
            cork.append(data)
            send_held(self.transport, cork)
        else:
            self.holdWrite(data)
        state = self.state
        if state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif state == self.STATE_CONNECTING or state == self.STATE_PROXY_CONNECTING:
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)
        if self.logOctets:
            self.logTxOctets(data, False)

    def sendCloseFrame(
        self, code: int | None = None, reasonUtf8: bytes | None = None, isReply: bool = False
    ) -> None:
        """
        Autobahn's C{sendCloseFrame}; the close frame (and what the leg
        held before it) is sent now, not at the end of the next turn: no
        frame of this leg can follow it to join the same C{send}, and
        holding it cost two timer calls and a reactor turn per session.
        """
        self._closeNow = True
        try:
            super().sendCloseFrame(code, reasonUtf8, isReply)
        finally:
            self._closeNow = False

    def attach(self, downstream: ClientLeg) -> None:
        """Relay to C{downstream} (called before the client's 101)."""
        self.downstream = downstream

    def flush(self) -> None:
        """The client leg is open: deliver what arrived before."""
        held, self._held = self._held, []
        for payload, is_binary in held:
            self.onMessage(payload, is_binary)

    # -- the frame relay (see txwssec.gateway.relay) ------------------------------------

    def startRelay(self, notices: bool = False) -> None:
        """
        Relay the upstream's data frames to the client as they come; with
        C{notices} (a route with C{refresh = true}), not its txwssec control
        messages (see L{FrameScanner}).
        """
        self._scanner = FrameScanner(
            self,
            masked=False,
            max_frame=self.maxFramePayloadSize,
            max_message=self.maxMessagePayloadSize,
            accounted=False,
            notices=notices,
        )

    def _connectionLost(self, reason: Any) -> None:
        is_closed = UpstreamProtocol.is_closed
        if self.state != WebSocketProtocol.STATE_CLOSED and not is_closed.made(self):
            # Autobahn's _connectionLost resolves is_closed (txaio.resolve),
            # reading it, which makes it when nothing read it before: it is
            # left unmade (released) instead. When it was made, Autobahn's
            # code fires it, in its order (after its timers are cancelled).
            self.state = WebSocketProtocol.STATE_CLOSED
            is_closed.fire(self)
        super()._connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        if self._scanner is not None:
            try:
                if not feed_relay(self, data):
                    super().dataReceived(data)
            except Exception:
                self._applicationFailed("relay", Failure())
            return
        # Before the relay (the handshake): the client leg may open during
        # this read and hold its 101 until the read's end (releaseAfterRead).
        self._reading = True
        try:
            super().dataReceived(data)
        except Exception:
            self._applicationFailed("relay", Failure())
        finally:
            self._reading = False
            downstream = self.downstream
            if downstream is not None:
                downstream.releaseAfterRead()

    def _applicationFailed(self, hook: str, failure: Failure) -> None:
        # The gateway's own code failed on this leg: the client gets 1011
        # (logged once, by the client leg) and this leg is closed with it.
        downstream = self.downstream
        if downstream is None:
            super()._applicationFailed(hook, failure)
        else:
            downstream._applicationFailed(f"upstream {hook}", failure)

    def relayOpen(self) -> bool:
        # Closing after the gateway's close, the upstream's frames still go
        # to the client (the answers it owes, see _drainUpstream); not after
        # the upstream's own close, or once this leg failed.
        state = self.state
        return (
            (state == self.STATE_OPEN or state == self.STATE_CLOSING)
            and not self.failedByMe
            and not self._closeReceived
        )

    def relayAccount(self, opcode: int, length: int, starts_message: bool) -> Violation | None:
        return None

    def relayAccountMessages(self, count: int, octets: int) -> bool:
        return True

    def relayLimit(self, violation: Violation) -> None:
        pass

    def relayForward(self, frames: bytes) -> None:
        downstream = self.downstream
        if downstream is not None and downstream.state == downstream.STATE_OPEN:
            downstream.relayWrite(frames)

    def relayControl(self, frame: bytes) -> bool:
        if frame[0] == _CLOSE_FRAME and self._closeReplied(frame):
            return False  # (relayOpen: False now, the close was received)
        return autobahn_control(self, frame) and self.relayOpen()

    def _closeReplied(self, frame: bytes) -> bool:
        """
        The upstream's close frame C{frame} (whole, unmasked, FIN, no RSV:
        checked by the L{FrameScanner}) answering the close this leg sent:
        taken here as Autobahn's C{processData}, C{processControlFrame} and
        client C{onCloseFrame} take it (the remote code and reason kept,
        the close timer cancelled, the session clean, the timer for the
        upstream's TCP close armed), when its code is one Autobahn accepts
        and its reason valid UTF-8. Anything else (another state, a code or
        reason Autobahn refuses, a subclass's C{onCloseFrame}, logged
        frames) is left to Autobahn: L{False}.
        """
        if (
            self.state != WebSocketProtocol.STATE_CLOSING
            or not self.closedByMe
            or self.logFrames
            or type(self).onCloseFrame is not UpstreamProtocol.onCloseFrame
            or self.data
            or self.current_frame is not None
        ):
            return False
        code: int | None = None
        reason: str | None = None
        if len(frame) > 2:
            code = (frame[2] << 8) | frame[3]
            if not (3000 <= code <= 4999 or code in _CLOSE_CODES):
                return False
            if len(frame) > 4:
                try:
                    reason = frame[4:].decode("utf8")
                except UnicodeDecodeError:
                    return False
        self._closeReceived = True
        # What Autobahn's frame code leaves behind it.
        self.current_frame_masker = XorMaskerNull()
        self.control_frame_data = None
        self.remoteCloseCode = code
        self.remoteCloseReason = reason
        timer = self.closeHandshakeTimeoutCall
        if timer is not None:
            timer.cancel()
            self.closeHandshakeTimeoutCall = None
        self.wasClean = True
        transport = self.transport
        if type(transport) is LeanClient:
            # The upstream drops the connection now: its FIN is usually
            # there already, read with this event (see endExpected); the
            # timer for an upstream that does not is armed only if it is not.
            transport.endExpected(self._awaitServerDrop)
        else:
            self._awaitServerDrop()
        return True

    def _awaitServerDrop(self) -> None:
        """
        Autobahn's client timer, after the close handshake, for a server
        that does not drop the connection (txaio's, as Autobahn arms it):
        armed unless the connection ended meanwhile.
        """
        if self.state != WebSocketProtocol.STATE_CLOSED and self.serverConnectionDropTimeout > 0:
            self.serverConnectionDropTimeoutCall = txaio.call_later(  # type: ignore[attr-defined]
                self.serverConnectionDropTimeout, self.onServerConnectionDropTimeout
            )

    def relayRefresh(self, payload: bytes) -> None:
        """A txwssec control message from the upstream: not relayed."""
        downstream = self.downstream
        if downstream is not None:
            downstream.wssecFromUpstream(payload)

    def relayStop(self, rest: bytes, inside: bool, so_far: int, binary: bool) -> None:
        self._scanner = None
        autobahn_rest(self, rest, inside, so_far, binary)

    # -- Autobahn's path (before the relay, and with extensions) ----------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        downstream = self.downstream
        if downstream is None or downstream.state == downstream.STATE_CONNECTING:
            self._held.append((payload, isBinary))
        elif downstream.state == downstream.STATE_OPEN:
            downstream.messageFromUpstream(payload, isBinary)

    def onPing(self, payload: bytes) -> None:
        downstream = self.downstream
        if downstream is not None and downstream.state == downstream.STATE_OPEN:
            downstream.sendPing(payload)

    def onPong(self, payload: bytes) -> None:
        downstream = self.downstream
        if downstream is not None and downstream.state == downstream.STATE_OPEN:
            downstream.sendPong(payload)

    def onCloseFrame(self, code: Any, reasonRaw: Any) -> bool:
        downstream = self.downstream
        if self.state == self.STATE_OPEN and downstream is not None:
            # The upstream closes: the client gets its code and reason.
            downstream.closeFromUpstream(code, reasonRaw)
        return bool(super().onCloseFrame(code, reasonRaw))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._scanner = None
        downstream, self.downstream = self.downstream, None
        if downstream is not None:
            downstream.upstreamLost(wasClean)

    def pauseProducing(self) -> None:
        """The upstream does not read: stop reading from the client."""
        if self.downstream is not None:
            transport: Any = self.downstream.transport
            transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.downstream is not None:
            transport: Any = self.downstream.transport
            transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


def _switched(
    status: str,
    headers: dict[str, str],
    counts: dict[str, int],
    key: bytes,
    offered: list[str],
) -> str | None:
    """
    The subprotocol (C{""}: none) of a 101 response that Autobahn's client
    accepts without an extension; L{None} for any other response.
    """
    line = status.split()
    if len(line) < 2 or line[0] != "HTTP/1.1" or line[1] != "101":
        return None
    if headers.get("upgrade", "").strip().lower() != "websocket":
        return None
    if not any(c.strip().lower() == "upgrade" for c in headers.get("connection", "").split(",")):
        return None
    if counts.get("sec-websocket-accept") != 1 or "sec-websocket-extensions" in headers:
        return None
    # RFC 6455's Sec-WebSocket-Accept is a SHA-1 by definition (no secret).
    digest = hashlib.sha1(key + WebSocketProtocol._WS_MAGIC).digest()  # noqa: S324
    if headers["sec-websocket-accept"].strip() != base64.b64encode(digest).decode():
        return None
    chosen = headers.get("sec-websocket-protocol")
    if chosen is None:
        return ""
    chosen = chosen.strip()
    if counts["sec-websocket-protocol"] > 1 or (chosen and chosen not in offered):
        return None
    return chosen


def upstream_endpoint(
    factory: SecureClientFactory, attempt_timeout: float | None = None
) -> IStreamClientEndpoint:
    """
    C{factory.endpoint()} (TCP, in verified TLS for C{wss://}), with the
    TCP of L{lean_tcp_endpoint} (the same source address as the factory's:
    none) when the host is an IP address. Its connection timeout is
    Twisted's (L{_CONNECT_TIMEOUT} seconds), but none when every attempt
    through it has a shorter timer of its own (C{attempt_timeout}, the
    route's C{upstream_timeout}: L{open_upstream} abandons the connection
    first, so that timer could never fire; one timer less per handshake).
    """
    timeout: float | None = _CONNECT_TIMEOUT
    if attempt_timeout is not None and attempt_timeout < _CONNECT_TIMEOUT:
        timeout = None
    tcp = lean_tcp_endpoint(factory.reactor, factory.host, factory.port, timeout)
    if tcp is None:
        return factory.endpoint()
    if not factory.isSecure:
        return tcp
    return wrapClientTLS(factory.tls_options(), tcp)


def open_upstream(
    factory: SecureClientFactory,
    endpoint: Callable[[], IStreamClientEndpoint],
    timeout: float,
    clock: Any,
) -> Deferred[UpstreamProtocol]:
    """
    Connect and complete the upstream's WebSocket handshake, or refuse
    (L{BadGateway}, L{GatewayTimeout} after C{timeout} seconds).
    Cancelling the L{Deferred} (the client left, or its own handshake
    timed out) closes the upstream connection at once, whatever stage it
    is at, and fails it with L{CancelledError}.
    """
    return _Attempt(factory, endpoint, timeout, clock).result


class _Attempt:
    """
    One upstream connection attempt (L{open_upstream}): the endpoint's
    connection, then the protocol's C{opened}, under one timer. Plain
    callbacks and a C{callLater}: no coroutine, nor C{Deferred.addTimeout}
    and its own Deferred, per attempt.
    """

    __slots__ = ("_done", "_factory", "_protocol", "_step", "_timeout", "_timer", "result")

    def __init__(
        self,
        factory: SecureClientFactory,
        endpoint: Callable[[], IStreamClientEndpoint],
        timeout: float,
        clock: Any,
    ) -> None:
        self._factory = factory
        self._timeout = timeout
        # The upstream leg arms no opening-handshake timer of its own that
        # would fire after this attempt's (UpstreamProtocol._connectionMade).
        factory.attemptTimeout = timeout
        self._protocol: Any = None
        #: The attempt has its outcome (or was cancelled): later results of
        #: the steps are ignored.
        self._done = False
        self.result: Deferred[UpstreamProtocol] = Deferred(self._cancel)
        self._timer: Any = clock.callLater(timeout, self._expire)
        self._step: Deferred[Any] | None = None
        try:
            step = endpoint().connect(factory)
        except Exception:
            self._failed(Failure())
            return
        self._step = step
        step.addCallbacks(self._connected, self._failed)

    def _connected(self, protocol: Any) -> None:
        if self._done:  # cancelled while the endpoint completed
            drop_connection_quietly(protocol, abort=True)
            return
        self._protocol = protocol
        opened: Deferred[Any] = protocol.opened
        self._step = opened
        opened.addCallbacks(self._opened, self._failed)

    def _opened(self, protocol: UpstreamProtocol) -> UpstreamProtocol:
        if not self._done:
            self._done = True
            self._stopTimer()
            self.result.callback(protocol)
        return protocol

    def _failed(self, failure: Failure) -> None:
        if self._done:
            return
        self._done = True
        self._stopTimer()
        error = failure.value
        refusal: Exception
        if isinstance(error, CancelledError):
            refusal = error
        elif isinstance(error, TimeoutError | DeferredTimeout):
            refusal = self._timedOut()
        elif isinstance(error, ResponseHeadTooLarge):
            refusal = BadGateway(f"{self._factory.url}: {error}")
            refusal.kind = "bad_response"
        else:
            refusal = BadGateway(f"{self._factory.url}: {error}")
        self.result.errback(Failure(refusal))

    def _timedOut(self) -> GatewayTimeout:
        return GatewayTimeout(f"{self._factory.url}: no handshake within {self._timeout:g} s")

    def _expire(self) -> None:
        self._timer = None
        if self._done:
            return
        self._abandon()
        self.result.errback(Failure(self._timedOut()))

    def _cancel(self, result: Deferred[UpstreamProtocol]) -> None:
        # The caller cancelled (result then fails with CancelledError).
        if not self._done:
            self._stopTimer()
            self._abandon()

    def _abandon(self) -> None:
        """Close the connection at whatever stage it is (no outcome yet)."""
        self._done = True
        protocol = self._protocol
        if protocol is None:
            step = self._step
            if step is not None:
                step.cancel()  # stops connecting
            return
        # Timed out, or the client left: the gateway logs it itself, without
        # Autobahn's "dropping connection ... with abort=True: None" warning.
        drop_connection_quietly(protocol, abort=True)

    def _stopTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


def pool_for(factory: Any, route: RoutePolicy) -> UpstreamPool:
    """
    The round-robin pool of C{route}'s upstream (one per route), kept in
    the server factory's C{upstreamPools}.
    """
    assert route.upstream is not None
    pools: dict[str, UpstreamPool] = factory.upstreamPools
    pool = pools.get(route.path)
    if pool is None:
        pool = pools[route.path] = UpstreamPool(route.upstream, factory.clock)
    return pool
