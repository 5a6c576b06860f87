"""
The handshake's input and output for L{SecureServerProtocol}: the request
read strictly (the header block's size and lines, a request with a body),
and every refusal answered in one place (L{HandshakeIO.failHandshake}).
The pipeline that decides is L{SecureServerProtocol.secureHandshake}.
"""

from __future__ import annotations

import re
from base64 import b64encode
from collections.abc import Callable
from hashlib import sha1
from typing import Any

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.interfaces import ISSLTransport

from txwssec import events
from txwssec._cycles import fire
from txwssec._request import check_request_head
from txwssec.admission import client_address
from txwssec.compression import (
    ExtensionOffer,
    parse_extensions,
)
from txwssec.errors import (
    HandshakeRefused,
    HeaderFieldsTooLarge,
    MalformedHandshake,
    RouteNotFound,
    Unauthorized,
    http_refusal,
)
from txwssec.logs import bounded
from txwssec.policy import RoutePolicy
from txwssec.server.context import ServerContext
from txwssec.server.ticketing import TICKET_METHODS
from txwssec.server.upgrade import CONTROL_CHARACTERS, HEADER_BLOCK, HEADER_LINE, UpgradeReader
from txwssec.tls import peer_certificate
from txwssec.types import HandshakeRequest


# (mypy: a second base makes Autobahn's own bases' disagreement visible.)
class HandshakeIO(UpgradeReader, WebSocketServerProtocol):  # type: ignore[misc]
    """
    Reading the opening handshake and answering a refusal: a part of
    L{txwssec.server.SecureServerProtocol} (its base class), kept apart so
    that the pipeline reads on its own.
    """

    factory: ServerContext
    route: RoutePolicy | None = None
    _refusal: HandshakeRefused | None = None
    #: The admitted address, kept after release: a failed authentication
    #: counts even if the client reset the connection before the verdict.
    _client_host: str | None = None
    _pipelineStarted: bool = False
    #: txwssec logged why the connection is dropped (a refusal, a handshake
    #: timeout): Autobahn's own "dropping connection" line is left out.
    _dropLogged: bool = False
    #: When the request's header block was complete (the handshake's
    #: duration, in the events, counts from there).
    _handshakeStarted: float | None = None
    #: From L{txwssec.server.ticketing.TicketIssuer} (another base class).
    _ticketRequest: Callable[[int], bool]

    def handshakeRequest(self, request: ConnectionRequest) -> HandshakeRequest:
        """
        Build the L{HandshakeRequest} the authenticators see, keeping every
        header line (Autobahn's own dictionary folds duplicates together).

        @raise MalformedHandshake: a header line that is not C{name: value},
            or holds a control character (400).
        """
        headers = self._headerLines
        if headers is None:
            # Autobahn read this request (not the lean reader): check it.
            head = self.http_request_data.decode("iso-8859-1")
            # The header lines, each with its CRLF: from after the request
            # line up to the blank line that ends the block.
            block = head[head.find("\r\n") + 2 : -2]
            if CONTROL_CHARACTERS.search(block):
                # A bare CR, LF, NEL or other control character: other
                # parsers (Autobahn's own, an upstream's) would split the
                # line there.
                raise MalformedHandshake("control character in a header line")
            if not HEADER_BLOCK.fullmatch(block):
                # RFC 9112 section 5: a line that is not "name: value" (no
                # colon, no name, space before the colon, a folded line).
                raise MalformedHandshake("malformed header line")
            headers = tuple(
                (name.lower(), value.strip(" \t")) for name, value in HEADER_LINE.findall(block)
            )
        peer = str(self.peer)
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
        an upstream), what the client sends is kept for after the 101 and
        never starts a second pipeline; it is read only so that a client
        that leaves is noticed at once (its upstream connection closed, its
        authentication's verdict dropped): past C{max_header_bytes} more,
        reading stops until the 101.
        """
        policy = self.factory.policy
        if self._pipelineStarted:
            if len(self.data) > policy.max_header_bytes:
                self._transport().pauseProducing()
            return
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
            self._handshakeStarted = self.factory.clock.seconds()
            try:
                # Before anything else reads the request: a body, malformed
                # extension offers (400).
                self.data = check_request_head(self.data, end)
            except HandshakeRefused as refusal:
                return self._refuse(refusal)
            if self.data.startswith(TICKET_METHODS) and self._ticketRequest(
                self.data.find(b"\r\n\r\n")
            ):
                return  # one-time tickets: POST (and its preflight) on a route
            if not self.readUpgrade(self.data.find(b"\r\n\r\n")):
                # Anything unusual: Autobahn's reader, its checks and answers.
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
        if not (LEAN_OPEN and self._openLean(res)):
            super().succeedHandshake(res)
        if self.state == self.STATE_OPEN:
            self._transport().resumeProducing()

    def _openLean(self, res: Any) -> bool:
        """
        Autobahn's C{succeedHandshake} for the common answer (no extension
        offered, no response headers of the factory's, the subprotocol as a
        string the client offered, or none): the same 101, the same state,
        the same calls, in one function.

        @return: L{False} (nothing done) for any other: Autobahn's answers.
        """
        protocol: Any = self
        if res is not None and (type(res) is not str or res not in protocol.websocket_protocols):
            return False
        factory: Any = self.factory
        if protocol.websocket_extensions or factory.headers or protocol.trackedTimings:
            return False
        protocol.websocket_protocol_in_use = res
        protocol.websocket_extensions_in_use = []
        # RFC 6455's Sec-WebSocket-Accept is SHA-1 by definition (no secret).
        digest = sha1(protocol._wskey.encode("utf8") + _WS_MAGIC).digest()  # noqa: S324
        accept = b64encode(digest).decode()
        server = factory.server
        response = "".join(
            (
                "HTTP/1.1 101 Switching Protocols\r\n",
                f"Server: {server}\r\n" if server else "",
                "Upgrade: WebSocket\r\nConnection: Upgrade\r\n",
                "" if res is None else f"Sec-WebSocket-Protocol: {res}\r\n",
                f"Sec-WebSocket-Accept: {accept}\r\n\r\n",
            )
        )
        self.sendData(response.encode("utf8"))
        protocol.http_response_data = response
        self.state = self.STATE_OPEN
        # Auto-ping's timer first, then the handshake's cancelled: the
        # timers' reactor call stays armed (for the cancelled one) instead
        # of being cancelled with the last timer and made again at once.
        interval = protocol.autoPingInterval
        if interval:
            protocol.autoPingPendingCall = factory._batched_timer.call_later(
                interval, protocol._sendAutoPing
            )
        call = protocol.openHandshakeTimeoutCall
        if call is not None:
            call.cancel()
            protocol.openHandshakeTimeoutCall = None
        protocol.inside_message = False
        protocol.current_frame = None
        protocol._onOpen()
        fire(protocol, "is_open", None)  # (txaio.resolve, made only if read)
        if len(self.data) > 0:
            protocol.consumeData()
        return True

    def _transport(self) -> Any:
        return self.transport

    def _refuse(self, refusal: HandshakeRefused) -> None:
        self._refusal = refusal
        self.failHandshake(refusal.reason, refusal.status)

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
        if refusal is None and code == 426 and self._answerHealthCheck():
            return
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
        if isinstance(refusal, Unauthorized) and self._client_host is not None:
            factory.admission.authentication_failed(self._client_host, factory.clock.seconds())
        path = self._requestPath()
        factory.events.emit(
            events.HANDSHAKE_REFUSED,
            peer=bounded(self.peer),
            route=self._routeFor(path),
            path=bounded(path),
            status=refusal.status,
            method=refusal.method,
            reason=bounded(refusal.reason, _MAX_LOGGED_REASON),
            limit=refusal.counter,
            duration_s=self._handshakeDuration(),
        )
        self.sendData(http_refusal(refusal.status, refusal.headers))
        self._dropLogged = True
        self.dropConnection(abort=False)

    def _answerHealthCheck(self) -> bool:
        """
        A plain GET (no Upgrade) of C{[server] health_path}: answer 200
        C{ok} (for probes that reach only the service port) and say so.
        """
        path = self.factory.policy.health_path
        if not path or getattr(self, "http_request_path", None) != path:
            return False
        self.wasClean = True
        self._dropLogged = True  # no "dropping connection" warning per probe
        self.sendData(HEALTH_OK)
        self.dropConnection(abort=False)
        return True

    def _handshakeDuration(self) -> float | None:
        """Seconds since the request was complete, if it was."""
        started = self._handshakeStarted
        return None if started is None else round(self.factory.clock.seconds() - started, 6)

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


#: Whether the common 101 is written by L{HandshakeIO._openLean} (tests
#: compare it with Autobahn's by turning this off).
LEAN_OPEN = True
_WS_MAGIC = WebSocketServerProtocol._WS_MAGIC


def _peer_host(peer: str) -> str:
    """The address part of Autobahn's peer string (C{tcp4:1.2.3.4:5})."""
    kind, _, rest = peer.partition(":")
    if kind in ("tcp4", "tcp6"):
        return rest.rsplit(":", 1)[0]
    return peer


#: The answer to a health check (see L{ServerPolicy.health_path}).
HEALTH_OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\n"
    b"Connection: close\r\nCache-Control: no-store\r\n\r\nok\n"
)

#: The most characters of a refusal's reason that reach the log (the values
#: in it are bounded each, see L{bounded}; this bounds the rest).
_MAX_LOGGED_REASON = 1024


def _redact(reason: str) -> str:
    """
    Drop quoted values from an Autobahn failure reason: from the first quote
    to the last one of the same kind, so that a value holding quotes itself
    cannot end the redaction early.
    """
    return re.sub(r"([\"']).*\1", r"\1…\1", reason, flags=re.DOTALL)
