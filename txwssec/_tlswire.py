"""
A leaner server TLS transport: Twisted's memory-BIO TLS protocol
(L{BufferingTLSTransport}) with its per-connection and per-read Python work
trimmed (issue 19, "Round 3: TLS and bulk" in bench/RESULTS.md).

Everything Twisted's protocol does is kept (it is the base class: ALPN,
C{getPeerCertificate}, half-close, C{loseConnection} ordering,
C{abortConnection}, producers, C{close_notify}); what changes is how often
it calls into OpenSSL and the kernel:

- C{makeConnection}: Twisted copies the TCP transport's interfaces onto the
  TLS protocol with one C{directlyProvides} per interface (about 10, each a
  new declaration lookup); the resulting declaration depends only on the
  two classes, so it is computed once and reused.
- the send BIO is read only when it holds bytes (Twisted asks and catches
  a C{WantReadError} on every flush), all of it at once, and once per
  application write (Twisted reads it after every 16 KiB record); the
  receive loop stops when OpenSSL has nothing buffered and the receive BIO
  is empty, instead of on a C{WantReadError}.
- what one read produces (handshake messages, session tickets, the
  answers the application wrote while handling the read, a close_notify)
  is sent at the end of that read, in one C{sendmsg} straight to the
  socket when the TCP transport has nothing queued (as the plain TCP path
  does, L{txwssec._wire.send_now}); Twisted writes each piece to the TCP
  transport, which sends it a reactor turn later (an epoll registration
  and its removal per piece), and holds the application's writes for one
  more turn (C{callLater(0)}). Writes made outside a read (timers) are
  aggregated as Twisted does. An aborted connection sends nothing more, as
  with Twisted (the TCP transport drops what is queued).
- the TCP transport reads 256 KiB per C{recv} (L{txwssec._wire.read_ahead}).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.main import CONNECTION_LOST
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.tcp import Server as TCPServer
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import (
    BufferingTLSTransport,
    TLSMemoryBIOFactory,
    TLSMemoryBIOProtocol,
    _representsEOF,
)
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from txwssec._wire import READ_SIZE, read_ahead, send_now, stop_read_ahead


def _bindings() -> tuple[Any, Any, Any]:
    """
    The binding pyOpenSSL itself uses (cryptography's): C{ffi}, and the
    functions that tell how many bytes a memory BIO holds and how many
    decrypted bytes OpenSSL has not handed out yet; L{None}s when this
    pyOpenSSL does not have them, or keeps its BIOs and C{SSL} under other
    names (checked on a connection made here), so that the transport falls
    back to Twisted's way of asking (a C{WantReadError}).
    """
    try:
        from OpenSSL._util import ffi, lib
        from OpenSSL.SSL import TLS_METHOD, Connection, Context

        probe = Connection(Context(TLS_METHOD), None)
        if lib.BIO_get_mem_data(probe._from_ssl, ffi.NULL) != 0 or lib.SSL_pending(probe._ssl):
            return None, None, None
        lib.BIO_get_mem_data(probe._into_ssl, ffi.NULL)
        return ffi, lib.BIO_get_mem_data, lib.SSL_pending
    except Exception:  # pragma: no cover - another pyOpenSSL
        return None, None, None


#: C{ffi}, bytes in a memory BIO, decrypted bytes not read yet (or L{None}s).
_ffi, _pending_out, _pending_in = _bindings()

#: Twisted's per-call sizes: a TLS record's payload, a read of the receive BIO.
_RECORD = 2**14
_RECV = 2**15
#: The most the encrypted bytes held while one read is handled may hold
#: (twice a read: the answers to one read still leave in one send).
_OUT_LIMIT = 2 * READ_SIZE
#: Twisted's aggregation threshold (L{twisted.protocols.tls._AggregateSmallWrites}).
_AGGREGATE = 64_000

#: The interface declaration Twisted's C{makeConnection} leaves on a TLS
#: protocol, per (protocol class, transport class).
_provides: dict[tuple[type, type], Any] = {}


class _Writes:
    """
    Twisted's C{_AggregateSmallWrites} (application writes joined and passed
    to TLS on the next reactor turn, or at once from 64,000 bytes), plus
    L{held}: while the protocol handles a read, writes wait for the end of
    that read instead of a C{callLater(0)}.
    """

    __slots__ = ("_buffer", "_clock", "_left", "_scheduled", "_write", "held")

    def __init__(self, write: Any, clock: Any) -> None:
        self._write = write
        self._clock = clock
        self._buffer: list[bytes] = []
        self._left = _AGGREGATE
        self._scheduled: Any = None
        self.held = False

    def write(self, data: bytes) -> None:
        self._buffer.append(data + b"")  # a TypeError now for non-bytes, as Twisted's
        self._left -= len(data)
        if self._left < 0:
            self.flush()
            return
        if self.held or self._scheduled is not None:
            return
        self._scheduled = self._clock.callLater(0, self._scheduledFlush)

    def _scheduledFlush(self) -> None:
        self._scheduled = None
        self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._left = _AGGREGATE
            chunks, self._buffer = self._buffer, []
            self._write(chunks)  # as one stream, not joined first (ServerTLSProtocol._write)

    def close(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
        self._scheduledFlush()


def _pieces(chunks: list[bytes]) -> Iterator[Any]:
    """
    The concatenation of C{chunks} in pieces of L{_RECORD} bytes (the last
    one shorter), as Twisted slices the joined data: a piece within one
    chunk is a memoryview of it (no copy), one across chunks is joined.
    """
    pending: list[Any] = []
    pending_size = 0
    for chunk in chunks:
        view = memoryview(chunk)
        size = len(view)
        at = 0
        if pending:
            at = min(_RECORD - pending_size, size)
            pending.append(view[:at])
            pending_size += at
            if pending_size < _RECORD:
                continue
            yield b"".join(pending)
            pending, pending_size = [], 0
        while size - at >= _RECORD:
            yield view[at : at + _RECORD]
            at += _RECORD
        if at < size:
            pending, pending_size = [view[at:]], size - at
    if pending:
        yield pending[0] if len(pending) == 1 else b"".join(pending)


class _NoWrites:
    """What writes go to once the connection is lost (Twisted's C{_NullAggregator})."""

    held = False

    def write(self, data: bytes) -> None:
        """Dropped."""

    def flush(self) -> None:
        """Nothing held."""

    def close(self) -> None:
        """Nothing held."""


class ServerTLSProtocol(BufferingTLSTransport):
    """
    Twisted's buffering memory-BIO TLS transport with the trims described
    in this module's docstring; used by every txwssec TLS listener
    (L{ServerTLSFactory}).
    """

    #: Encrypted bytes held while a read is handled (sent at its end).
    _out: list[bytes] | None = None
    #: The bytes L{_out} holds (from L{_OUT_LIMIT} on, they are sent).
    _out_size = 0
    _aggregator: Any

    def __init__(self, factory: Any, wrappedProtocol: Any, _connectWrapped: bool = True) -> None:
        TLSMemoryBIOProtocol.__init__(self, factory, wrappedProtocol, _connectWrapped)
        self._aggregator = _Writes(self._writeHeld, factory._clock)
        self.write = self._aggregator.write  # type: ignore[method-assign]

    def _writeHeld(self, chunks: list[bytes]) -> None:
        # TLSMemoryBIOProtocol.write, for the aggregated writes as one stream.
        if self.disconnecting and self._producer is None:
            return
        self._write(chunks)

    def writeSequence(self, iovec: Any) -> None:
        """
        Twisted's (the pieces aggregated as one write), without joining
        them first when they are all bytes.
        """
        chunks = list(iovec)
        if all(type(chunk) is bytes for chunk in chunks):
            for chunk in chunks:
                self._aggregator.write(chunk)
        else:
            self._aggregator.write(b"".join(chunks))

    def makeConnection(self, transport: Any) -> None:
        """
        Twisted's C{makeConnection}, with the transport's interfaces
        declared from a cache, and 256 KiB reads on a TCP transport.
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
        read_ahead(transport)
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            ProtocolWrapper.makeConnection(self, transport)
        self._checkHandshakeStatus()

    def dataReceived(self, data: bytes) -> None:
        """
        Twisted's C{dataReceived}; what it and the application write is sent
        at its end, in one go.
        """
        if self._out is not None:  # re-entered: the outer call sends
            TLSMemoryBIOProtocol.dataReceived(self, data)
            return
        out = self._out = []
        self._aggregator.held = True
        try:
            TLSMemoryBIOProtocol.dataReceived(self, data)
            self._aggregator.held = False
            self._aggregator.flush()
        finally:
            self._aggregator.held = False
            self._out = None
            self._out_size = 0
            if out:
                self._send(out)

    def _flushSendBIO(self) -> None:
        """
        Hand what OpenSSL wrote to the transport (held while a read is
        handled): all of it, and nothing is asked of an empty BIO.
        """
        connection = self._tlsConnection
        if _pending_out is not None:
            size = _pending_out(connection._from_ssl, _ffi.NULL)
            if size <= 0:
                return
            data = connection.bio_read(size)
        else:  # another pyOpenSSL: asked as Twisted does, until it has no more
            pieces: list[bytes] = []
            while True:
                try:
                    pieces.append(connection.bio_read(_RECV))
                except WantReadError:
                    break
            if not pieces:
                return
            data = b"".join(pieces)
        out = self._out
        if out is not None:
            out.append(data)
            self._out_size += len(data)
            if self._out_size > _OUT_LIMIT:
                # An application writing a lot while it handles one read:
                # the TCP transport's buffer, not this list, holds what the
                # peer does not read, and pauses the application's producer
                # when full (the route's max_buffered_bytes).
                self._release()
        else:
            self._send([data])

    def _send(self, chunks: list[bytes]) -> None:
        """
        Write C{chunks} to the TCP transport: at once to the socket when
        nothing is queued there (not after an abort: Twisted's TCP
        transport then drops what it was given).
        """
        transport: Any = self.transport
        if (
            type(transport) is TCPServer
            and not self._aborted
            and not transport.dataBuffer
            and not transport._tempDataLen
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
        ):
            chunks = send_now(transport.socket, chunks)
            if not chunks:
                return
        if len(chunks) == 1:
            transport.write(chunks[0])
        else:
            transport.writeSequence(chunks)

    def _release(self) -> None:
        """
        Send what is held now (the transport is about to be closed); the
        held list is emptied in place: L{dataReceived} sends what is added
        to it later, and nothing twice.
        """
        out = self._out
        self._out_size = 0
        if out:
            chunks = out[:]
            del out[:]
            self._send(chunks)

    def _flushReceiveBIO(self) -> None:
        """
        Twisted's C{_flushReceiveBIO}, which stops asking OpenSSL for data
        once it has none buffered and the receive BIO is empty (Twisted asks
        until a C{WantReadError}).
        """
        connection = self._tlsConnection
        while not self._lostTLSConnection:
            try:
                data = connection.recv(_RECV)
            except WantReadError:
                break
            except ZeroReturnError:
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
                connection = self._tlsConnection
                if (
                    _pending_out is not None
                    and connection is not None
                    and not _pending_in(connection._ssl)
                    and _pending_out(connection._into_ssl, _ffi.NULL) <= 0
                ):
                    break
        self._flushSendBIO()

    def _shutdownTLS(self) -> None:
        # Twisted's, with what is held sent before the TCP close.
        try:
            shutdownSuccess = self._tlsConnection.shutdown()
        except Error:
            shutdownSuccess = False
        self._flushSendBIO()
        if shutdownSuccess:
            self._release()
            transport: Any = self.transport
            transport.loseConnection()

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        # Twisted's, with what is held sent before the TCP close.
        if reason is not None and _representsEOF(reason.value):  # type: ignore[arg-type]
            reason = Failure(CONNECTION_LOST)
        if self._reason is None:
            self._reason = reason
        self._lostTLSConnection = True
        self._flushSendBIO()
        self._release()
        transport: Any = self.transport
        transport.loseConnection()

    def _write(self, bytes: Any) -> None:
        """
        Twisted's C{_write}: the data (bytes, or a list of bytes written as
        one stream) given to OpenSSL in pieces of 16 KiB (a record each), the
        rest buffered while OpenSSL wants to read; the pieces are slices of
        the data (no copy, but where a piece spans two chunks), and the send
        BIO is read once at the end instead of after every record.
        """
        if self._lostTLSConnection:
            return
        connection = self._tlsConnection
        pieces = _pieces(bytes if type(bytes) is list else [bytes])
        for piece in pieces:
            try:
                while piece:
                    sent = connection.send(piece)
                    piece = piece[sent:]
            except WantReadError:
                self._bufferedWrite(b"".join([piece, *pieces]))
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                return
        self._flushSendBIO()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Twisted's, with the transport's own reads restored."""
        stop_read_ahead(self.transport)
        self._aggregator.close()
        self._aggregator = _NoWrites()
        self.write = self._aggregator.write  # type: ignore[method-assign]
        TLSMemoryBIOProtocol.connectionLost(self, reason)


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
