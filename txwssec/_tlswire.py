"""
A leaner server TLS transport: Twisted's memory-BIO TLS protocol
(L{BufferingTLSTransport}) with its per-connection interface declarations
computed once (issue 19, "Round 3: TLS and bulk" in bench/RESULTS.md).

Twisted's C{makeConnection} copies the TCP transport's interfaces onto the
TLS protocol with one C{directlyProvides} per interface (about 10, each a
new declaration lookup); the resulting declaration depends only on the two
classes, so it is computed once and reused. Everything else is Twisted's
(ALPN, C{getPeerCertificate}, half-close, C{loseConnection} ordering,
C{abortConnection}, producers, C{close_notify}, its buffered writes).

A first version also sent what one read produced in one C{sendmsg}, held
the application's writes until the end of the read and handed OpenSSL
16 KiB views instead of joined copies: 10% fewer instructions per full
handshake and 17% per 64 KiB echo over TLS, but 64 B echoes over TLS cost
about 20% more server CPU side by side (more, smaller sends), and most of
the handshake's gain came from the declarations alone (bench/RESULTS.md,
"Round 3: the TLS transport reduced"). Only that part is kept.

Round 4 (bench/RESULTS.md, "Round 4: wss handshake"): the calls into
OpenSSL on the paths every connection takes (the handshake steps, the
receive loop, the send BIO, the application's records) go to the cffi
binding pyOpenSSL itself calls, the way pyOpenSSL's methods do, but
without raising and catching a C{WantReadError} each time OpenSSL waits
for the peer (two per handshake, one per read, one per flush of an empty
send BIO) and without the wrapper's checks: every other outcome
(callback problems kept by pyOpenSSL, C{ZeroReturnError}, C{SysCallError},
C{Error}) goes through pyOpenSSL's own C{_raise_ssl_error} and is handled
as Twisted handles it. The send BIO is read only when it holds bytes, all
of them at once (Twisted reads at most 32 KiB per flush: the same bytes
in the same order to the TCP transport, which sends them on its next
turn, as before).

Sent at once (round 4): what happens once per connection goes straight to
the socket when the TCP transport holds nothing (L{write_at_once}),
instead of waiting for the transport's next turn (an C{epoll_ctl} to ask
for writability, a poll, the send, another C{epoll_ctl}): the server's
handshake flight, the session tickets and the application's first write
(its answer to the upgrade request: Twisted's aggregation still holds it
for one turn, and a write followed by an abort is still dropped), and
L{loseConnection}'s last records with the close_notify, in one send.
Every later write is Twisted's, aggregated and sent on the transport's
next turn: sending the echoes of an open connection at once was round
3's mistake (more, smaller sends under load).
"""

from __future__ import annotations

from types import MethodType
from typing import Any

from OpenSSL import SSL
from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IHandshakeListener, IListeningPort
from twisted.internet.main import CONNECTION_LOST
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import (
    BufferingTLSTransport,
    TLSMemoryBIOFactory,
    TLSMemoryBIOProtocol,
    _representsEOF,
)
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from txwssec._wire import lose_connection, read_ahead, stop_read_ahead, write_at_once

#: Twisted's sizes: a read of OpenSSL's plaintext, a record's payload.
_RECV = 2**15
_RECORD = 2**14


def _binding() -> tuple[Any, Any, Any] | None:
    """
    The cffi binding pyOpenSSL calls (cryptography's: its C{ffi}, C{lib},
    and an allocator that does not zero, as pyOpenSSL's), when this
    pyOpenSSL has the internals the direct calls mirror; else L{None}, and
    the transport calls pyOpenSSL's methods, as Twisted's does.
    """
    try:
        from OpenSSL._util import ffi, lib

        connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        context = connection._context
        helpers = (context._verify_helper, context._alpn_select_helper, context._ocsp_helper)
        usable = (
            helpers == (None, None, None)
            and SSL._CallbackExceptionHelper()._problems == []
            and callable(connection._raise_ssl_error)
            and callable(connection._handle_bio_errors)
            and all(
                lib.BIO_get_mem_data(bio, ffi.NULL) == 0
                for bio in (connection._into_ssl, connection._from_ssl)
            )
            and all(
                callable(getattr(lib, name))
                for name in ("SSL_do_handshake", "SSL_read", "SSL_write", "BIO_write", "BIO_read")
            )
            and lib.SSL_get_error(connection._ssl, 1) == lib.SSL_ERROR_NONE
        )
    except Exception:  # pragma: no cover - another pyOpenSSL
        return None
    if not usable:  # pragma: no cover - another pyOpenSSL
        return None
    return ffi, lib, ffi.new_allocator(should_clear_after_alloc=False)


