"""
The upstream leg's TCP connection, with fewer system calls than Twisted's
(issue 19, bench/RESULTS.md "Round 4: gateway handshake").

Twisted's TCP client (C{twisted.internet.tcp.Client}) makes its socket
non-blocking twice (C{FIONBIO} in C{createInternetSocket} and again in
C{Connection.__init__}), calls C{connect()} twice and reads C{SO_ERROR}
twice (before the first C{connect}, and when the socket is writable), and
asks the reactor for both reading and writing while it connects, then
stops both and starts reading again: five C{epoll_ctl} (add, modify,
modify, delete, add). Its connection's close calls C{shutdown()} before
C{close()}, also when the peer had closed first.

L{LeanClient} is that client with: a socket made non-blocking when it is
created (C{SOCK_NONBLOCK}: no C{ioctl}); one C{connect()}, made at once
(not after a C{callLater(0)}); C{SO_ERROR} read once, when the socket is
reported writable (or the reactor reports it failed); write interest only
while connecting (three C{epoll_ctl}: add, and two modifies or a delete
and an add once connected); and no C{shutdown()} when the peer closed
first (checked once, in C{connectionLost}: the close is orderly already
and every byte was read, so C{close()} alone sends the same FIN).
Everything else is Twisted's: the L{Connector} (its timeout, its
C{connectionFailed}), the bind to a source address, IPv6 literals and
scope identifiers, the errors a failed connection reports
(C{getConnectError} of the socket's error, as Twisted's C{doConnect}),
and name resolution for a host that is not an IP literal.

L{lean_tcp_endpoint} returns an endpoint making these, for an IP literal
on a reactor whose C{connectTCP} is Twisted's POSIX one; L{None} for
anything else (the caller then uses its usual endpoint).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from errno import EALREADY, EINPROGRESS, EISCONN, EWOULDBLOCK
from os import strerror
from typing import Any

from twisted.internet import abstract, defer, error, tcp
from twisted.internet.endpoints import _WrappingFactory
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.posixbase import PosixReactorBase
from twisted.python.failure import Failure
from zope.interface import implementer

from txwssec._wire import writes_as_plain_tcp

#: Linux's flag making a socket non-blocking from its creation (0 elsewhere:
#: then C{setblocking(False)} as Twisted does).
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
_SO_ERROR = socket.SO_ERROR
_SOL_SOCKET = socket.SOL_SOCKET


@writes_as_plain_tcp
class LeanClient(tcp.Client):
    """
    Twisted's TCP client transport with fewer system calls (see the
    module's docstring); same states, same outcomes.
    """

    #: C{connect()} was called and returned "in progress": the next
    #: C{doConnect} (the socket is writable) reads C{SO_ERROR} for the outcome.
    _connecting = False
    #: The protocol expects the peer to close now (L{endExpected}): what
    #: to call if it has not.
    _endExpected: Callable[[], object] | None = None

    def createInternetSocket(self) -> socket.socket:
        if not _NONBLOCK:
            return super().createInternetSocket()  # type: ignore[no-any-return]
        return socket.socket(self.addressFamily, self.socketType | _NONBLOCK)

    def _finishInit(self, whenDone: Any, skt: Any, error: Any, reactor: Any) -> None:
        if not whenDone:
            super()._finishInit(whenDone, skt, error, reactor)
            return
        # Connection.__init__ but for its setblocking(False), which makes a
        # system call even on a socket made non-blocking already.
        abstract.FileDescriptor.__init__(self, reactor=reactor)
        self.socket = skt
        if skt.gettimeout() != 0.0:
            skt.setblocking(False)
        self.fileno = skt.fileno
        self.protocol = None  # type: ignore[assignment]  # (as Twisted's: none yet)
        # Started by LeanConnector.connect once the connector is set up
        # (Twisted's client waits for a callLater(0) and the next turn).
        self._start = whenDone

    def resolveAddress(self) -> None:
        if self._requiresResolution:
            super().resolveAddress()
            return
        # An IP literal: Twisted's succeeded Deferred and its two callbacks,
        # without the Deferred.
        try:
            self._setRealAddress(self.addr)
        except BaseException:
            self.failIfNotConnected(Failure())

    def doConnect(self) -> None:
        self.doWrite = self.doConnect  # type: ignore[method-assign]  # (as Twisted's)
        self.doRead = self.doConnect  # type: ignore[method-assign]
        if not hasattr(self, "connector"):
            # the attempt failed, or was stopped, before this call
            return
        if self._connecting:
            # Reported writable (or readable, or failed): the outcome.
            err = self.socket.getsockopt(_SOL_SOCKET, _SO_ERROR)
            if err:
                self.failIfNotConnected(error.getConnectError((err, strerror(err))))
                return
        else:
            try:
                result = self.socket.connect_ex(self.realAddress)
            except OSError as failed:
                result = failed.args[0]
            if result and result != EISCONN:
                if result in (EWOULDBLOCK, EINPROGRESS, EALREADY):
                    self._connecting = True
                    self.startWriting()
                    return
                self.failIfNotConnected(error.getConnectError((result, strerror(result))))
                return
        del self.doWrite
        del self.doRead
        self.stopWriting()
        self._connectDone()

    def endExpected(self, otherwise: Callable[[], object]) -> None:
        """
        The protocol expects the peer's close (its FIN) right behind what
        it is reading (a WebSocket server's close frame answering the
        client's: the server then drops the connection): once this read is
        processed, the socket is read once more, which finds the peer's
        end when it has come already, handled then as on the next event
        (the same C{recv}, the same reactor handling of its outcome), not
        after one more C{epoll_wait} and reactor event. When it has not
        come, that C{recv} finds nothing (C{EAGAIN}) and the reactor
        reports the socket readable later, as before; C{otherwise} is then
        called (the protocol's timer for a peer that does not close), once
        this read is done.
        """
        self._endExpected = otherwise

    def doRead(self) -> Any:
        why = super().doRead()
        otherwise = self._endExpected
        if otherwise is not None:
            self._endExpected = None
            if why is None and self.connected and not self.disconnecting:
                why = super().doRead()
            if why is None:
                otherwise()
        return why

    def _connectDone(self) -> None:
        # Twisted's (the protocol built, reading started, makeConnection);
        # then, for a LeanTCPEndpoint's connection (_Connecting), the
        # endpoint's Deferred fired with the protocol, where Twisted's
        # _WrappingProtocol fires it once its wrapped protocol's
        # makeConnection has returned (not if it raised).
        factory = self.connector.factory
        super()._connectDone()
        if type(factory) is _Connecting:
            connected = factory._onConnection
            if not connected.called:  # (else buildProtocol failed: errback'd)
                connected.callback(self.protocol)

    def connectionLost(self, reason: Failure) -> None:
        if not self.connected and self._connecting and hasattr(self, "connector"):
            # The reactor saw the socket fail while connecting (epoll's
            # EPOLLERR/EPOLLHUP without EPOLLIN, which Twisted asked for and
            # this client does not): the socket's own error, as Twisted's
            # doConnect reports it.
            err = self.socket.getsockopt(_SOL_SOCKET, _SO_ERROR)
            if err:
                self.failIfNotConnected(error.getConnectError((err, strerror(err))))
                return
        if self.connected and not self.disconnecting and reason.check(error.ConnectionDone):
            # The peer closed first (its EOF was read, or it hung up with
            # nothing left to read; this side did not call loseConnection):
            # close() alone sends the same FIN as shutdown() then close().
            self._shouldShutdown = False
        super().connectionLost(reason)


class LeanConnector(tcp.Connector):
    """Twisted's TCP L{tcp.Connector}, making a L{LeanClient}."""

    def _makeTransport(self) -> LeanClient:
        return LeanClient(self.host, self.port, self.bindAddress, self, self.reactor)

    def connect(self) -> None:
        """
        Twisted's C{connect} (the factory started, the transport made, the
        timeout set, C{startedConnecting}), then the transport's connection
        attempt at once: C{connect()} returns "in progress", and the
        outcome comes from the reactor as before. (A transport that could
        not be made fails on the next turn, as Twisted's.)
        """
        super().connect()
        transport: Any = self.transport
        start = getattr(transport, "_start", None)
        if start is not None:
            del transport._start
            start()


class _Connecting(_WrappingFactory):
    """
    Twisted's C{_WrappingFactory} (its L{Deferred}, its cancelling, its
    failures) without its C{_WrappingProtocol}: the transport is connected
    to the factory's protocol itself, and L{LeanClient._connectDone} fires
    the L{Deferred}. The wrapper passed each C{dataReceived} and
    C{connectionLost} on, and found for each connection which of three
    interfaces its protocol provides (the transport asks the protocol
    itself now, with the same answers).
    """

    def buildProtocol(self, addr: Any) -> Any:
        try:
            protocol = self._wrappedFactory.buildProtocol(addr)
            if protocol is None:
                raise error.NoProtocol()
        except BaseException:
            self._onConnection.errback()
            return None
        return protocol


@implementer(IStreamClientEndpoint)
class LeanTCPEndpoint:
    """
    Twisted's C{TCP4ClientEndpoint} / C{TCP6ClientEndpoint} (same
    arguments, same L{Deferred}), connecting with a L{LeanConnector}
    instead of the reactor's C{connectTCP}.
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        timeout: float | None = 30,
        bindAddress: Any = None,
    ) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._timeout = timeout
        self._bindAddress = bindAddress

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[Any]:
        try:
            wf = _Connecting(protocolFactory)
            # (a timeout of None: no timer; Twisted's BaseConnector allows it)
            LeanConnector(
                self._host,
                self._port,
                wf,
                self._timeout,  # type: ignore[arg-type]
                self._bindAddress,
                self._reactor,
            ).connect()
            return wf._onConnection
        except BaseException:
            return defer.fail()


def lean_tcp_endpoint(
    reactor: Any, host: str, port: int, timeout: float | None = 30, bindAddress: Any = None
) -> LeanTCPEndpoint | None:
    """
    A L{LeanTCPEndpoint} to C{host} (an IPv4 or IPv6 literal) on
    C{reactor}, when the reactor's C{connectTCP} is Twisted's POSIX one
    (epoll, poll, select, asyncio); L{None} otherwise (a name to resolve,
    another reactor, a test's fake).
    """
    if not (abstract.isIPAddress(host) or abstract.isIPv6Address(host)):
        return None
    if getattr(type(reactor), "connectTCP", None) is not PosixReactorBase.connectTCP:
        return None
    return LeanTCPEndpoint(reactor, host, port, timeout, bindAddress)
