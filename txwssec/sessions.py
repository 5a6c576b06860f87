"""
The session registry: a server's open sessions by id, consumer and route.

Owned by the server factory (L{txwssec.server.SecureServerFactory.registry}),
fed by its protocols when a session opens and when its connection ends, and
used by everything that acts on live sessions: revocation, broadcast, and
later reload and the admin API. It holds the protocols themselves, so it is
per process; what must be seen across processes is the store's session
list (L{txwssec.store}), which it keeps: one record per open session.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from itertools import chain, count
from typing import Any, Protocol

from txwssec.policy import RoutePolicy
from txwssec.session import Session
from txwssec.store import StateStore


class Live(Protocol):
    """What the registry holds: a server protocol with an open session."""

    session: Session | None
    route: RoutePolicy | None
    peer: str
    state: int
    STATE_OPEN: int

    def revoke(self) -> None:
        """Close the session with 3003."""

    def sendMessage(
        self,
        payload: bytes,
        isBinary: bool = False,
        fragmentSize: int | None = None,
        sync: bool = False,
        doNotCompress: bool = False,
    ) -> bool:
        """Send a message if the connection is open."""


class SessionRegistry:
    """
    The open sessions of one server, indexed by id, consumer and route.
    Indexes hold only live sessions: an entry goes when its last session
    does, so memory follows open connections.

    @ivar by_consumer: consumer name -> its sessions (the factory's
        C{sessions}).
    """

    def __init__(self, store: StateStore | None = None) -> None:
        self.store = store
        self.by_consumer: dict[str, set[Live]] = {}
        self._by_route: dict[str, set[Live]] = {}
        self._by_id: dict[str, Live] = {}
        # Ids unique across processes and restarts: a random prefix per
        # registry, then a counter.
        self._prefix = secrets.token_hex(4)
        self._ids = count(1)

    def add(self, protocol: Live, now: float) -> str:
        """
        Track C{protocol}'s open session (opened at C{now}); give it an id
        and return it. The store's session list gets its record.
        """
        session = protocol.session
        assert session is not None
        session.id = session_id = f"{self._prefix}-{next(self._ids):x}"
        session.opened_at = now
        self._by_id[session_id] = protocol
        self.by_consumer.setdefault(session.consumer, set()).add(protocol)
        self._by_route.setdefault(session.route, set()).add(protocol)
        if self.store is not None:
            self.store.add_session(session_id, record(protocol, session, now))
        return session_id

    def refreshed(self, protocol: Live) -> None:
        """C{protocol}'s session was refreshed: its record gets the new expiry and method."""
        session = protocol.session
        if session is not None and session.id in self._by_id and self.store is not None:
            self.store.add_session(session.id, record(protocol, session, session.opened_at))

    def remove(self, protocol: Live) -> None:
        """Stop tracking C{protocol}'s session (its connection ended)."""
        session = protocol.session
        assert session is not None
        if self._by_id.pop(session.id, None) is not None and self.store is not None:
            self.store.remove_session(session.id)
        indexes = ((self.by_consumer, session.consumer), (self._by_route, session.route))
        for index, key in indexes:
            live = index.get(key)
            if live is not None:
                live.discard(protocol)
                if not live:
                    del index[key]

    def get(self, session_id: str) -> Live | None:
        """The session with id C{session_id}, if it is tracked."""
        return self._by_id.get(session_id)

    def of_consumer(self, consumer: str) -> list[Live]:
        """C{consumer}'s tracked sessions (a new list)."""
        return list(self.by_consumer.get(consumer, ()))

    def open(self, route: str | None = None, *, gateways: bool = True) -> list[Live]:
        """
        The sessions that are open now (not closing), on C{route} (a path)
        or on every route: a new list, so that sessions may close while the
        caller goes through it.

        @param gateways: include gateway sessions (a broadcast leaves them
            out: their messages come from their upstream; a stop or a reload
            does not).
        """
        live: Iterable[Live] = (
            self._by_route.get(route, ())
            if route is not None
            else chain.from_iterable(self._by_route.values())
        )
        return [
            protocol
            for protocol in live
            if protocol.state == protocol.STATE_OPEN
            and (gateways or protocol.route is None or protocol.route.upstream is None)
        ]

    def revoke(self, consumer: str | None = None, session_id: str | None = None) -> int:
        """
        Close with 3003 every tracked session of C{consumer}, or the one
        with id C{session_id}.

        @return: how many sessions were closed.
        """
        if session_id is not None:
            one = self._by_id.get(session_id)
            live = [one] if one is not None else []
        else:
            live = self.of_consumer(consumer) if consumer is not None else []
        for protocol in live:
            protocol.revoke()
        return len(live)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Live]:
        return iter(list(self._by_id.values()))


def record(protocol: Live, session: Session, now: float) -> dict[str, Any]:
    """
    The store's record of an open session: what the admin API lists (id,
    consumer, route, method, peer, opened_at, expires_at).
    """
    return {
        "id": session.id,
        "consumer": session.consumer,
        "route": session.route,
        "method": session.principal.method,
        "peer": protocol.peer,
        "opened_at": now,
        "expires_at": session.expires_at,
    }