_direct = _binding()
_ffi: Any
_lib: Any
_alloc: Any
_ffi, _lib, _alloc = _direct if _direct is not None else (None, None, None)
_WANT_READ: Any = _lib.SSL_ERROR_WANT_READ if _lib is not None else None


def _wants_read(connection: Any, ssl: Any, result: int) -> bool:
    """
    pyOpenSSL's C{Connection._raise_ssl_error(ssl, result)} (which its
    methods call after every OpenSSL call) without its C{WantReadError}:
    L{True} where it would raise that, L{False} where it returns. A problem
    kept by one of the context's callback helpers, and every other error,
    is raised by pyOpenSSL's own method.
    """
    context = connection._context
    helper = context._verify_helper
    if not (helper is not None and helper._problems):
        helper = context._alpn_select_helper
        if not (helper is not None and helper._problems):
            helper = context._ocsp_helper
            if not (helper is not None and helper._problems):
                if result > 0:
                    return False  # SSL_get_error: SSL_ERROR_NONE
                if _lib.SSL_get_error(ssl, result) == _WANT_READ:
                    return True
    try:
        connection._raise_ssl_error(ssl, result)
    except WantReadError:
        return True
    return False


def handshake_waits(connection: Any) -> bool:
    """
    One step of C{connection}'s handshake (C{SSL_do_handshake}): L{True}
    while OpenSSL waits for the peer, L{False} once it is done.

    @raise Error: the handshake failed (as pyOpenSSL raises it).
    """
    ssl = connection._ssl
    return _wants_read(connection, ssl, _lib.SSL_do_handshake(ssl))


def read_plain(connection: Any) -> bytes | None:
    """
    One C{SSL_read} of at most Twisted's read size: the plaintext, or
    L{None} while OpenSSL waits for the peer's records.

    @raise ZeroReturnError: the peer's close_notify.
    @raise Error: any other problem (as pyOpenSSL raises it).
    """
    ssl = connection._ssl
    buffer = _alloc("char[]", _RECV)
    result = _lib.SSL_read(ssl, buffer, _RECV)
    if _wants_read(connection, ssl, result):
        return None
    return _ffi.buffer(buffer, result)[:]  # type: ignore[no-any-return]


def pending_records(connection: Any) -> bytes | None:
    """
    All the records OpenSSL wrote to C{connection}'s send BIO, at once;
    L{None} when it holds none (nothing asked of an empty BIO).
    """
    bio = connection._from_ssl
    size = _lib.BIO_get_mem_data(bio, _ffi.NULL)
    if size <= 0:
        return None
    buffer = _alloc("char[]", size)
    size = _lib.BIO_read(bio, buffer, size)
    if size <= 0:  # pragma: no cover - OpenSSL said it had them
        return None
    return _ffi.buffer(buffer, size)[:]  # type: ignore[no-any-return]


#: The interface declaration Twisted's C{makeConnection} leaves on a TLS
#: protocol, per (protocol class, transport class).
_provides: dict[tuple[type, type], Any] = {}


