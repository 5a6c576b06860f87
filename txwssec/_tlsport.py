"""
A server TLS transport in one object (issue 19, round 6: "Round 6: wss
handshake" in bench/RESULTS.md): Twisted's TCP server transport
(C{tcp.Server}) that is its own memory-BIO TLS layer, instead of a TCP
transport carrying Twisted's TLS protocol (L{txwssec._tlswire}'s
L{ServerTLSProtocol}, a C{ProtocolWrapper}) carrying the application's.

Per read event the work is the same as the two-layer transport's with
the layers' costs taken out: the bytes the socket gives go to OpenSSL's
receive BIO, the handshake or the plaintext is handled, and what OpenSSL
wrote is sent, without the TCP transport's call into a wrapping protocol,
the wrapper's forwarding (C{__getattr__}, C{ProtocolWrapper}), the
aggregator's C{callLater(0)} per write batch and the TCP transport's
second buffering of the records. The application's writes are gathered
as Twisted's aggregator gathers them (joined, 64 KB at most before they
are encrypted at once) but encrypted when the socket is writable (the
TCP transport's own next turn) instead of on a timed call before it.

OpenSSL still works on memory BIOs, as in Twisted's transport: the same
C{recv} of up to 64 KiB per read, the same records and the same sends
(the handshake flight, the tickets with the first answer, the last
records with the close_notify, at once when nothing is buffered, as
L{txwssec._tlswire} sends them). A socket BIO (OpenSSL reading the socket
itself, C{SSL_set_fd}) was measured first and left: cryptography's
binding has no C{SSL_set_read_ahead}, so OpenSSL reads each record in two
C{recv} calls (its header, then its body) and one more that finds nothing,
13 reads and 6 writes per handshake instead of 4 and 3.

Everything else is Twisted's memory-BIO transport's, step for step (the
methods below name theirs): the handshake and its errors (an OpenSSL
error is the application's C{connectionLost} reason before the handshake
completes; an EOF in violation of TLS is C{ConnectionLost}), writes held
while OpenSSL waits for the peer, C{loseConnection} (an abort before the
handshake completes; else the close_notify once the writes and a
registered producer are done, then the TCP close when the peer's
close_notify or its FIN comes), C{abortConnection}, producers (Twisted's
C{_ProducerMembrane} and C{_PullToPush}), C{getPeerCertificate},
C{negotiatedProtocol} (ALPN), C{getHandle}. The connection is made by
Twisted's own creator (L{ServerTLSFactory}'s): the same context per
connection (certificate reloads), ALPN, client certificate checks,
session tickets. Its C{__class__} says it is a L{TLSMemoryBIOProtocol}
too, so that Autobahn's TLS helpers (its transport details, the channel
binding: C{isinstance} checks) read it as they read Twisted's. (Not by
inheriting: C{ProtocolWrapper}'s C{__getattr__} would keep CPython from
specialising any attribute lookup on the transport, about 2% of a
handshake's instructions.)

Used by L{TLSPortEndpoint} (C{tls:PORT} and C{wss:} listeners), their
shared form for C{[server] workers} (L{txwssec.reuseport.SharedTLSPort})
and C{tls:systemd:} listeners on a TCP socket (L{DirectTLSPort.adopt})
for txwssec's WebSocket protocols (L{FrameReader}), when this pyOpenSSL
has the internals it mirrors (L{txwssec._tlswire}'s check); any other
protocol on such a listener, and other TLS listeners (Twisted's C{ssl:},
systemd's UNIX sockets), keep L{ServerTLSProtocol}. Differential tests:
tests/test_tls_port_direct.py, tests/test_tls_workers_direct.py.
"""

from __future__ import annotations

import socket
from errno import ENOBUFS, EWOULDBLOCK
from typing import Any

