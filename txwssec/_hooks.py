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

L{OpenOnly} is the part both protocols share: the close with 1011
(C{_internalError}) and a C{sendMessage} that is a no-op to a connection
that is not open.
"""

from __future__ import annotations

from collections.abc import Callable
from inspect import iscoroutine
from typing import TYPE_CHECKING, Any, Protocol

from autobahn.twisted.util import extract_peer_certificate, transport_channel_id
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

from txwssec._wire import details_pending
from txwssec.errors import CloseCode


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
    Nothing while the details are still to be made (plain TCP, see
    L{txwssec._wire.details_later}): there is nothing of TLS to note.
    """
    if details_pending(protocol):
        return
    details = protocol._transport_details
    if details.is_secure:
        details.channel_id = {
            "tls-unique": transport_channel_id(protocol.transport, details.is_server, "tls-unique")
        }
        details.peer_cert = extract_peer_certificate(protocol.transport)


class OpenOnly:
    """
    What the server and client protocols share when they send or fail: a
    C{sendMessage} that does nothing to a connection that is not open, and
    the close after an error in the connection's own code (1011). Mixed in
    before Autobahn's protocol class.

    A protocol that transforms what it sends (sealed payloads,
    L{txwssec.messages.sealing}) sets C{_outgoing}: C{sendMessage} then
    sends C{_outgoing(payload, isBinary)} instead, or nothing when that is
    L{None} (not ready to send yet). Left at L{None}, a message costs one
    state check and this one attribute check.
    """

    #: Turns the application's message into the one sent, or L{None}.
    _outgoing: Callable[[bytes, bool], tuple[bytes, bool] | None] | None = None

    if TYPE_CHECKING:
        state: int
        STATE_OPEN: int
        STATE_CLOSED: int
        failedByMe: bool
        closeHandshakeTimeoutCall: Any

        def sendCloseFrame(
            self, code: int | None = None, reasonUtf8: bytes | None = None, isReply: bool = False
        ) -> None: ...

        def dropConnection(self, abort: bool = False) -> None: ...

    def sendMessage(
        self,
        payload: bytes,
        isBinary: bool = False,
        fragmentSize: int | None = None,
        sync: bool = False,
        doNotCompress: bool = False,
    ) -> bool:
        """
        Send a message, as Autobahn's C{sendMessage}, if the connection is
        open; to a peer that is closing or gone it is a no-op (Autobahn
        raises), so that sending to other sessions (a broadcast) is safe
        from any handler.

        @return: whether the message was sent: L{False} if the connection
            was not open, or was closed instead of sending it (a server's
            slow consumer).
        """
        if self.state != self.STATE_OPEN:
            return False
        outgoing = self._outgoing
        if outgoing is not None:
            sent = outgoing(payload, isBinary)
            if sent is None:
                return False
            payload, isBinary = sent
        protocol: Any = self
        WebSocketProtocol.sendMessage(
            protocol, payload, isBinary, fragmentSize, sync, doNotCompress
        )
        return self.state == self.STATE_OPEN

    def _internalError(self) -> None:
        """
        Close with 1011 after an error in this connection's code: the close
        handshake as for any close (nothing the peer sends after it reaches
        the application), or, before the connection opened or once it is
        closing, the TCP connection.
        """
        self.failedByMe = True
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(CloseCode.INTERNAL_ERROR, b"internal error")
        elif self.state != self.STATE_CLOSED and not self.closeHandshakeTimeoutCall:
            self.dropConnection(abort=True)
