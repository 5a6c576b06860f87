"""
The HTTP side of one-time tickets (L{txwssec.tickets}) for
L{SecureServerProtocol}: a plain C{POST <route path>} (no Upgrade), or its
CORS preflight C{OPTIONS}, arriving where a handshake would.

C{POST} goes through the handshake's own steps (route, admission, Origin,
the route's methods; a refusal is answered and counted as a refused
handshake, a 401 counts towards the address's lockout; a revoked token is
refused 401 as at the handshake, see L{txwssec.revocations}) and answers::

    HTTP/1.1 201 Created
    Content-Type: application/json
    Cache-Control: no-store

    {"ticket": "<opaque>", "expires_in": <seconds>}

A browser's request from an allowed origin (the route's C{allowed_origins}
or same-origin rule) gets C{Access-Control-Allow-Origin} (that origin) on
every answer, and its preflight C{OPTIONS} a 204 naming C{POST} and the
headers the route's methods read; other origins get 403 and no CORS
header. Elsewhere a C{POST} is refused (405) as it always was.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from txwssec import events, tickets
from txwssec.auth.chain import authenticate
from txwssec.credentials import credential_headers
from txwssec.errors import Forbidden, HandshakeRefused
from txwssec.logs import bounded
from txwssec.origin import listener_for
from txwssec.policy import RoutePolicy
from txwssec.server.context import ServerContext
from txwssec.types import Accept, HandshakeRequest

#: The methods answered here instead of by the WebSocket handshake.
TICKET_METHODS = (b"POST ", b"OPTIONS ")

#: How long a browser may cache a preflight's answer (seconds).
_PREFLIGHT_MAX_AGE = "600"


class _Request:
    """What L{HandshakeIO.handshakeRequest} reads of Autobahn's request."""

    def __init__(self, target: str) -> None:
        split = urlsplit(target)
        self.path = split.path
        self.params = parse_qs(split.query, keep_blank_values=True)
        self.protocols: list[str] = []


class TicketIssuer(WebSocketServerProtocol):
    """The ticket part of L{txwssec.server.SecureServerProtocol} (a base class)."""

    factory: ServerContext
    route: RoutePolicy | None = None
    _admitted_host: str | None = None
    _client_host: str | None = None
    _cors: tuple[tuple[str, str], ...] = ()

    # From HandshakeIO (another base class of the protocol).
    handshakeRequest: Callable[[Any], HandshakeRequest]
    _refuse: Callable[[HandshakeRefused], None]

    def _ticketRequest(self, end: int) -> bool:
        """
        Answer a C{POST} or C{OPTIONS} whose head is C{self.data[:end + 4]}
        (checked: no body, see L{txwssec._request}) on a route with tickets.

        @return: L{False}, having done nothing, for another path: the
            request is Autobahn's to refuse (405), as without tickets.
        """
        head = self.data[: end + 4]
        method, _, rest = head.partition(b"\r\n")[0].decode("iso-8859-1").partition(" ")
        target = rest.rpartition(" ")[0]
        path = urlsplit(target).path
        try:
            if not self.factory.policy.route_for(path).tickets:
                return False
        except HandshakeRefused:
            return False
        self.http_request_data = head
        self.http_request_path = path
        try:
            self._ticketPipeline(method, target)
        except HandshakeRefused as refusal:
            self._ticketRefused(refusal)
        except Exception:
            self._ticketFailed(Failure())
        return True

    def _ticketPipeline(self, method: str, target: str) -> None:
        factory = self.factory
        request = self.handshakeRequest(_Request(target))
        route = factory.policy.route_for(request.path)
        self.route = route
        admitted = factory.admission.admit(request.host, factory.clock.seconds())
        if admitted is not None:  # a shared store: on when it has answered
            admitted.addCallback(self._ticketAdmitted, method, request)
            admitted.addErrback(self._ticketDenied)
            return
        self._ticketAdmitted(None, method, request)

    def _ticketAdmitted(self, _: None, method: str, request: HandshakeRequest) -> None:
        factory, route = self.factory, self.route
        assert route is not None
        if self.state == self.STATE_CLOSED:  # the client left meanwhile
            factory.admission.release(request.host)
            return
        self._admitted_host = self._client_host = request.host
        origin = request.header_values("origin")
        if origin:
            if not route.origins.allows(
                origin[0], listener_for(self.transport, factory.policy.public_origins)
            ):
                raise Forbidden(f"origin {bounded(origin[0])!r} not allowed")
            self._cors = (("Access-Control-Allow-Origin", origin[0]), ("Vary", "Origin"))
        if method == "OPTIONS":
            allowed = ", ".join(sorted(credential_headers(route.authenticators)))
            preflight = (
                ("Access-Control-Allow-Methods", "POST"),
                ("Access-Control-Allow-Headers", allowed),
                ("Access-Control-Max-Age", _PREFLIGHT_MAX_AGE),
            )
            self._answer(204, "No Content", b"", (*self._cors, *preflight, ("Allow", "GET, POST")))
            return
        accept = authenticate(route.authenticators, request)
        if isinstance(accept, Deferred):
            accept.addCallbacks(self._issue, self._ticketDenied)
        else:
            self._issue(accept)

    def _issue(self, accept: Accept) -> None:
        route, factory = self.route, self.factory
        assert route is not None
        if self.state == self.STATE_CLOSED:
            return
        try:
            factory.revocations.refuse(accept.principal, route)
            issued = tickets.issue(factory.admission.store, route, accept, factory.clock.seconds())
        except HandshakeRefused as refusal:
            self._ticketRefused(refusal)
            return
        if isinstance(issued, Deferred):  # stored in a shared store: answered once it is
            issued.addCallbacks(self._issued, self._ticketDenied, callbackArgs=(accept,))
            return
        self._issued(issued, accept)

    def _issued(self, issued: tuple[str, float], accept: Accept) -> None:
        route, factory = self.route, self.factory
        assert route is not None
        if self.state == self.STATE_CLOSED:
            return
        ticket, ttl = issued
        principal = accept.principal
        factory.events.emit(
            events.TICKET_ISSUED,
            peer=self.peer,
            route=route.path,
            consumer=principal.consumer,
            method=principal.method,
            expires_in=ttl,
        )
        expires_in = int(ttl) if ttl == int(ttl) else ttl
        body = json.dumps({"ticket": ticket, "expires_in": expires_in}).encode()
        self._answer(201, "Created", body, (*self._cors, ("Content-Type", "application/json")))

    def _ticketDenied(self, failure: Failure) -> None:
        refusal = failure.value
        if isinstance(refusal, HandshakeRefused):
            self._ticketRefused(refusal)
        else:
            self._ticketFailed(failure)

    def _ticketRefused(self, refusal: HandshakeRefused) -> None:
        if self.state == self.STATE_CLOSED:
            return
        if self._cors and refusal.status != 403:
            # The browser may read the status (401, 429...).
            refusal.headers = (*refusal.headers, *self._cors)
        self._refuse(refusal)

    def _ticketFailed(self, failure: Failure) -> None:
        self.factory.events.emit(events.HANDSHAKE_ERROR, peer=self.peer, failure=failure)
        self._ticketRefused(HandshakeRefused("internal error", status=500))

    def _answer(
        self, status: int, phrase: str, body: bytes, headers: tuple[tuple[str, str], ...]
    ) -> None:
        lines = [
            f"HTTP/1.1 {status} {phrase}",
            f"Content-Length: {len(body)}",
            "Connection: close",
            "Cache-Control: no-store",
            *(f"{name}: {value}" for name, value in headers),
        ]
        self.sendData(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        self.dropConnection(abort=False)