class ServerTLSProtocol(BufferingTLSTransport):
    """
    Twisted's buffering memory-BIO TLS transport, whose C{makeConnection}
    declares the transport's interfaces from a cache, which calls OpenSSL
    directly on its hot paths and sends what happens once per connection
    at once (this module's docstring); used by every txwssec TLS listener
    (L{ServerTLSFactory}).
    """

    #: Until the application's first write has been encrypted: what
    #: OpenSSL writes goes to the socket at once when the TCP transport
    #: holds nothing (the handshake's flights, the session tickets, the
    #: first answer), instead of on the TCP transport's next turn.
    _atOnce = True

    def __init__(self, factory: Any, wrappedProtocol: Any, _connectWrapped: bool = True) -> None:
        BufferingTLSTransport.__init__(self, factory, wrappedProtocol, _connectWrapped)
        aggregator: Any = self._aggregator
        aggregator._write = self._writeFirst

    def _writeFirst(self, data: bytes) -> None:
        """
        Twisted's write of the aggregated writes (a reactor turn after them,
        as Twisted's), the first time: its records, one at most (a larger
        first write goes as Twisted's), go to the socket at once; the next
        writes are Twisted's.
        """
        aggregator: Any = self._aggregator
        aggregator._write = MethodType(TLSMemoryBIOProtocol.write, self)  # Twisted's
        if len(data) > _RECORD:
            self._atOnce = False
        TLSMemoryBIOProtocol.write(self, data)
        self._atOnce = False

    #: What OpenSSL writes while L{loseConnection} runs.
    _held: list[bytes] | None = None

    def loseConnection(self) -> None:
        """
        Twisted's; what it has OpenSSL write (the aggregated writes, the
        close_notify) goes to the socket at once, in one send, when the TCP
        transport holds nothing (Twisted: on the transport's next turn).
        Nothing after an abort (Twisted's transport drops it).
        """
        if self._held is not None:  # re-entered: the outer call sends
            BufferingTLSTransport.loseConnection(self)
            return
        # From now on the TCP transport's reads are read_ahead's (Twisted's
        # size), for the TCP close at the end of the read that brings the
        # client's close_notify (_loseTCP); undone in connectionLost. Not
        # sooner: it costs a little on every read.
        if self.connected and not self.disconnecting:
            read_ahead(self.transport, self.transport.bufferSize)  # type: ignore[union-attr]
        held: list[bytes] = []
        self._held = held
        try:
            self._writeNow()  # Twisted's flush, without a turn left scheduled
            BufferingTLSTransport.loseConnection(self)
        finally:
            self._held = None
        if held and not self._aborted:
            write_at_once(self.transport, held)

    def makeConnection(self, transport: Any) -> None:
        """
        Twisted's C{makeConnection}, with the transport's interfaces
        declared from a cache.
        """
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        key = (type(self), type(transport))
        cacheable = "__provides__" not in getattr(transport, "__dict__", {"__provides__": 1})
        if cacheable and key in _provides:
            declared = _provides[key]
            if declared is not None:
                self.__provides__ = declared
        else:
            for interface in providedBy(transport):
                directlyProvides(self, interface)
            if cacheable:
                _provides[key] = self.__dict__.get("__provides__")
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            ProtocolWrapper.makeConnection(self, transport)
        if _lib is None:  # pragma: no cover - another pyOpenSSL
            self._checkHandshakeStatus()
        # Twisted asks OpenSSL for a first handshake step here: a server
        # with no ClientHello yet writes nothing and wants to read, and
        # the first bytes received take that step (dataReceived).

    def _loseTCP(self) -> None:
        """
        The TCP connection's orderly close once TLS is done with it (both
        close_notify exchanged, or an error): L{lose_connection} when the
        TCP transport holds nothing (closed at the end of the read being
        handled, without Twisted's wait for a writable socket: two
        C{epoll_ctl}, an event, an empty C{send}), else Twisted's
        C{loseConnection}.
        """
        transport: Any = self.transport
        if not lose_connection(transport):
            transport.loseConnection()

    def _shutdownTLS(self) -> None:
        """Twisted's: send (or answer) the close_notify; both done: close TCP."""
        try:
            done = self._tlsConnection.shutdown()
        except Error:
            # (Twisted's: mid-handshake OpenSSL may want to read first)
            done = False
        self._flushSendBIO()
        if done:
            self._loseTCP()

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        """
        Twisted's: TLS is gone (C{reason}: why, or L{None} for the TCP
        transport's reason); its last alert sent, then TCP closed.
        """
        if reason is not None and _representsEOF(reason.value):  # type: ignore[arg-type]
            # an EOF in violation of TLS: ConnectionLost, as Twisted's
            reason = Failure(CONNECTION_LOST)
        if self._reason is None:
            self._reason = reason
        self._lostTLSConnection = True
        self._flushSendBIO()
        self._loseTCP()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Twisted's; the TCP transport's L{read_ahead} forgotten."""
        try:
            BufferingTLSTransport.connectionLost(self, reason)
        finally:
            stop_read_ahead(self.transport)

    def _checkHandshakeStatus(self) -> None:
        """Twisted's: a handshake step, its output to the transport."""
        if _lib is None:  # pragma: no cover - another pyOpenSSL
            TLSMemoryBIOProtocol._checkHandshakeStatus(self)
            return
        if self._aborted:
            return
        try:
            waiting = handshake_waits(self._tlsConnection)
        except Error:
            self._tlsShutdownFinished(Failure())
            return
        if waiting:
            self._flushSendBIO()
            return
        self._handshakeDone = True
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def _flushSendBIO(self) -> None:
        """
        Twisted's: what OpenSSL wrote, to the transport; nothing asked of an
        empty send BIO, and all it holds at once.
        """
        if _lib is None:  # pragma: no cover - another pyOpenSSL
            TLSMemoryBIOProtocol._flushSendBIO(self)
            return
        data = pending_records(self._tlsConnection)
        if data is not None:
            held = self._held
            if held is not None:
                held.append(data)
            elif self._atOnce and not self._aborted:
                write_at_once(self.transport, [data])
            else:
                transport: Any = self.transport
                transport.write(data)

    def _flushReceiveBIO(self) -> None:
        """Twisted's: the plaintext OpenSSL has, to the application."""
        if _lib is None:  # pragma: no cover - another pyOpenSSL
            TLSMemoryBIOProtocol._flushReceiveBIO(self)
            return
        while not self._lostTLSConnection:
            try:
                data = read_plain(self._tlsConnection)
            except ZeroReturnError:
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if data is None:
                    break
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
        if self._atOnce:
            self._writeNow()
        self._flushSendBIO()

    # What ProtocolWrapper's __getattr__ finds on the TCP transport, found
    # without its miss (an AttributeError and a Python call each): the
    # calls every connection makes on its TLS transport.

    def setTcpNoDelay(self, enabled: bool) -> None:
        """The TCP transport's."""
        transport: Any = self.transport
        transport.setTcpNoDelay(enabled)

    def pauseProducing(self) -> None:
        """The TCP transport's."""
        transport: Any = self.transport
        transport.pauseProducing()

    def resumeProducing(self) -> None:
        """The TCP transport's."""
        transport: Any = self.transport
        transport.resumeProducing()

    @property
    def __conform__(self) -> Any:
        """
        The TCP transport's, if it has one (Twisted's has none): asked by
        zope.interface whenever the TLS protocol is adapted, as Twisted's
        TCP transport does at the client's FIN (C{readConnectionLost}).
        """
        return getattr(self.transport, "__conform__", None)

    def _writeNow(self) -> None:
        """
        What the aggregator holds, written now instead of on the next
        reactor turn (its C{callLater(0)} cancelled): the application's
        first write, made while this read was handled (its answer to the
        upgrade request), leaves with the session tickets. A write followed
        by an abort or a lost TLS connection is dropped, as Twisted's
        aggregated write then is.
        """
        aggregator: Any = self._aggregator
        scheduled = getattr(aggregator, "_scheduled", None)
        if scheduled is not None:
            scheduled.cancel()
            aggregator._scheduled = None
            aggregator.flush()

    def dataReceived(self, data: bytes) -> None:
        """Twisted's: the bytes to OpenSSL, then the handshake or the plaintext."""
        connection = self._tlsConnection
        if _lib is None or type(data) is not bytes:
            connection.bio_write(data)
        else:
            bio = connection._into_ssl
            result = _lib.BIO_write(bio, data, len(data))
            if result <= 0:
                connection._handle_bio_errors(bio, result)
        if not self._handshakeDone:
            self._checkHandshakeStatus()
            if not self._handshakeDone:
                return
        if self._appSendBuffer:
            self._unbufferPendingWrites()
        self._flushReceiveBIO()

    def _write(self, data: Any) -> None:
        """
        Twisted's: the application's bytes to OpenSSL, one record of 16 KiB
        at most per call, each record to the transport; held while OpenSSL
        waits for the peer.
        """
        if _lib is None or type(data) is not bytes:
            TLSMemoryBIOProtocol._write(self, data)
            return
        if self._lostTLSConnection:
            return
        sent = 0
        while sent < len(data):
            piece = data[sent : sent + _RECORD]
            connection = self._tlsConnection
            ssl = connection._ssl
            result = _lib.SSL_write(ssl, piece, len(piece))
            try:
                waiting = _wants_read(connection, ssl, result)
            except Error:
                self._tlsShutdownFinished(Failure())
                break
            if waiting:
                self._bufferedWrite(data[sent:])
                break
            sent += result
            self._flushSendBIO()


class ServerTLSFactory(TLSMemoryBIOFactory):
    """Twisted's TLS factory for servers, with L{ServerTLSProtocol}."""

    protocol = ServerTLSProtocol


class TLSPortEndpoint(SSL4ServerEndpoint):
    """
    Twisted's C{SSL4ServerEndpoint} (the same arguments and attributes) whose
    connections get L{ServerTLSProtocol}: C{reactor.listenSSL} does
    C{listenTCP} with Twisted's TLS factory, this with L{ServerTLSFactory}.
    """

    def listen(self, protocolFactory: Any) -> Any:
        """Listen for TLS on TCP."""
        from twisted.internet import defer

        def listen() -> IListeningPort:
            port = self._reactor.listenTCP(
                self._port,
                ServerTLSFactory(self._sslContextFactory, False, protocolFactory),
                backlog=self._backlog,
                interface=self._interface,
            )
            port._type = "TLS"
            return port  # type: ignore[no-any-return]

        return defer.execute(listen)
