"""
Application hooks under a guard.

Autobahn's Twisted protocols call C{onOpen}, C{onMessage}, C{onPing},
C{onPong} and C{onClose} bare: an exception escapes into the reactor, which
drops the connection without a close frame (C{onMessage}) or leaves it open
and silent (C{onOpen}), and a coroutine (C{async def}) returned by a hook is
never run. txwssec's protocols call their hooks through L{run_hook}
instead: a coroutine is run, and an exception, or a coroutine or
L{Deferred} that fails, goes to the protocol's C{_applicationFailed(hook,
failure)}, which logs it once and closes that connection (1011) only.
"""

from __future__ import annotations

from collections.abc import Callable
from inspect import iscoroutine
from typing import Any, Protocol

from autobahn.twisted.util import extract_peer_certificate, transport_channel_id
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure


class GuardedProtocol(Protocol):
    """What L{run_hook} needs of a protocol."""

    def _applicationFailed(self, hook: str, failure: Failure) -> None: ...


def run_hook(
    protocol: GuardedProtocol, hook: str, method: Callable[..., object], *args: Any
) -> None:
    """
    Call C{method(*args)}, the application's C{hook}; run what it returns
    if that is a coroutine; report an exception, or a coroutine or
    L{Deferred} that fails, to C{protocol._applicationFailed(hook, failure)}.
    """
    try:
        result = method(*args)
    except Exception:
        protocol._applicationFailed(hook, Failure())
        return
    if result is not None and (isinstance(result, Deferred) or iscoroutine(result)):
        waiting: Deferred[object] = ensureDeferred(result)
        waiting.addErrback(_failed_later, protocol, hook)


def _failed_later(failure: Failure, protocol: GuardedProtocol, hook: str) -> None:
    protocol._applicationFailed(hook, failure)


def transport_details(protocol: Any) -> None:
    """
    What Autobahn's Twisted C{_onOpen} does before it calls C{onOpen}: note
    the TLS channel binding and the peer certificate (complete only once
    the TLS handshake is), so that txwssec can call C{onOpen} itself.
    """
    details = protocol._transport_details
    if details.is_secure:
        details.channel_id = {
            "tls-unique": transport_channel_id(protocol.transport, details.is_server, "tls-unique")
        }
        details.peer_cert = extract_peer_certificate(protocol.transport)
