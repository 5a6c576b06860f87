"""
The observation seam: security and traffic events, each emitted once where
it happens, in one shape (a name from L{EVENTS} and named fields), to every
observer of the server (L{Events}): the text log and the counters now
(L{txwssec.observers}), a JSON log, metrics and tests later.

Adding an event is one line where it happens::

    factory.events.emit(events.SESSION_REFRESHED, route=..., consumer=...)

plus its entry in L{EVENTS} (and, when the text log or the counters should
show it, a line in L{txwssec.observers}).

Events are for what happens rarely (a handshake, a session's end, a limit
exceeded): nothing is emitted per frame or per message. Per-message figures
are counters read from the connection when it ends.

Field values are bounded where the peer chose them (see
L{txwssec.logs.bounded}); no credential is ever a field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

#: A handshake was accepted (before the 101 is sent): peer, route, consumer,
#: method, expires_at.
HANDSHAKE_ACCEPTED = "handshake.accepted"
#: A handshake was refused: peer, route, path, status, method, reason, and
#: limit (the limit that refused it, or L{None}).
HANDSHAKE_REFUSED = "handshake.refused"
#: The handshake pipeline itself failed (500): peer, failure.
HANDSHAKE_ERROR = "handshake.error"
#: A session opened (the 101 was sent): peer, route, consumer, id, method,
#: expires_at.
SESSION_OPENED = "session.opened"
#: txwssec ends a session: peer, route, consumer, code; one of these three.
SESSION_EXPIRED = "session.expired"
SESSION_REVOKED = "session.revoked"
SESSION_IDLE = "session.idle"
#: A session was refreshed in-band (see L{txwssec.refresh}): peer, route,
#: consumer, id, method, expires_at, outcome ("refreshed").
SESSION_REFRESHED = "session.refreshed"
#: A refresh left the session as it was, or (outcome "consumer_changed")
#: closed it with 3003: peer, route, consumer, id, method, reason (for the
#: operator), outcome (C{too_large}, C{malformed}, C{rate_limited},
#: C{invalid}, C{forbidden}, C{unavailable}, C{consumer_changed}).
SESSION_REFRESH_REJECTED = "session.refresh_rejected"
#: A one-time ticket was issued (see L{txwssec.tickets}): peer, route,
#: consumer, method, expires_in. Never the ticket.
TICKET_ISSUED = "ticket.issued"
#: A session's connection ended, however: peer, route, consumer, id, method,
#: and how (see L{txwssec._ends}): code, initiator, duration_s, messages_in,
#: messages_out, bytes_in, bytes_out.
SESSION_CLOSED = "session.closed"
#: A limit closed a connection or dropped one in its handshake: limit (the
#: counter name, C{limit.<name>}), peer, and for an open session route,
#: consumer and code.
LIMIT_EXCEEDED = "limit.exceeded"
#: An application hook failed (the connection closes 1011, except in
#: C{onClose}): hook, failure, peer, route, consumer.
APPLICATION_ERROR = "application.error"
#: A gateway's upstream could not be used for a handshake: url, kind
#: (C{timeout} or C{refused}), reason.
UPSTREAM_FAILED = "upstream.failed"
#: A gateway session's upstream went away first: peer.
UPSTREAM_LOST = "upstream.lost"
#: A gateway's upstream sent a txwssec control message (C{wssec.expiring}...)
#: on a route with C{refresh = true}; it was dropped (the first of a
#: session is told): kind (its type), peer, route, consumer.
UPSTREAM_WSSEC_DROPPED = "upstream.wssec_dropped"
#: A message broke its route's message rules and closed the connection:
#: rule (C{binary}, C{text}, C{json}, C{depth}, C{schema}), direction
#: (C{client}, or C{upstream} on a gateway), code, detail, peer, route,
#: consumer.
MESSAGE_REFUSED = "message.refused"

#: The configuration file was reloaded and applied (SIGHUP, see
#: L{txwssec.lifecycle}): path, routes, consumers, revoked (sessions closed
#: 3003), listen_changed (listeners differ: a restart applies them).
CONFIG_RELOADED = "config.reloaded"
#: A reload found the file invalid; the old configuration stays: path,
#: error (naming the key path).
CONFIG_RELOAD_FAILED = "config.reload_failed"

#: The event list: every name emitted, and what it means.
EVENTS: Mapping[str, str] = {
    HANDSHAKE_ACCEPTED: "a handshake was accepted",
    HANDSHAKE_REFUSED: "a handshake was refused",
    HANDSHAKE_ERROR: "the handshake pipeline failed",
    SESSION_OPENED: "a session opened",
    SESSION_EXPIRED: "a session's credentials expired",
    SESSION_REVOKED: "a session's credentials were revoked",
    SESSION_IDLE: "a session was idle too long",
    SESSION_REFRESHED: "a session was refreshed in-band",
    SESSION_REFRESH_REJECTED: "an in-band refresh was rejected",
    TICKET_ISSUED: "a one-time ticket was issued",
    SESSION_CLOSED: "a session's connection ended",
    LIMIT_EXCEEDED: "a limit closed or dropped a connection",
    APPLICATION_ERROR: "an application hook failed",
    UPSTREAM_FAILED: "an upstream failed a gateway handshake",
    UPSTREAM_LOST: "a gateway session's upstream went away",
    UPSTREAM_WSSEC_DROPPED: "an upstream's txwssec control message was not relayed",
    MESSAGE_REFUSED: "a message broke its route's message rules",
    CONFIG_RELOADED: "the configuration file was reloaded",
    CONFIG_RELOAD_FAILED: "a configuration reload failed; the old one stays",
}


class Observer(Protocol):
    """
    Something told of every event: C{observer(name, fields)}. An observer
    may list the events it does nothing with in an C{ignores} attribute
    (see L{Events.wants}).
    """

    def __call__(self, event: str, fields: Mapping[str, Any]) -> None:
        """Observe C{event} with its C{fields} (do not keep the mapping)."""


class Events:
    """
    A server's observers, and the one way to tell them: L{emit}.

    An observer that raises is not protected against: observers are
    txwssec's own or a test's, and must not fail.
    """

    __slots__ = ("observers",)

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self.observers: list[Observer] = list(observers)

    def emit(self, event: str, **fields: Any) -> None:
        """Tell every observer that C{event} happened, with C{fields}."""
        for observer in self.observers:
            observer(event, fields)

    def wants(self, event: str) -> bool:
        """
        Whether some observer may do something with C{event}: one without
        an C{ignores} attribute, or whose C{ignores} does not list it. A
        caller may then leave out an event nobody wants, and the work of
        its fields.
        """
        for observer in self.observers:
            if event not in getattr(observer, "ignores", _NOTHING_IGNORED):
                return True
        return False

    def add(self, observer: Observer) -> None:
        """Add C{observer} (last)."""
        self.observers.append(observer)

    def remove(self, observer: Observer) -> None:
        """Remove C{observer}."""
        self.observers.remove(observer)


#: What an observer without an C{ignores} attribute ignores.
_NOTHING_IGNORED: frozenset[str] = frozenset()