from OpenSSL.SSL import Error, ZeroReturnError
from twisted.internet import abstract, defer, error, tcp
from twisted.internet._producer_helpers import _PullToPush
from twisted.internet.interfaces import (
    IHandshakeListener,
    IListeningPort,
    INegotiated,
    ISSLTransport,
)
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.protocols.tls import (
    TLSMemoryBIOProtocol,
    _ProducerMembrane,
    _representsEOF,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from txwssec import _tlswire
from txwssec._tcpport import LeanPort, server_transport, set_server_state, takes_constructor
from txwssec._tlswire import (
    ServerTLSFactory,
    ServerTLSProtocol,
    handshake_waits,
    pending_records,
    read_plain,
)
from txwssec._wire import FrameReader, send_now

#: Twisted's sizes: a record's payload, the aggregator's most before it
#: encrypts at once.
_RECORD = 2**14
_GATHER = 64_000

_FileDescriptor = abstract.FileDescriptor
_new = object.__new__


#: Whether L{TLSPortEndpoint} listens with L{DirectTLSPort} (L{False}:
#: L{ServerTLSProtocol} everywhere, as before; tests compare the two).
DIRECT = True


def usable() -> bool:
    """Whether this pyOpenSSL has what the transport calls directly."""
    return _tlswire._lib is not None


def direct() -> bool:
    """Whether listeners that can use L{DirectTLSPort} do (L{DIRECT} and L{usable})."""
    return DIRECT and usable()


@implementer(ISSLTransport, INegotiated)
class DirectTLSServer(tcp.Server):
    """
    A TCP server connection that is its own TLS layer (this module's
    docstring). The buffers of Twisted's C{FileDescriptor} hold records;
    the application's plaintext waits in C{_plain} until the socket is
    writable (or 64 KB are gathered, or the connection closes).
    """

    #: TLS-level close asked (C{disconnecting}, as Twisted's TLS protocol's)
    #: is not the TCP close: this is.
    _tcpClosing = False
    #: Inside L{doRead}: a TCP close is left to its end.
    _reading = False
    #: The TCP close is to be done at the end of the read.
    _closeInRead = False
    #: What OpenSSL writes while L{loseConnection} runs (sent in one send).
    _held: list[bytes] | None = None
    #: Until the application's first write has been encrypted: records go
    #: to the socket at once when nothing is buffered (L{_tlswire}).
    _atOnce = True

    # Twisted's TLS protocol's state (TLSMemoryBIOProtocol).
    _reason: Failure | None = None
    _handshakeDone = False
    _lostTLSConnection = False
    _producer: Any = None
    _producerPaused = False
    _aborted = False

    def __init__(
        self, sock: Any, protocol: Any, client: Any, server: Any, sessionno: int, reactor: Any
    ) -> None:
        tcp.Server.__init__(self, sock, protocol, client, server, sessionno, reactor)
        self._startTLS(server)

    def _startTLS(self, server: Any) -> None:
        """The TLS layer's state, after C{tcp.Server}'s."""
        self._tlsConnection: Any = server.factory._creatorCallable(self)
        self._appSendBuffer: list[bytes] = []
        self._plain: list[bytes] = []
        self._plainLeft = _GATHER

    def _getLogPrefix(self, applicationObject: object) -> str:
        prefix = tcp.Server._getLogPrefix(self, applicationObject)
        return f"{prefix}{_TLS_SUFFIX}"

    # -- what the application sees --------------------------------------------

    def getHandle(self) -> Any:
        """The C{OpenSSL.SSL.Connection} (Twisted's TLS protocol's)."""
        return self._tlsConnection

    def getPeerCertificate(self) -> Any:
        """The peer's certificate (Twisted's TLS protocol's)."""
        return self._tlsConnection.get_peer_certificate()

    @property
    def negotiatedProtocol(self) -> bytes | None:
        """Twisted's TLS protocol's: the ALPN protocol, or L{None}."""
        connection = self._tlsConnection
        if connection is None:
            return None
        name: bytes | None = connection.get_alpn_proto_negotiated()
        return name or None

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        """
        L{DirectTLSServer} as a Twisted TLS protocol: Autobahn's TLS helpers
        (its transport details, the channel binding) know Twisted's by
        C{isinstance(transport, TLSMemoryBIOProtocol)}, which then asks for
        C{__class__}. (Not a base class: C{ProtocolWrapper}'s C{__getattr__}
        would slow down every attribute lookup of the transport.)
        """
        return _AsTLSProtocol

    # -- reads ----------------------------------------------------------------

    def doRead(self) -> Any:
        """
        The TCP transport's read, then Twisted's TLS protocol's
        C{dataReceived} with what it read; a TCP close the TLS layer asks
        for on the way is done at the end (as L{txwssec._wire.read_ahead}).
        """
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as se:
            if se.args[0] == EWOULDBLOCK:
                return None
            return CONNECTION_LOST
        if not data:
            return CONNECTION_DONE
        self._reading = True
        try:
            self._received(data)
        finally:
            self._reading = False
        if self._closeInRead:
            self._closeInRead = False
            if self.dataBuffer or self._tempDataLen:
                self._loseTCPLater()
            else:
                return CONNECTION_DONE
        if self._plain and self.connected:
            # what the read had the application write: encrypted and sent
            # on the next writable event, gathered as Twisted gathers a
            # turn's writes
            self.startWriting()
        return None

    def _received(self, data: bytes) -> None:
        """Twisted's C{TLSMemoryBIOProtocol.dataReceived} (as _tlswire's)."""
        connection = self._tlsConnection
        bio = connection._into_ssl
        lib = _tlswire._lib
        result = lib.BIO_write(bio, data, len(data))
        if result <= 0:
            connection._handle_bio_errors(bio, result)
        if not self._handshakeDone:
            self._checkHandshakeStatus()
            if not self._handshakeDone:
                return
        if self._appSendBuffer:
            self._unbufferPendingWrites()
        self._flushReceiveBIO()

    def _checkHandshakeStatus(self) -> None:
        """Twisted's: a handshake step, its output sent."""
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
        protocol = self.protocol
        if IHandshakeListener.providedBy(protocol):
            protocol.handshakeCompleted()

    def _flushReceiveBIO(self) -> None:
        """Twisted's: the plaintext OpenSSL has, to the application."""
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
                    self.protocol.dataReceived(data)
        if self._atOnce and self._plain:
            self._encryptPlain()
        self._flushSendBIO()

    # -- records out ----------------------------------------------------------

    def _flushSendBIO(self) -> None:
        """
        Twisted's: what OpenSSL wrote, to the socket: at once while
        L{_atOnce} and nothing is buffered, else buffered for the next
        writable event; nothing once aborted or lost.
        """
        data = pending_records(self._tlsConnection)
        if data is None:
            return
        held = self._held
        if held is not None:
            held.append(data)
        elif self._aborted or not self.connected:
            return
        elif not self._atOnce:
            _FileDescriptor.write(self, data)
        elif self.dataBuffer or self._tempDataLen or self._writeDisconnected or self._tcpClosing:
            _FileDescriptor.write(self, data)
        else:
            # at once (as L{send_now} sends one chunk)
            try:
                sent = self.socket.send(data)
            except OSError as se:
                if se.args[0] not in (EWOULDBLOCK, ENOBUFS):
                    # Twisted's write meets the error and closes
                    _FileDescriptor.write(self, data)
                    return
                sent = 0
            if sent < len(data):
                _FileDescriptor.write(self, data[sent:])

    def _sendAtOnce(self, chunks: list[bytes]) -> None:
        """
        C{chunks} sent now when nothing is buffered (L{send_now}), the rest
        (or all, else) buffered as Twisted's TCP transport buffers.
        """
        if (
            not self.dataBuffer
            and not self._tempDataLen
            and not self._writeDisconnected
            and not self._tcpClosing
        ):
            chunks = send_now(self.socket, chunks)
            if not chunks:
                return
        _FileDescriptor.writeSequence(self, chunks)

    # -- the application's writes ---------------------------------------------

    def write(self, data: bytes) -> None:
        """
        Twisted's C{BufferingTLSTransport.write}: gathered (up to 64 KB,
        then encrypted at once), encrypted when the socket is writable.
        """
        if not self.connected:
            return
        self._plain.append(data + b"")
        self._plainLeft -= len(data)
        if self._plainLeft < 0:
            self._encryptPlain()
            return
        if not self._reading:
            self.startWriting()  # else at the end of the read (doRead)

    def writeSequence(self, iovec: Any) -> None:
        """Twisted's: joined, then L{write} (the server's 101 comes this way)."""
        self.write(b"".join(iovec))

    def _encryptPlain(self) -> None:
        """The gathered writes to OpenSSL (the aggregator's C{flush})."""
        plain = self._plain
        if plain:
            self._plainLeft = _GATHER
            data = b"".join(plain)
            del plain[:]
            if self.disconnecting and self._producer is None:
                return  # TLSMemoryBIOProtocol.write: dropped after loseConnection
            if self._atOnce and len(data) > _RECORD:
                self._atOnce = False
            self._write(data)
            self._atOnce = False

    def _write(self, data: bytes) -> None:
        """Twisted's: to OpenSSL a record at most per call, each sent."""
        if self._lostTLSConnection:
            return
        lib = _tlswire._lib
        sent = 0
        while sent < len(data):
            piece = data[sent : sent + _RECORD]
            connection = self._tlsConnection
            ssl = connection._ssl
            result = lib.SSL_write(ssl, piece, len(piece))
            try:
                waiting = _tlswire._wants_read(connection, ssl, result)
            except Error:
                self._tlsShutdownFinished(Failure())
                break
            if waiting:
                self._bufferedWrite(data[sent:])
                break
            sent += result
            self._flushSendBIO()

    def doWrite(self) -> Any:
        """The gathered writes encrypted, then Twisted's TCP write."""
        if self._plain:
            self._atOnce = False  # buffered, and sent by this write event
            self._encryptPlain()
        return tcp.Server.doWrite(self)

    def _postLoseConnection(self) -> Any:
        """The TCP close once written, when the TLS layer asked for it."""
        if self._tcpClosing:
            return CONNECTION_DONE
        return None

    # -- closing ----------------------------------------------------------------

    def loseConnection(self) -> None:
        """
        Twisted's C{BufferingTLSTransport.loseConnection} (the gathered
        writes encrypted first); what it has OpenSSL write goes in one send,
        at once when nothing is buffered (as L{txwssec._tlswire}'s).
        """
        if self._held is not None:  # re-entered: the outer call sends
            self._loseTLS()
            return
        held: list[bytes] = []
        self._held = held
        try:
            self._encryptPlain()
            self._loseTLS()
        finally:
            self._held = None
        if held and not self._aborted and self.connected:
            self._sendAtOnce(held)

    def _loseTLS(self) -> None:
        """Twisted's C{TLSMemoryBIOProtocol.loseConnection}."""
        if self.disconnecting or not self.connected:
            return
        if not self._handshakeDone and not self._appSendBuffer:
            self.abortConnection()
        self.disconnecting = True
        if not self._appSendBuffer and self._producer is None:
            self._shutdownTLS()

    def abortConnection(self) -> None:
        """Twisted's: no more data either way, the TCP connection reset."""
        self._aborted = True
        self.disconnecting = True
        self._shutdownTLS()
        tcp.Server.abortConnection(self)

    def _shutdownTLS(self) -> None:
        """Twisted's: send (or answer) the close_notify; both done: close TCP."""
        try:
            done = self._tlsConnection.shutdown()
        except Error:
            done = False
        self._flushSendBIO()
        if done:
            self._loseTCP()

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        """Twisted's: TLS is gone; its last alert sent, then TCP closed."""
        if reason is not None and _representsEOF(reason.value):  # type: ignore[arg-type]
            reason = Failure(CONNECTION_LOST)
        if self._reason is None:
            self._reason = reason
        self._lostTLSConnection = True
        self._flushSendBIO()
        self._loseTCP()

    def _loseTCP(self) -> None:
        """
        The TCP transport's C{loseConnection}: at the end of the read being
        handled when nothing is buffered then, else once written.
        """
        if self._tcpClosing or self._aborted or not self.connected:
            return
        if self._reading:
            self._closeInRead = True
            return
        self._loseTCPLater()

    def _loseTCPLater(self) -> None:
        """Twisted's C{FileDescriptor.loseConnection}, for the TCP close."""
        if self._tcpClosing or not self.connected:
            return
        self._tcpClosing = True
        self.disconnecting = True  # (FileDescriptor.doWrite then closes)
        if self._writeDisconnected:
            self.stopReading()
            self.stopWriting()
            self.connectionLost(Failure(CONNECTION_DONE))
        else:
            self.stopReading()
            self.startWriting()

    def readConnectionLost(self, reason: Failure) -> None:
        """The peer's FIN ends the connection (Twisted's TLS protocol is not half-closeable)."""
        self.connectionLost(reason)

    def connectionLost(self, reason: Failure) -> None:
        """
        Twisted's TCP C{connectionLost} with its TLS protocol's in it: the
        socket closed, then what OpenSSL still has delivered (the receive
        BIO at its end), then the application's C{connectionLost} with the
        TLS layer's reason if it had one.
        """
        if not hasattr(self, "socket"):
            return
        _FileDescriptor.connectionLost(self, reason)
        self._closeSocket(not reason.check(error.ConnectionAborted))
        del self._plain[:]
        if not self._lostTLSConnection:
            self._tlsConnection.bio_shutdown()
            self._flushReceiveBIO()
            self._lostTLSConnection = True
        reason = self._reason or reason
        self._reason = None
        protocol = self.protocol
        del self.protocol
        del self.socket
        del self.fileno
        protocol.connectionLost(reason)
        self._tlsConnection = None

    def _bufferedWrite(self, octets: bytes) -> None:
        """Twisted's: held until OpenSSL has read; a producer paused."""
        self._appSendBuffer.append(octets)
        if self._producer is not None:
            self._producer.pauseProducing()

    def _unbufferPendingWrites(self) -> None:
        """Twisted's: the held writes to OpenSSL again."""
        pendingWrites, self._appSendBuffer = self._appSendBuffer, []
        for eachWrite in pendingWrites:
            self._write(eachWrite)
        if self._appSendBuffer:
            return
        if self._producer is not None:
            self._producer.resumeProducing()
            return
        if self.disconnecting:
            self._shutdownTLS()

    # -- producers (Twisted's TLS protocol's, the TCP transport being this) ----

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Twisted's C{TLSMemoryBIOProtocol.registerProducer}."""
        if self._lostTLSConnection:
            producer.stopProducing()
            return
        if not streaming:
            producer = streamingProducer = _PullToPush(producer, self)
        producer = _ProducerMembrane(producer)
        _FileDescriptor.registerProducer(self, producer, True)
        self._producer = producer
        if not streaming:
            streamingProducer.startStreaming()

    def unregisterProducer(self) -> None:
        """Twisted's C{TLSMemoryBIOProtocol.unregisterProducer}."""
        if self._producer is None:
            return
        if isinstance(self._producer._producer, _PullToPush):
            self._producer._producer.stopStreaming()
        self._producer = None
        self._producerPaused = False
        self.producer = None
        if self.connected and self._tcpClosing:
            self.startWriting()  # the TCP transport's: its close, once written
        if self.disconnecting and not self._appSendBuffer:
            self._shutdownTLS()

    def resumeProducing(self) -> None:
        """The TCP transport's: reading again, unless closing TCP."""
        if self.connected and not self._tcpClosing:
            self.startReading()

    def stopProducing(self) -> None:
        """The TCP transport's (the two-layer transport forwards it): TCP closed."""
        self._loseTCPLater()

    def loseWriteConnection(self) -> None:
        """
        The TCP transport's half-close (the two-layer transport forwards it
        to its TCP transport): a FIN once what was written is sent, no
        close_notify.
        """
        self._encryptPlain()
        _FileDescriptor.loseWriteConnection(self)

    def _closeWriteConnection(self) -> None:
        """
        The TCP transport's, whose protocol (Twisted's TLS protocol) is not
        half-closeable: the application is not told.
        """
        try:
            self.socket.shutdown(1)
        except OSError:
            pass


#: The application protocols that get a L{DirectTLSServer} (tests add theirs).
DIRECT_PROTOCOLS: tuple[type, ...] = (FrameReader,)


def _protocol(factory: Any, wrapped: Any) -> Any:
    """
    The protocol of an accepted connection, as the port's factory (Twisted's
    TLS factory, L{ServerTLSFactory}) builds it from the application's: the
    application's protocol itself when it is a txwssec WebSocket protocol
    (L{FrameReader}: it reads its transport details through
    L{txwssec._wire}, which knows L{DirectTLSServer}), else wrapped in
    L{ServerTLSProtocol} as before (Autobahn's own protocols read the
    details with Autobahn's helpers, which know Twisted's TLS protocol by
    its class).
    """
    if isinstance(wrapped, DIRECT_PROTOCOLS):
        return wrapped
    return ServerTLSProtocol(factory, wrapped)


#: What a L{DirectTLSServer}'s log prefix adds to its protocol's: the
#: two-layer transport's TCP transport logs as "<protocol>
#: (ServerTLSProtocol)" (C{ProtocolWrapper}'s prefix); kept, for the log
#: lines' "system".
_TLS_SUFFIX = " (ServerTLSProtocol)"


def _transport(
    sock: Any, protocol: Any, client: Any, server: Any, sessionno: int, reactor: Any
) -> tcp.Server:
    """The transport of an accepted connection (L{_protocol})."""
    if isinstance(protocol, ServerTLSProtocol):
        return tcp.Server(sock, protocol, client, server, sessionno, reactor)
    return DirectTLSServer(sock, protocol, client, server, sessionno, reactor)


def _lean_transport(
    skt: Any, protocol: Any, addr: Any, port: Any, session: int, reactor: Any
) -> tcp.Server:
    """
    L{_transport}C{(skt, protocol, addr, port, session, reactor)} for
    L{DirectTLSPort}'s accept loop, with less when the protocol's log
    prefix is its class name (as L{txwssec._tcpport.server_transport}).
    """
    if isinstance(protocol, ServerTLSProtocol):
        return server_transport(skt, protocol, addr, port, session, reactor)
    if takes_constructor(protocol, reactor):
        # a log prefix of the protocol's own: Twisted's constructor
        return DirectTLSServer(skt, protocol, addr, port, session, reactor)
    # DirectTLSServer(...): tcp.Server.__init__'s state, then the TLS state.
    transport: DirectTLSServer = _new(DirectTLSServer)
    set_server_state(transport, skt, protocol, addr, port, session, reactor, _TLS_SUFFIX)
    transport._startTLS(port)
    return transport


class DirectTLSPort(LeanPort):
    """
    A TCP port whose txwssec WebSocket connections are L{DirectTLSServer}s
    (and any other protocol's Twisted's TCP transport with
    L{ServerTLSProtocol}, as C{listenTCP} with L{ServerTLSFactory} gives).
    It accepts as L{LeanPort} (the same accept loop, Twisted's for any
    accept error) and sets a L{DirectTLSServer}'s C{tcp.Server} state at
    once when its protocol's log prefix is its class name, as the plain
    TCP listeners do (L{txwssec._tcpport.server_transport}).
    """

    transport = staticmethod(_transport)  # type: ignore[assignment]
    _leanFor = staticmethod(_transport)
    _lean = staticmethod(_lean_transport)
    #: Twisted's loop logs an accept error under this class's name.
    _acceptNamespace = None
    _type = "TLS"

    def __init__(
        self,
        port: int,
        factory: Any,
        backlog: int,
        interface: str,
        reactor: Any,
        contextFactory: Any,
    ) -> None:
        tls = ServerTLSFactory(contextFactory, False, factory)
        tls.protocol = _protocol  # type: ignore[assignment]
        tcp.Port.__init__(self, port, tls, backlog, interface, reactor)

    @classmethod
    def adopt(
        cls, reactor: Any, fileno: int, family: int, factory: Any, contextFactory: Any
    ) -> DirectTLSPort:
        """
        A port on a listening TCP socket made elsewhere (systemd's), as
        Twisted's C{reactor.adoptStreamPort} makes its own (C{tcp.Port}'s
        C{_fromListeningDescriptor}): C{fileno} duplicated, listening.
        """
        sock = socket.fromfd(fileno, family, cls.socketType)
        port = cls(
            None,  # type: ignore[arg-type]  # Twisted's adopted ports have none
            factory,
            None,  # type: ignore[arg-type]
            tcp._getsockname(sock)[0],
            reactor,
            contextFactory,
        )
        port._preexistingSocket = sock
        port.startListening()
        return port


class _AsTLSProtocol(DirectTLSServer, TLSMemoryBIOProtocol):  # type: ignore[misc]
    """What a L{DirectTLSServer} says its class is (never made)."""

    def __init__(self) -> None:  # pragma: no cover - never called
        raise TypeError("not to be made")


class TLSPortEndpoint(_tlswire.TLSPortEndpoint):
    """
    L{txwssec._tlswire.TLSPortEndpoint} (Twisted's C{SSL4ServerEndpoint},
    the same arguments and attributes) listening with L{DirectTLSPort}
    when L{DIRECT} and L{usable}, else as before.
    """

    def listen(self, protocolFactory: Any) -> Any:
        """Listen for TLS on TCP."""
        if not direct():
            return super().listen(protocolFactory)

        def listen() -> IListeningPort:
            port = DirectTLSPort(
                self._port,
                protocolFactory,
                self._backlog,
                self._interface,
                self._reactor,
                self._sslContextFactory,
            )
            port.startListening()
            return port

        return defer.execute(listen)
