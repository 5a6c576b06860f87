"""
Adjustments to Autobahn behaviour that txwssec relies on.

Close code 1014 (Bad Gateway) is in IANA's WebSocket close code registry and
is txwssec's "upstream failed" code (docs/guide.rst, "HTTP statuses and close codes"). Autobahn
26.10 accepts the registered 1012 and 1013 but not 1014, so an Autobahn peer
receiving it would call it a protocol error (1002) instead of reconnecting
with backoff. Autobahn checks the list through the class, so no subclass can
change it; the list itself is extended. The Autobahn TestSuite's invalid
close code cases (7.9.x) do not include 1014.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Any

from autobahn.util import encode_truncate
from autobahn.websocket.protocol import WebSocketProtocol
from OpenSSL import SSL
from twisted.python.failure import Failure

from txwssec._cycles import fire

BAD_GATEWAY = 1014


def allow_bad_gateway_close_code() -> None:
    """Let Autobahn accept close code 1014 from peers (idempotent)."""
    allowed = WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED
    if BAD_GATEWAY not in allowed:
        allowed.append(BAD_GATEWAY)


allow_bad_gateway_close_code()


def cancel_close_timer(protocol: Any) -> None:
    """
    Cancel a protocol's close-handshake timer when its connection is lost.
    Autobahn cancels every other per-connection timer then, but leaves this
    one to fire (harmlessly) up to the close timeout later.
    """
    call = getattr(protocol, "closeHandshakeTimeoutCall", None)
    if call is not None:
        call.cancel()
        protocol.closeHandshakeTimeoutCall = None


def copy_options(protocol: Any, names: Sequence[str]) -> None:
    """
    Copy the factory's protocol options onto a new connection as Autobahn's
    C{_connectionMade} does (an option already set on the instance or its
    class wins), without its debug line.

    Autobahn builds that line with C{pprint.pformat} of every option on
    every connection, eagerly, even when debug logging is off: about a tenth
    of a plain handshake's CPU. txwssec's protocols call this, then let
    Autobahn's own loop run over an empty C{CONFIG_ATTRS}.
    """
    factory = protocol.factory
    for name in names:
        if not hasattr(protocol, name):
            setattr(protocol, name, getattr(factory, name))


def copy_options_at_once(protocol: Any, names: Sequence[str]) -> None:
    """
    L{copy_options}, cheaper: the names its class does not set are found
    once per class, and the factory's values read in one
    C{operator.attrgetter} call; an option set on the instance still wins.
    """
    cls = type(protocol)
    found = _COPIERS.get(cls)
    if found is None or found[0] is not names:
        missing = tuple(name for name in names if not hasattr(cls, name))
        getter = attrgetter(*missing) if len(missing) > 1 else None
        found = _COPIERS[cls] = (names, missing, getter)
    _, missing, getter = found
    factory = protocol.factory
    if getter is None:
        copy_options(protocol, missing)  # one name or none
        return
    values = dict(zip(missing, getter(factory), strict=True))
    own = protocol.__dict__
    if not own.keys().isdisjoint(values):
        for name in own.keys() & values.keys():
            del values[name]
    own.update(values)


#: Per protocol class: the option names given, those its class does not set,
#: and a getter of their values.
_COPIERS: dict[type, tuple[Sequence[str], tuple[str, ...], Any]] = {}


def connection_lost_quietly(protocol: Any, reason: Failure, adapter: Any) -> None:
    """
    Autobahn's Twisted C{connectionLost} for C{protocol}, without its debug
    lines: it formats their arguments (C{hltype}, C{hlval}) before the level
    check, on every connection, then calls C{_connectionLost}, as this
    does. An OpenSSL failure still goes through C{adapter.connectionLost}
    (Autobahn's class), which logs it at "error".
    """
    if isinstance(reason.value, SSL.Error):
        adapter.connectionLost(protocol, reason)
    else:
        protocol._connectionLost(reason)


def drop_connection_quietly(protocol: Any, abort: bool) -> None:
    """
    Autobahn's C{dropConnection} without its log line: for a connection
    that did not close cleanly it writes a "warn" line ("dropping connection
    to peer ... with abort=False: handshake refused") on top of txwssec's
    own line for the same event (a refusal, a handshake timeout), which
    doubled the log's volume in a flood of refused handshakes.
    """
    protocol.unregisterProducer()
    if protocol.state != WebSocketProtocol.STATE_CLOSED:
        protocol.droppedByMe = True
        protocol.state = WebSocketProtocol.STATE_CLOSED
        fire(protocol, "is_closed", protocol)  # (txaio.resolve, made only if read)
        protocol._closeConnection(abort)


def fail_connection_quietly(protocol: Any, code: int, reason: str) -> None:
    """
    Autobahn's C{_fail_connection} without its "failing WebSocket connection"
    warn line: for a close txwssec has already told its observers about (a
    limit, a message rule), whose own log line says why.
    """
    if protocol.state == WebSocketProtocol.STATE_CLOSED:
        return
    protocol.failedByMe = True
    if protocol.failByDrop:
        protocol.wasClean = False
        protocol.wasNotCleanReason = f"I dropped the WebSocket TCP connection: {reason}"
        protocol.dropConnection(abort=True)
    elif protocol.state != WebSocketProtocol.STATE_CLOSING:
        protocol.sendCloseFrame(code=code, reasonUtf8=encode_truncate(reason, 123), isReply=False)
    else:
        protocol.dropConnection(abort=False)
