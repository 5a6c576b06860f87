"""
The gateway: relay an authenticated client connection to an upstream
WebSocket server.

The client's 101 is sent only once the upstream's 101 has arrived, so the
client sees the upstream's subprotocol choice, and a refused or unreachable
upstream is a 502 (504 on timeout) before the client is upgraded. Then
messages, pings, pongs and close codes pass through both ways, with
backpressure both ways: a peer that does not read pauses reading from the
other one. txwssec keeps enforcing the route's limits and the session's
expiry on the client leg for the whole session; when it ends a session
(3000, 3003, 3008, 1008...) the upstream sees a plain 1001.

Once both legs are open, data frames pass as they came, with their
fragment boundaries (L{txwssec.relay}): their headers are checked against
the route's limits, their payloads are not read. Text is not UTF-8
validated by the gateway: the upstream validates what the client sends
(invalid UTF-8 gets its 1007, relayed), the client what the upstream sends.
Control frames go through Autobahn (pings and pongs relayed, close codes
relayed, protocol errors failed as before). A route with compression keeps
the full relay: Autobahn inflates, checks and reassembles every message,
and the gateway sends it again, uncompressed, to the upstream; so does a
L{GatewayProtocol} subclass that overrides C{onMessage}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from autobahn.websocket.types import ConnectingRequest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from txwssec.admission import is_trusted_proxy
from txwssec.auth.credentials import (
    credential_headers,
    credential_queries,
    without_credentials,
)
from txwssec.client import ClientTLS, SecureClientFactory, SecureClientProtocol
from txwssec.errors import CloseCode, HandshakeRefused
from txwssec.interfaces import Authenticator
from txwssec.relay import FrameScanner, autobahn_control, autobahn_idle, autobahn_rest
from txwssec.server import SecureServerProtocol
from txwssec.traffic import Violation
from txwssec.types import Accept, HandshakeRequest

#: Request headers that belong to one hop, or to the WebSocket handshake the
#: gateway makes itself, or that the gateway sets: never forwarded as sent.
HOP_HEADERS = frozenset(
    {
        "host",
        "connection",
        "upgrade",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
        "origin",
        "user-agent",
        "x-consumer-username",
        "x-forwarded-for",
        "pragma",
        "cache-control",
    }
)

#: Close codes that may be put on the wire (RFC 6455 section 7.4).
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


class BadGateway(HandshakeRefused):
    """502: the upstream refused, failed TLS verification, or is unreachable."""

    status = 502


class GatewayTimeout(HandshakeRefused):
    """504: the upstream did not complete its handshake in time."""

    status = 504


@dataclass(frozen=True)
class Upstream:
    """
    Where a gateway route relays to.

    @ivar urls: C{ws://} or C{wss://} URLs, used round-robin.
    @ivar ca_file: CA bundle for C{wss://} upstreams (default: the system's),
        read at the first connection to each URL.
    @ivar timeout: seconds for the upstream's TCP, TLS and WebSocket
        handshakes together; beyond gives 504.
    @ivar cooldown: seconds an upstream that failed is tried only after the
        healthy ones (passive failure marking).
    """

    urls: tuple[str, ...]
    ca_file: Path | None = None
    timeout: float = 5.0
    cooldown: float = 10.0

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("an upstream needs at least one URL")
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme not in ("ws", "wss") or not parts.hostname:
                raise ValueError(f"upstream {url!r} is not a ws:// or wss:// URL")
            if parts.username or parts.password or parts.fragment:
                raise ValueError(f"upstream {url!r} must not carry user info or a fragment")


#: The gateway's own events (module-level: the namespace stays "txwssec.proxy").
gatewayLog = Logger(namespace="txwssec.proxy")


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

    def endpoint(self, url: str, factory: SecureClientFactory) -> IStreamClientEndpoint:
        """
        The endpoint for C{url} (TCP, in verified TLS for C{wss://}), made
        with the first connection's C{factory} and kept: the TLS options
        (CA file read, context made) are built once per upstream URL.
        """
        endpoint = self._endpoints.get(url)
        if endpoint is None:
            endpoint = self._endpoints[url] = factory.endpoint()
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


class UpstreamProtocol(SecureClientProtocol):
    """
    The upstream leg of a gateway session. Messages are held until the
    client leg is open (the upstream may speak right after its 101).
    """

    downstream: GatewayProtocol | None = None
    # Autobahn's size limits (set from the factory's options).
    maxFramePayloadSize: int
    maxMessagePayloadSize: int
    #: The frame relay, once the session is open (see L{txwssec.relay}).
    _scanner: FrameScanner | None = None
    _scanning: bool = False

    def __init__(self) -> None:
        super().__init__()
        self._held: list[tuple[bytes, bool]] = []

    def _onOpen(self) -> None:
        self.registerProducer(self, True)
        super()._onOpen()

    def startHandshake(self) -> None:
        """
        Send the upgrade request, as Autobahn does without an C{onConnecting}
        hook but without its debug line, which pretty-prints the transport's
        details on every connection whatever the log level.
        """
        factory = self.factory
        self._actuallyStartHandshake(
            ConnectingRequest(
                host=factory.host,
                port=factory.port,
                resource=factory.resource,
                headers=factory.headers,
                useragent=factory.useragent,
                origin=factory.origin,
                protocols=factory.protocols,
            )
        )

    def attach(self, downstream: GatewayProtocol) -> None:
        """Relay to C{downstream} (called before the client's 101)."""
        self.downstream = downstream

    def flush(self) -> None:
        """The client leg is open: deliver what arrived before."""
        held, self._held = self._held, []
        for payload, is_binary in held:
            self.onMessage(payload, is_binary)

    # -- the frame relay (see txwssec.relay) ------------------------------------

    def startRelay(self) -> None:
        """Relay the upstream's data frames to the client as they come."""
        self._scanner = FrameScanner(
            self,
            masked=False,
            max_frame=self.maxFramePayloadSize,
            max_message=self.maxMessagePayloadSize,
            accounted=False,
        )

    def dataReceived(self, data: bytes) -> None:
        try:
            if not _relayed(self, data):
                super().dataReceived(data)
        except Exception:
            self._applicationFailed("relay", Failure())

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

    def relayLimit(self, violation: Violation) -> None:
        pass

    def relayForward(self, frames: bytes) -> None:
        downstream = self.downstream
        if downstream is not None and downstream.state == downstream.STATE_OPEN:
            downstream.relayWrite(frames)

    def relayControl(self, frame: bytes) -> bool:
        return autobahn_control(self, frame) and self.relayOpen()

    def relayStop(self, rest: bytes, inside: bool, so_far: int, binary: bool) -> None:
        self._scanner = None
        autobahn_rest(self, rest, inside, so_far, binary)

    # -- Autobahn's path (before the relay, and with extensions) ----------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        downstream = self.downstream
        if downstream is None or downstream.state == downstream.STATE_CONNECTING:
            self._held.append((payload, isBinary))
        elif downstream.state == downstream.STATE_OPEN:
            downstream.sendMessage(payload, isBinary)

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


class GatewayProtocol(SecureServerProtocol):
    """
    The client leg of a gateway route (C{RoutePolicy(upstream=...)}).
    """

    upstream: UpstreamProtocol | None = None
    #: A client's protocol error, waiting for the upstream to close first.
    _pendingFailure: tuple[int, str] | None = None
    _drainTimer: IDelayedCall | None = None
    #: The frame relay, once the session is open (see L{txwssec.relay}).
    _scanner: FrameScanner | None = None
    _scanning: bool = False

    async def negotiate(self, handshake: HandshakeRequest, accept: Accept) -> str | None:
        """
        Open the upstream connection, and answer the client with the
        upstream's subprotocol (or the credential marker, if it chose none).

        @raise BadGateway: no upstream completed its handshake (502).
        @raise GatewayTimeout: the last one tried timed out (504).
        """
        route = self.route
        assert route is not None and route.upstream is not None
        pool = self.factory.upstreamPool(route)
        policy = self.factory.policy
        known = [method for each in policy.routes for method in each.authenticators]
        direct_peer = self._directPeer()
        headers = forwarded_headers(
            handshake,
            route.authenticators,
            accept,
            direct_peer,
            trust_forwarded_for=bool(policy.trust_forwarded_for)
            and is_trusted_proxy(direct_peer, policy.trusted_proxies),
            known_authenticators=known,
            forward_cookie=route.forward_cookie,
            forward_authorization=route.forward_authorization,
        )
        offered = [
            p
            for p in without_credentials(handshake.subprotocols, route.authenticators)
            if p not in accept.credential.subprotocols
        ]
        origin = handshake.header_values("origin")
        target = forwarded_target(self.http_request_uri, route.authenticators, accept, known)
        clock = self.factory.clock
        refusal: HandshakeRefused = BadGateway("no upstream")
        for url in pool.order():
            factory = SecureClientFactory(
                _join(url, target),
                subprotocols=offered,
                tls=ClientTLS(ca_file=route.upstream.ca_file),
                origin=origin[0] if origin else None,
                max_message_size=route.max_message_size,
                handshake_timeout=route.upstream.timeout,
                reactor=clock,
            )
            factory.protocol = UpstreamProtocol
            factory.headers = headers
            factory.useragent = None
            # A factory per connection: no "Starting/Stopping factory" lines.
            factory.noisy = False
            endpoint = partial(pool.endpoint, url, factory)
            try:
                upstream = await _open(factory, endpoint, route.upstream.timeout, clock)
            except GatewayTimeout as timeout:
                pool.failed(url)
                refusal = timeout
                gatewayLog.warn("upstream {url} timed out", url=url)
            except BadGateway as failure:
                pool.failed(url)
                refusal = failure
                gatewayLog.warn("upstream {url} failed: {reason}", url=url, reason=failure.reason)
            else:
                pool.succeeded(url)
                break
        else:
            raise refusal
        if self.state == self.STATE_CLOSED:
            upstream.sendCloseFrame(CloseCode.GOING_AWAY, b"going away")
            raise HandshakeRefused("client left while the upstream connected")
        self.upstream = upstream
        upstream.attach(self)
        chosen: str | None = upstream.websocket_protocol_in_use
        return chosen or accept.credential.marker

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

    # -- the frame relay (see txwssec.relay) ------------------------------------

    def _relays(self, upstream: UpstreamProtocol) -> bool:
        """
        Whether data frames are relayed as they come: not with an extension
        (permessage-deflate: Autobahn inflates and checks the client's
        messages and sends them uncompressed to the upstream), nor for a
        subclass that reads the client's messages (overrides C{onMessage}).
        """
        return (
            self._perMessageCompress is None
            and upstream._perMessageCompress is None
            and type(self).onMessage is GatewayProtocol.onMessage
        )

    def _startRelay(self, upstream: UpstreamProtocol) -> None:
        """Relay data frames both ways as they come (see L{txwssec.relay})."""
        self._scanner = FrameScanner(
            self,
            masked=True,
            max_frame=self.maxFramePayloadSize,
            max_message=self.maxMessagePayloadSize,
            accounted=True,
        )
        upstream.startRelay()

    def dataReceived(self, data: bytes) -> None:
        try:
            relayed = _relayed(self, data)
        except Exception:
            self._applicationFailed("relay", Failure())
            return
        if not relayed:
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
        return self._accountFrame(opcode, length, starts_message)

    def relayLimit(self, violation: Violation) -> None:
        self._limitExceeded(violation)

    def relayForward(self, frames: bytes) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.state == upstream.STATE_OPEN:
            transport: Any = upstream.transport
            transport.write(frames)
        if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
            # As Autobahn does on data frames: traffic answers a ping.
            self._cancelAutoPingTimeoutCall()

    def relayControl(self, frame: bytes) -> bool:
        return autobahn_control(self, frame) and self.relayOpen()

    def relayStop(self, rest: bytes, inside: bool, so_far: int, binary: bool) -> None:
        self._scanner = None
        autobahn_rest(self, rest, inside, so_far, binary)

    def relayWrite(self, frames: bytes) -> None:
        """
        Write frames relayed from the upstream: through L{sendData}, so that
        the slow-consumer limit counts them.
        """
        self.sendData(frames)

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
            self.factory.counters["gateway.upstream_lost"] += 1
            gatewayLog.warn("upstream of {peer} went away", peer=self.peer)
            _sendClose(self, CloseCode.BAD_GATEWAY, b"upstream failed")

    # -- sessions the gateway ends, and the end of the client ------------------

    def endSession(self, code: int, reason: str, event: str) -> None:
        self._stopDraining()
        self._closeUpstream(CloseCode.GOING_AWAY, b"going away")
        super().endSession(code, reason, event)

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


async def _open(
    factory: SecureClientFactory,
    endpoint: Callable[[], IStreamClientEndpoint],
    timeout: float,
    clock: Any,
) -> UpstreamProtocol:
    """Connect and complete the upstream's WebSocket handshake, or refuse."""
    connecting: Deferred[Any] = Deferred.fromCoroutine(_connect(factory, endpoint))
    connecting.addTimeout(timeout, clock)
    try:
        protocol: UpstreamProtocol = await connecting
    except (CancelledError, TimeoutError, DeferredTimeout):
        raise GatewayTimeout(f"{factory.url}: no handshake within {timeout:g} s") from None
    except Exception as error:
        raise BadGateway(f"{factory.url}: {error}") from None
    return protocol


async def _connect(
    factory: SecureClientFactory, endpoint: Callable[[], IStreamClientEndpoint]
) -> UpstreamProtocol:
    protocol: Any = await endpoint().connect(factory)
    try:
        await protocol.opened
    except CancelledError:
        protocol.dropConnection(abort=True)
        raise
    return protocol  # type: ignore[no-any-return]


def _relayed(leg: UpstreamProtocol | GatewayProtocol, data: bytes) -> bool:
    """
    Give C{data} to C{leg}'s frame scanner if it relays (from the first read
    where Autobahn holds no partial frame on); L{False} when Autobahn must
    parse it.
    """
    scanner = leg._scanner
    if scanner is None or not (leg._scanning or autobahn_idle(leg)):
        return False
    leg._scanning = True
    scanner.feed(data)
    return True


#: Client failures the gateway holds until the upstream has closed: protocol
#: error and invalid payload (see L{GatewayProtocol._drainUpstream}). Limits
#: (1008, 1009, 1013) and timeouts close at once.
_DRAINED_FAILURES = frozenset({1002, 1007})


def _sendClose(protocol: Any, code: int | None, reasonRaw: bytes | None) -> None:
    """Send a close frame with C{code}, or none when it may not be sent."""
    if code is not None and code not in _SENDABLE and not 3000 <= code <= 4999:
        code, reasonRaw = None, None
    protocol.sendCloseFrame(code, (reasonRaw or b"")[:123] if code is not None else None)


def _spoofable(name: str) -> bool:
    """
    Headers an upstream may trust as set by its proxy: the gateway's own
    (X-Consumer-Username, X-Forwarded-For, set below), the other forwarding
    headers, and any name with an underscore (CGI and WSGI servers read
    X_Consumer_Username as X-Consumer-Username).
    """
    return (
        "_" in name
        or name in ("forwarded", "x-real-ip", "x-client-ip")
        or name.startswith("x-forwarded-")
    )


def forwarded_headers(
    request: HandshakeRequest,
    authenticators: Sequence[Authenticator],
    accept: Accept,
    direct_peer: str,
    trust_forwarded_for: bool = False,
    *,
    known_authenticators: Sequence[Authenticator] = (),
    forward_cookie: bool = False,
    forward_authorization: bool = False,
) -> dict[str, str]:
    """
    The headers sent upstream: the client's, minus

      - hop-by-hop and handshake headers (L{HOP_HEADERS}) and every header
        the client's C{Connection} header names (RFC 9110 section 7.6.1);
      - every header any of the route's methods reads credentials from, and
        the one the accepting method read (see L{txwssec.auth.credentials});
      - every header any method of C{known_authenticators} (the server's
        other routes) reads credentials from, and C{Authorization} and
        C{Cookie}, unless C{forward_authorization} / C{forward_cookie} allow
        that one (a route's own credential header is stripped regardless);
      - forwarding headers a client could forge;

    plus C{X-Consumer-Username} and C{X-Forwarded-For}: the address that
    connected to us, after the chain the client sent when C{trust_forwarded_for}
    (the peer is a trusted proxy; a client-made chain is dropped otherwise).
    """
    always = set(credential_headers(authenticators))
    if accept.credential.header:
        always.add(accept.credential.header.lower())
    known = set(credential_headers(known_authenticators)) | {"authorization", "cookie"}
    if forward_authorization:
        known.discard("authorization")
    if forward_cookie:
        known.discard("cookie")
    stripped = always | known | connection_options(request)
    forwarded: dict[str, str] = {}
    for name, value in request.headers:
        if name in HOP_HEADERS or name in stripped or _spoofable(name):
            continue
        if name in forwarded:
            forwarded[name] += ("; " if name == "cookie" else ", ") + value
        else:
            forwarded[name] = value
    chain = list(request.header_values("x-forwarded-for")) if trust_forwarded_for else []
    forwarded["X-Forwarded-For"] = ", ".join([*chain, direct_peer])
    forwarded["X-Consumer-Username"] = accept.principal.consumer
    return forwarded


def connection_options(request: HandshakeRequest) -> frozenset[str]:
    """
    The header names listed in the request's C{Connection} header(s): they
    are meant for this hop only and are never forwarded.
    """
    return frozenset(
        token.strip().lower()
        for value in request.header_values("connection")
        for token in value.split(",")
        if token.strip()
    )


def forwarded_target(
    request_uri: str,
    authenticators: Sequence[Authenticator],
    accept: Accept,
    known_authenticators: Sequence[Authenticator] = (),
) -> str:
    """
    The client's path and query, minus every query parameter a method of
    the route or of C{known_authenticators} reads credentials from.

    The query is edited as sent: only the removed C{name=value} pieces go,
    every other byte (percent-encoding, C{+}, order, empty pieces between
    kept ones) is left as the client wrote it, so signed URLs still verify.
    """
    names = set(credential_queries(authenticators)) | set(credential_queries(known_authenticators))
    if accept.credential.query:
        names.add(accept.credential.query)
    path, question, query = request_uri.partition("?")
    query = query.partition("#")[0]  # a client sends none; never forwarded
    if not question or not names:
        return path + (question + query if query else "")
    kept = [
        piece
        for piece in query.split("&")
        if unquote_plus(piece.partition("=")[0], errors="replace") not in names
    ]
    edited = "&".join(kept)
    return path + ("?" + edited if edited else "")


def _join(upstream_url: str, target: str) -> str:
    """
    The upstream URL for a client's C{target}: the upstream's own path when
    it has one, else the client's path; the client's query either way.
    """
    upstream = urlsplit(upstream_url)
    client = urlsplit(target)
    path = upstream.path if upstream.path not in ("", "/") else client.path
    query = "&".join(q for q in (upstream.query, client.query) if q)
    return upstream._replace(path=path or "/", query=query).geturl()
