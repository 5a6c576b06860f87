"""
The secure server: an Autobahn factory and protocol whose opening handshake
runs txwssec's pipeline (see L{SecureServerProtocol.secureHandshake}).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from txwssec._reactor import default_reactor
from txwssec.auth.chain import authenticate
from txwssec.errors import (
    CloseCode,
    Forbidden,
    HandshakeRefused,
    MalformedHandshake,
    ServiceUnavailable,
    TooManyRequests,
    http_refusal,
)
from txwssec.limits import ConnectionCounter
from txwssec.policy import RoutePolicy, ServerPolicy
from txwssec.session import Session
from txwssec.subprotocols import select_subprotocol
from txwssec.types import HandshakeRequest


class SecureServerProtocol(WebSocketServerProtocol):
    """
    A WebSocket server protocol whose handshake is authenticated.

    Subclass it and override C{onOpen}, C{onMessage} and C{onClose} as with
    any Autobahn protocol; do not override C{onConnect}. Once open,
    C{self.session} tells who is connected (C{session.principal}) and until
    when (C{session.expires_at}); C{self.route} is the route's policy.

    The session is closed with 3000 when its credentials expire, 3003 when
    they are revoked, and 3008 after C{idle_timeout} without a message.
    """

    #: Autobahn's logger for this protocol, pinned at "info" whatever txaio's
    #: global level: Autobahn's debug lines quote raw handshakes and frames,
    #: credentials included.
    log = txaio.make_logger(level="info")  # type: ignore[attr-defined]
    #: txwssec's own events (refusals, sessions), with named fields.
    securityLog: ClassVar[Logger] = Logger(namespace="txwssec.server")
    factory: SecureServerFactory
    session: Session | None = None
    route: RoutePolicy | None = None
    _refusal: HandshakeRefused | None = None
    _admitted_host: str | None = None
    _idle_timer: IDelayedCall | None = None
    _last_message: float = 0.0

    # -- the handshake pipeline -------------------------------------------

    def onConnect(  # type: ignore[override]
        self, request: ConnectionRequest
    ) -> Deferred[str | None]:
        """
        Autobahn's handshake hook: run L{secureHandshake} and turn any
        refusal into a L{ConnectionDeny} (rendered by L{failHandshake}).
        """
        return Deferred.fromCoroutine(self._guardedHandshake(request))

    async def _guardedHandshake(self, request: ConnectionRequest) -> str | None:
        try:
            return await self.secureHandshake(request)
        except HandshakeRefused as refusal:
            self._refusal = refusal
        except Exception:
            self.securityLog.failure("handshake pipeline failed for {peer}", peer=self.peer)
            self._refusal = HandshakeRefused("internal error", status=500)
        raise ConnectionDeny(self._refusal.status, self._refusal.reason)

    async def secureHandshake(self, request: ConnectionRequest) -> str | None:
        """
        The pipeline, in order; the first refusal raises L{HandshakeRefused}.

        @return: the subprotocol to answer with, or L{None}.
        """
        factory = self.factory
        handshake = self.handshakeRequest(request)

        # 1. route lookup by path (404)
        route = factory.policy.route_for(handshake.path)
        self.route = route
        self._useRoute(route)

        # 2. connection admission (503, 429)
        factory.admit(handshake.host)
        self._admitted_host = handshake.host

        # 3. Origin (403)
        origin = handshake.header_values("origin")
        if not route.origins.allows(
            origin[0] if origin else None, _host_header(request), handshake.secure
        ):
            raise Forbidden(f"origin {origin[0]!r} not allowed")

        # 4. authentication (401, 403)
        accept = await authenticate(route.authenticators, handshake)
        principal = accept.principal
        if route.consumers is not None and principal.consumer not in route.consumers:
            refusal = Forbidden(f"consumer {principal.consumer!r} not allowed on route")
            refusal.method = principal.method
            raise refusal

        # 5. per-consumer caps: see txwssec.limits (issue: abuse limits)

        # 6. subprotocol: credentials consumed, never echoed
        subprotocol = select_subprotocol(handshake.subprotocols, route.subprotocols, accept)

        # 7. the session, its timers armed when the connection opens
        clock = factory.clock
        not_after = clock.seconds() + route.max_lifetime if route.max_lifetime else None
        self.session = Session(principal, accept.expires_at, route.path, clock, not_after)
        expires_at = self.session.expires_at
        self.securityLog.info(
            "accepted {peer} on {route} as {consumer} by {method}",
            peer=self.peer,
            route=route.path,
            consumer=principal.consumer,
            method=principal.method,
            expires_at=expires_at,
        )
        return subprotocol

    def handshakeRequest(self, request: ConnectionRequest) -> HandshakeRequest:
        """
        Build the L{HandshakeRequest} the authenticators see, keeping every
        header line (Autobahn's own dictionary folds duplicates together).
        """
        head = self.http_request_data.decode("iso-8859-1").split("\r\n")[1:]
        headers = []
        for line in head:
            if not line:
                continue
            name, colon, value = line.partition(":")
            if not colon or not _FIELD_NAME.fullmatch(name):
                # RFC 9112 section 5: a line that is not "name: value" (no
                # colon, no name, space before the colon, a folded line).
                raise MalformedHandshake("malformed header line")
            headers.append((name.lower(), value.strip()))
        peer = str(self.peer)
        return HandshakeRequest(
            peer=peer,
            host=_peer_host(peer),
            path=request.path,
            query={k: tuple(v) for k, v in request.params.items()},
            headers=tuple(headers),
            subprotocols=tuple(request.protocols),
            secure=ISSLTransport.providedBy(self.transport),
        )

    def _useRoute(self, route: RoutePolicy) -> None:
        for name, value in route.protocol_attributes().items():
            setattr(self, name, value)
        if route.protocol is not None and type(self) is not route.protocol:
            # The route's application class takes over this connection before
            # any application code runs. Route classes are subclasses of
            # SecureServerProtocol (checked by the policy), so the instance
            # layout is the same.
            self.__class__ = route.protocol

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
        self.securityLog.info(
            "refused {peer} on {route} with {status} ({method}): {reason}",
            peer=self.peer,
            route=self.route.path if self.route else None,
            status=refusal.status,
            method=refusal.method,
            reason=refusal.reason,
        )
        self.factory.refusals[refusal.status] = self.factory.refusals.get(refusal.status, 0) + 1
        self.sendData(http_refusal(refusal.status, refusal.headers))
        self.dropConnection(abort=False)

    # -- the open session -------------------------------------------------

    def _onOpen(self) -> None:
        session = self.session
        route = self.route
        if session is not None and route is not None:
            session.start(self._credentialsExpired)
            self.factory.sessionOpened(self)
            if route.idle_timeout:
                self._last_message = self.factory.clock.seconds()
                self._idle_timer = self.factory.clock.callLater(
                    route.idle_timeout, self._checkIdle
                )
        super()._onOpen()

    def _onMessageBegin(self, isBinary: bool) -> None:
        if self._idle_timer is not None:
            self._last_message = self.factory.clock.seconds()
        super()._onMessageBegin(isBinary)

    def _checkIdle(self) -> None:
        assert self.route is not None
        idle = self.factory.clock.seconds() - self._last_message
        remaining = self.route.idle_timeout - idle
        if remaining > 0:
            self._idle_timer = self.factory.clock.callLater(remaining, self._checkIdle)
            return
        self._idle_timer = None
        self.endSession(CloseCode.TIMEOUT, "idle timeout", "idle")

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
        self.securityLog.info(
            "session {event}: closing {peer} on {route} ({consumer}) with {code}",
            event=event,
            peer=self.peer,
            route=session.route if session else None,
            consumer=session.consumer if session else None,
            code=int(code),
        )
        if session is not None:
            session.stop()
        self.sendClose(int(code), reason)

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Release everything this connection held, however it ended."""
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        if self.session is not None:
            self.session.stop()
            self.factory.sessionClosed(self)
        if self._admitted_host is not None:
            self.factory.release(self._admitted_host)
            self._admitted_host = None
        if reason is None:
            super().connectionLost()
        else:
            super().connectionLost(reason)


class SecureServerFactory(WebSocketServerFactory):
    """
    An Autobahn server factory enforcing a L{ServerPolicy}.

    @ivar policy: the policy.
    @ivar clock: the reactor used for timers.
    @ivar refusals: handshake refusals counted by HTTP status.
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
        self.policy = policy
        self.clock: IReactorTime = reactor
        self.setProtocolOptions(**policy.protocol_options())
        self.connections = ConnectionCounter()
        self.sessions: dict[str, set[SecureServerProtocol]] = {}
        self.refusals: dict[int, int] = {}

    def admit(self, host: str) -> None:
        """
        Count a connection from C{host}, or refuse it.

        @raise ServiceUnavailable: the server is at C{max_connections}.
        @raise TooManyRequests: C{host} is at C{max_connections_per_ip}.
        """
        policy = self.policy
        if policy.max_connections and self.connections.total >= policy.max_connections:
            raise ServiceUnavailable("max_connections reached")
        per_ip = policy.max_connections_per_ip
        if per_ip and self.connections.count(host) >= per_ip:
            raise TooManyRequests(f"max_connections_per_ip reached for {host}")
        self.connections.acquire(host)

    def release(self, host: str) -> None:
        """Forget a connection counted by L{admit}."""
        self.connections.release(host)

    def sessionOpened(self, protocol: SecureServerProtocol) -> None:
        """Track an open session (for L{revoke})."""
        assert protocol.session is not None
        self.sessions.setdefault(protocol.session.consumer, set()).add(protocol)

    def sessionClosed(self, protocol: SecureServerProtocol) -> None:
        """Stop tracking a session."""
        assert protocol.session is not None
        consumer = protocol.session.consumer
        live = self.sessions.get(consumer)
        if live is not None:
            live.discard(protocol)
            if not live:
                del self.sessions[consumer]

    def revoke(self, consumer: str) -> int:
        """
        Close every open session of C{consumer} with 3003.

        @return: how many sessions were closed.
        """
        live = list(self.sessions.get(consumer, ()))
        for protocol in live:
            protocol.revoke()
        return len(live)


def _peer_host(peer: str) -> str:
    """The address part of Autobahn's peer string (C{tcp4:1.2.3.4:5})."""
    kind, _, rest = peer.partition(":")
    if kind in ("tcp4", "tcp6"):
        return rest.rsplit(":", 1)[0]
    return peer


#: An HTTP field name (RFC 9110 section 5.1: a token).
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _host_header(request: ConnectionRequest) -> str:
    values: Any = request.headers.get("host", "")
    return str(values).strip()


def _redact(reason: str) -> str:
    """
    Drop quoted values from an Autobahn failure reason: from the first quote
    to the last one of the same kind, so that a value holding quotes itself
    cannot end the redaction early.
    """
    return re.sub(r"([\"']).*\1", r"\1…\1", reason, flags=re.DOTALL)
