"""
What a server protocol needs of its factory (L{ServerContext}), named as an
interface so that the protocol modules do not import the factory's (which
imports them),.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime

from txwssec.admission import Admission
from txwssec.deadlines import Deadlines
from txwssec.events import Events
from txwssec.policy import RoutePolicy, ServerPolicy
from txwssec.revocations import Revocations
from txwssec.sessions import SessionRegistry


class ServerContext(Protocol):
    """
    The server factory as its protocols see it (implemented by
    L{txwssec.server.SecureServerFactory}).
    """

    policy: ServerPolicy
    clock: IReactorTime
    deadlines: Deadlines
    admission: Admission
    counters: Counter[str]
    #: The observers of this server's events (see L{txwssec.events}).
    events: Events
    #: The open sessions (see L{txwssec.sessions}).
    registry: SessionRegistry
    #: Revoked tokens (see L{txwssec.revocations}).
    revocations: Revocations
    countConnections: int
    #: The server stops: handshakes get 503 (see L{txwssec.lifecycle}).
    stopping: bool
    #: The gateway's upstream pools by route path (see L{txwssec.gateway}).
    upstreamPools: dict[str, Any]

    def protocolFor(self, route: RoutePolicy) -> type[Any] | None:
        """The protocol class serving C{route}, or L{None} for the default."""

    def sessionOpened(self, protocol: Any) -> None:
        """Track an open session."""

    def sessionClosed(self, protocol: Any) -> None:
        """Stop tracking a session."""

    def broadcast(
        self, payload: bytes, isBinary: bool = False, *, route: str | None = None
    ) -> int:
        """Send one message to every open session (of C{route})."""

    def openSessions(self, route: str | None = None) -> list[Any]:
        """The sessions open now (on C{route})."""

    def revoke(self, consumer: str) -> int:
        """Close every open session of C{consumer} with 3003."""
