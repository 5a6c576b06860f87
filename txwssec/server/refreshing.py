"""
In-band refresh for L{SecureServerProtocol} (routes with C{refresh =
true}, see L{txwssec.refresh}): the message hook at the very start of the
message path (before validation and the application, and on a gateway's
client leg before the upstream), the session's refresher behind
C{await session.refresh(credential)}, and the C{wssec.expiring} notice.

Credentials are checked at most once per L{MIN_INTERVAL} second per
session (and one at a time); a malformed message is rejected without
counting (it costs no check). A credential that no method accepts counts as a failed
authentication of the client's address, as a refused handshake does: a
session cannot be used to try credentials faster than new connections
could. A token that is revoked (L{txwssec.revocations}: its C{jti}, or its
consumer's tokens issued before a time) is such a credential: the refresh
is rejected (C{invalid credential}) and the session keeps its principal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

from txwssec import events, refresh
from txwssec.errors import CloseCode, ServiceUnavailable
from txwssec.policy import RoutePolicy
from txwssec.refresh import ConsumerChanged, RefreshRejected
from txwssec.server.context import ServerContext
from txwssec.session import Session
from txwssec.types import HandshakeRequest


class SessionRefresh(WebSocketServerProtocol):
    """
    The refresh part of L{txwssec.server.SecureServerProtocol} (a base class).
    """

    factory: ServerContext
    session: Session | None = None
    route: RoutePolicy | None = None
    _client_host: str | None = None
    #: When the last refresh message was taken (for L{MIN_INTERVAL}).
    _refreshedAt: float = float("-inf")
    _refreshing: bool = False

    # From the protocol's other base classes.
    _sessionFields: Callable[[], dict[str, Any]]
    endSession: Callable[[int, str, str], None]

    def _startRefresh(self, session: Session, route: RoutePolicy) -> None:
        """
        When the session opens: the refresher behind C{session.refresh(credential)}
        (any route: the application decides), and on a refresh route the notice.
        """
        session.refresher = self._refreshCredential
        if route.refresh and route.refresh_notice > 0:
            session.notify(route.refresh_notice, self._credentialsExpiring)

    def _refreshMessage(self, payload: bytes) -> None:
        """
        A refresh message (L{refresh.is_refresh}): consumed here, answered
        C{wssec.refreshed} or C{wssec.refresh_rejected}.
        """
        now = self.factory.clock.seconds()
        try:
            token = refresh.read_token(payload)
            if self._refreshing or now - self._refreshedAt < refresh.MIN_INTERVAL:
                raise RefreshRejected("rate_limited")
            self._refreshedAt = now
        except RefreshRejected as rejection:
            self._refreshRejected(rejection)
            return
        self._refreshing = True
        done = self._refreshCredential(token)
        done.addCallbacks(self._refreshAnswered, self._refreshFailed)

    def _refreshAnswered(self, expires_at: float | None) -> None:
        self._refreshing = False
        self.sendMessage(refresh.refreshed(expires_at))

    def _refreshFailed(self, failure: Failure) -> None:
        self._refreshing = False
        error = failure.value
        if isinstance(error, RefreshRejected):
            self.sendMessage(refresh.rejected(error.reason))
        elif not isinstance(error, ConsumerChanged):
            self.factory.events.emit(
                events.APPLICATION_ERROR, hook="refresh", failure=failure, **self._sessionFields()
            )
            self.sendMessage(refresh.rejected(refresh.REASONS["unavailable"]))

    def _refreshCredential(self, token: str) -> Deferred[float | None]:
        """
        Check C{token} with the route's methods and, for the same consumer,
        move the session's expiry (see L{Session.refresh}).
        """
        return ensureDeferred(self._refresh(token))

    async def _refresh(self, token: str) -> float | None:
        session, route = self.session, self.route
        assert session is not None and route is not None
        base = HandshakeRequest(
            peer=str(self.peer),
            host=self._client_host or "",
            path=route.path,
            query={},
            headers=(),
            subprotocols=(),
            secure=bool(self._transport_details.is_secure),
        )
        try:
            accept = await refresh.verify(route.authenticators, token, base)
            try:
                revoked = self.factory.revocations.is_revoked(accept.principal)
            except ServiceUnavailable:  # a shared state store that cannot say
                raise RefreshRejected("unavailable", "state store unavailable") from None
            if revoked:
                # A revoked token is an invalid credential, as at the handshake.
                raise RefreshRejected("invalid", "token revoked")
        except RefreshRejected as rejection:
            if rejection.outcome == "invalid" and self._client_host is not None:
                factory = self.factory
                factory.admission.authentication_failed(self._client_host, factory.clock.seconds())
            self._refreshRejected(rejection, answer=False)
            raise
        if session.ended or self.state != self.STATE_OPEN:
            raise RefreshRejected("unavailable", "session closed during the refresh")
        principal = accept.principal
        if principal.consumer != session.consumer:
            self.factory.events.emit(
                events.SESSION_REFRESH_REJECTED,
                outcome="consumer_changed",
                reason="credential of another consumer",
                method=principal.method,
                id=session.id,
                **self._sessionFields(),
            )
            self.endSession(CloseCode.FORBIDDEN, "consumer changed", "")
            raise ConsumerChanged()
        session.principal = principal
        session.refresh(accept.expires_at)
        live: Any = self  # (the registry's Live: a whole server protocol)
        self.factory.registry.refreshed(live)
        self.factory.events.emit(
            events.SESSION_REFRESHED,
            outcome="refreshed",
            method=principal.method,
            expires_at=session.expires_at,
            id=session.id,
            **self._sessionFields(),
        )
        return session.expires_at

    def _refreshRejected(self, rejection: RefreshRejected, answer: bool = True) -> None:
        session = self.session
        self.factory.events.emit(
            events.SESSION_REFRESH_REJECTED,
            outcome=rejection.outcome,
            reason=rejection.detail,
            method=None,
            id=session.id if session else "",
            **self._sessionFields(),
        )
        if answer:
            self.sendMessage(refresh.rejected(rejection.reason))

    def _credentialsExpiring(self, expires_at: float) -> None:
        self.sendMessage(refresh.expiring(expires_at))
