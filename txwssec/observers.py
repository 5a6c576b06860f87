"""
The observers a server has from the start (see L{txwssec.events}): the
counters (L{CounterObserver}, the factory's C{counters}) and the text log
(L{TextLogObserver}, the lines of the "txwssec.server" and "txwssec.proxy"
namespaces). A JSON log and metrics will be observers like these.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from txwssec import events
from txwssec.logs import LevelCheckedLogger

#: txwssec's own server events (refusals, sessions, limits), with named
#: fields. Module-level so that the namespace stays "txwssec.server"
#: whatever class emits.
securityLog = LevelCheckedLogger(namespace="txwssec.server")

#: The gateway's own events (the namespace stays "txwssec.proxy").
gatewayLog = LevelCheckedLogger(namespace="txwssec.proxy")

#: The events the counters count once each under their own name.
_COUNTED = frozenset(
    {
        events.SESSION_OPENED,
        events.SESSION_EXPIRED,
        events.SESSION_REVOKED,
        events.SESSION_IDLE,
        events.APPLICATION_ERROR,
    }
)


def subclass_ignores(cls: type) -> frozenset[str]:
    """
    The C{ignores} (L{txwssec.events.Events.wants}) of a subclass of an
    observer: its own, when its class sets one; none, when it has its own
    C{__call__} (it may observe what its base ignores); else its base's.
    """
    own = vars(cls)
    if "ignores" in own:
        return frozenset(own["ignores"])
    if "__call__" in own:
        return frozenset()
    return frozenset(getattr(cls, "ignores", ()))


class CounterObserver:
    """
    Counts events by name in C{counters}: C{handshake.refused.<status>},
    C{session.opened}, C{session.expired|revoked|idle}, one C{limit.<name>}
    per limit that refused a handshake or closed a connection,
    C{application.error}, C{gateway.upstream_lost}, and one C{message.<rule>}
    per message refused by its route's rules (C{message.schema}...).
    """

    __slots__ = ("counters",)

    #: Events it counts nothing for (see L{txwssec.events.Events.wants}).
    ignores: frozenset[str] = frozenset({events.SESSION_CLOSED})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.ignores = subclass_ignores(cls)

    def __init__(self, counters: Counter[str]) -> None:
        self.counters = counters

    def __call__(self, event: str, fields: Mapping[str, Any]) -> None:
        counters = self.counters
        if event in _COUNTED or (event.startswith("session.") and event != events.SESSION_CLOSED):
            # (session.<event> for an application's own endSession events too)
            counters[event] += 1
        elif event == events.LIMIT_EXCEEDED:
            counters[fields["limit"]] += 1
        elif event == events.HANDSHAKE_REFUSED:
            counters[f"handshake.refused.{fields['status']}"] += 1
            limit = fields.get("limit")
            if limit:
                counters[limit] += 1
        elif event == events.UPSTREAM_LOST:
            counters["gateway.upstream_lost"] += 1
        elif event == events.MESSAGE_REFUSED:
            counters[f"message.{fields['rule']}"] += 1


def _session_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {"peer": fields["peer"], "route": fields["route"], "consumer": fields["consumer"]}


def _accepted(fields: Mapping[str, Any]) -> None:
    securityLog.info("accepted {peer} on {route} as {consumer} by {method}", **fields)


def _refused(fields: Mapping[str, Any]) -> None:
    securityLog.info(
        "refused {peer} on {route} with {status} ({method}): {reason}",
        peer=fields["peer"],
        route=fields["route"],
        path=fields["path"],
        status=fields["status"],
        # "-" for a refusal before (or without) an authentication method.
        method=fields["method"] or "-",
        reason=fields["reason"],
    )


def _pipeline_failed(fields: Mapping[str, Any]) -> None:
    securityLog.failure(
        "handshake pipeline failed for {peer}", fields["failure"], peer=fields["peer"]
    )


def _session_ended(event: str) -> Callable[[Mapping[str, Any]], None]:
    name = event.partition(".")[2]

    def log(fields: Mapping[str, Any]) -> None:
        securityLog.info(
            "session {event}: closing {peer} on {route} ({consumer}) with {code}",
            event=name,
            code=fields["code"],
            **_session_fields(fields),
        )

    return log


def _refreshed(fields: Mapping[str, Any]) -> None:
    securityLog.info(
        "session refreshed: {peer} on {route} ({consumer}) by {method} until {expires_at}",
        method=fields["method"],
        expires_at=fields["expires_at"],
        **_session_fields(fields),
    )


def _refresh_rejected(fields: Mapping[str, Any]) -> None:
    securityLog.info(
        "refresh rejected ({outcome}): {peer} on {route} ({consumer}): {reason}",
        outcome=fields["outcome"],
        reason=fields["reason"],
        **_session_fields(fields),
    )


def _ticket_issued(fields: Mapping[str, Any]) -> None:
    securityLog.info(
        "ticket issued to {peer} on {route} for {consumer} by {method} ({expires_in} s)",
        method=fields["method"],
        expires_in=fields["expires_in"],
        **_session_fields(fields),
    )


def _limit(fields: Mapping[str, Any]) -> None:
    limit = fields["limit"]
    if limit == "limit.handshake_timeout":
        securityLog.info("handshake timeout: dropping {peer}", peer=fields["peer"])
    elif limit == "limit.close_linger":
        securityLog.info("close timeout: resetting {peer}", peer=fields["peer"])
    else:
        securityLog.info(
            "limit {limit}: closing {peer} on {route} ({consumer}) with {code}",
            limit=limit,
            code=fields["code"],
            **_session_fields(fields),
        )


def _application_error(fields: Mapping[str, Any]) -> None:
    securityLog.failure(
        "error in {hook} on {route} for {peer}",
        fields["failure"],
        hook=fields["hook"],
        **_session_fields(fields),
    )


def _upstream_failed(fields: Mapping[str, Any]) -> None:
    if fields["kind"] == "timeout":
        gatewayLog.warn("upstream {url} timed out", url=fields["url"])
    else:
        gatewayLog.warn(
            "upstream {url} failed: {reason}", url=fields["url"], reason=fields["reason"]
        )


def _message_refused(fields: Mapping[str, Any]) -> None:
    securityLog.info(
        "message refused ({rule}, from {direction}): closing {peer} on {route} "
        "({consumer}) with {code}{detail}",
        rule=fields["rule"],
        direction=fields["direction"],
        code=fields["code"],
        detail=f": {fields['detail']}" if fields.get("detail") else "",
        **_session_fields(fields),
    )


def _upstream_wssec_dropped(fields: Mapping[str, Any]) -> None:
    gatewayLog.warn(
        "upstream of {peer} on {route} sent {kind}: not relayed (only the gateway sends those)",
        kind=fields["kind"],
        **_session_fields(fields),
    )


def _upstream_lost(fields: Mapping[str, Any]) -> None:
    gatewayLog.warn("upstream of {peer} went away", peer=fields["peer"])


def _reloaded(fields: Mapping[str, Any]) -> None:
    securityLog.info(
        "wssec configuration reloaded from {path}: {routes} routes, {consumers} consumers,"
        " {revoked} sessions revoked",
        **fields,
    )
    if fields["listen_changed"]:
        securityLog.warn(
            "wssec server.listen changed in {path}: listeners are unchanged until a restart",
            path=fields["path"],
        )


def _reload_failed(fields: Mapping[str, Any]) -> None:
    securityLog.error(
        "wssec configuration reload failed, keeping the old one: {path}: {error}", **fields
    )


class TextLogObserver:
    """
    The text log: one line per event that has one, with the format and the
    named fields the log has always had (the operator's greps keep working).
    """

    __slots__ = ()

    #: Event name -> what logs it.
    lines: Mapping[str, Callable[[Mapping[str, Any]], None]] = {
        events.HANDSHAKE_ACCEPTED: _accepted,
        events.HANDSHAKE_REFUSED: _refused,
        events.HANDSHAKE_ERROR: _pipeline_failed,
        events.SESSION_EXPIRED: _session_ended(events.SESSION_EXPIRED),
        events.SESSION_REVOKED: _session_ended(events.SESSION_REVOKED),
        events.SESSION_IDLE: _session_ended(events.SESSION_IDLE),
        events.SESSION_REFRESHED: _refreshed,
        events.SESSION_REFRESH_REJECTED: _refresh_rejected,
        events.TICKET_ISSUED: _ticket_issued,
        events.LIMIT_EXCEEDED: _limit,
        events.APPLICATION_ERROR: _application_error,
        events.UPSTREAM_FAILED: _upstream_failed,
        events.UPSTREAM_LOST: _upstream_lost,
        events.UPSTREAM_WSSEC_DROPPED: _upstream_wssec_dropped,
        events.MESSAGE_REFUSED: _message_refused,
        events.CONFIG_RELOADED: _reloaded,
        events.CONFIG_RELOAD_FAILED: _reload_failed,
    }

    #: Events it writes no line for (see L{txwssec.events.Events.wants}):
    #: C{session.closed}, unless a subclass's L{lines} has one for it.
    ignores: frozenset[str] = frozenset({events.SESSION_CLOSED})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.ignores = frozenset(event for event in subclass_ignores(cls) if event not in cls.lines)

    def __call__(self, event: str, fields: Mapping[str, Any]) -> None:
        line = self.lines.get(event)
        if line is not None:
            line(fields)
        elif event.startswith("session.") and "code" in fields and event != events.SESSION_CLOSED:
            # An application's own endSession event (session.closed, which
            # has a code too, has no text line).
            _session_ended(event)(fields)
