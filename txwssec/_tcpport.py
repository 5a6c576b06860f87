"""
A leaner plain TCP listener: Twisted's C{tcp.Port}, whose accept loop
builds each connection's C{tcp.Server} transport with less (issue 19,
"Round 4: server handshake" in bench/RESULTS.md).

Per accepted connection, Twisted's C{Port.doRead} makes two C{Logger}
objects (its C{_logger} descriptor, read twice) and a C{_BuffersLogs}
context for the errors it might log, runs a generator over C{socket.accept}
(which converts the listening socket's family and type to enums each
time), and C{Server.__init__} goes through three constructors and a
C{zope.interface} check for the log prefix. L{LeanPort} accepts with the
socket's C{_accept} and fills in the same transport attributes at once:
the same C{tcp.Server}, in the same state, the same calls to the factory
and the protocol, the same syscalls.

Anything unusual is Twisted's: an accept error other than "nothing to
accept" (C{EMFILE} and its reserved descriptor, C{ENOBUFS}, C{EPERM}...)
is handed, as it happened, to Twisted's own accept loop and logging; a
port whose C{transport} is not C{tcp.Server}, a reactor whose
C{listenTCP} is not Twisted's POSIX one, an IPv6 scope or a protocol with
its own log prefix take Twisted's code for that step.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from errno import EAGAIN, EWOULDBLOCK
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred, execute
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Protocol
from twisted.python import log
from twisted.python.runtime import platformType

_Server = tcp.Server
_getdefaulttimeout = socket.getdefaulttimeout
#: Whether the lean accept loop may run (Twisted's is posix-specific too:
#: on Windows it accepts one connection per event).
_POSIX = platformType == "posix"
#: The namespace of Twisted's port's log events.
_NAMESPACE = tcp.Port._logger.namespace


class _Replay:
    """
    The listening socket for Twisted's accept loop, as it was when the lean
    loop met an error: C{accept} raises that error first, then accepts.
    """

    def __init__(self, error: OSError, listener: socket.socket) -> None:
        self._error: OSError | None = error
        self._listener = listener

    def accept(self) -> tuple[socket.socket, Any]:
        error = self._error
        if error is not None:
            self._error = None
            raise error
        return self._listener.accept()


class LeanPort(tcp.Port):
    """
    Twisted's TCP port whose C{doRead} accepts and builds the connection's
    transport directly (see the module's docstring); used by
    L{LeanTCP4ServerEndpoint} and L{LeanTCP6ServerEndpoint}.
    """

    #: The listening socket and the family, type and protocol its accepted
    #: sockets are made with.
    _made: tuple[Any, ...] = (None,)
    #: The port's C{transport} that C{_lean} builds with less, called as
    #: C{transport} is (L{server_transport}, set below; a subclass with its
    #: own C{transport} names both: txwssec._tlsport.DirectTLSPort); any
    #: other C{transport} takes Twisted's C{doRead}.
    _leanFor: Any = _Server
    _lean: Callable[..., tcp.Server]
    #: The namespace of the accept errors' log events: Twisted's port's
    #: (L{None}: the class's own, as Twisted's C{_logger} names it).
    _acceptNamespace: str | None = _NAMESPACE

    def doRead(self) -> None:
        """Accept what is pending, as Twisted's C{Port.doRead}."""
        if self.transport is not self._leanFor or not _POSIX:
            super().doRead()
            return
        try:
            listener: Any = self.socket
            accept = listener._accept
            made = self._made
            if made[0] is not listener:
                # socket.accept's arguments, read once per listening socket
                # (its family and type are properties that make enums).
                made = self._made = (listener, listener.family, listener.type, listener.proto)
            _, family, kind, proto = made
            factory = self.factory
            reactor = self.reactor
            limit = self.numberAccepts
            accepted = 0
            while accepted < limit:
                try:
                    fd, addr = accept()
                except OSError as error:
                    if error.args[0] in (EWOULDBLOCK, EAGAIN):
                        break
                    # Twisted's loop takes the error as it happened, and the
                    # accepts left.
                    accepted += self._twistedAccepts(error, limit - accepted)
                    break
                accepted += 1
                # socket.accept's own wrapping of the descriptor.
                skt = socket.socket(family, kind, proto, fileno=fd)
                if _getdefaulttimeout() is None and listener.gettimeout():
                    skt.setblocking(True)
                self._connect(skt, addr, factory, reactor)
            # Twisted's scaling of the accept loop (see tcp.Port.doRead).
            if accepted == self.numberAccepts:
                self.numberAccepts += 20
            else:
                self.numberAccepts = max(1, accepted)
        except BaseException:
            log.deferr()

    def _twistedAccepts(self, error: OSError, accepts: int) -> int:
        """
        Twisted's accept loop (C{tcp._accept}, its buffered log, its
        C{EMFILE} recovery), from C{error} on, for at most C{accepts}
        accepts.

        @return: how many iterations it went through.
        """
        accepted = 0
        # (Twisted's namespace: this class's own would name it instead.)
        own = self._logger
        namespace = self._acceptNamespace or own.namespace
        with tcp._BuffersLogs(namespace, own.observer) as logger:
            clients = tcp._accept(
                logger, range(accepts), _Replay(error, self.socket), tcp._reservedFD
            )
            for skt, addr in clients:
                accepted += 1
                self._connect(skt, addr, self.factory, self.reactor)
        return accepted

    def _connect(self, skt: socket.socket, addr: Any, factory: Any, reactor: Any) -> None:
        """One accepted socket: the protocol, its transport, the connection."""
        if len(addr) == 4:
            # IPv6: with the scope ID, if any (as Twisted).
            host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
            addr = (host[0], *addr[1:])
        protocol = factory.buildProtocol(self._buildAddr(addr))
        if protocol is None:
            skt.close()
            return
        session = self.sessionno
        self.sessionno = session + 1
        protocol.makeConnection(self._lean(skt, protocol, addr, self, session, reactor))


def server_transport(
    skt: socket.socket, protocol: Any, client: Any, port: Any, session: int, reactor: Any
) -> tcp.Server:
    """
    C{tcp.Server(skt, protocol, client, port, session, reactor)}: the same
    attributes, in the same order, and the same calls (the socket made
    non-blocking, the transport reading), without its three constructors
    and the log prefix's interface check for a protocol whose prefix is its
    class name (Twisted's C{Protocol.logPrefix}).
    """
    if takes_constructor(protocol, reactor):
        return _Server(skt, protocol, client, port, session, reactor)
    transport: tcp.Server = _Server.__new__(_Server)
    set_server_state(transport, skt, protocol, client, port, session, reactor)
    return transport


def takes_constructor(protocol: Any, reactor: Any) -> bool:
    """
    Whether C{protocol}'s transport must be made by Twisted's constructor:
    its log prefix may not be its class name (a C{logPrefix} of its class
    or instance, or interfaces of its own, which Twisted asks), or there is
    no reactor.
    """
    state = getattr(protocol, "__dict__", _NO_STATE)
    return (
        not reactor
        or getattr(protocol.__class__, "logPrefix", None) is not _CLASS_NAME_PREFIX
        or "__provides__" in state
        or "logPrefix" in state
    )


def set_server_state(
    transport: tcp.Server,
    skt: socket.socket,
    protocol: Any,
    client: Any,
    port: Any,
    session: int,
    reactor: Any,
    prefix_suffix: str = "",
) -> None:
    """
    What C{tcp.Server.__init__} sets on C{transport} (made with
    C{__new__}), in its order, with its calls: the socket made
    non-blocking, the transport reading. C{prefix_suffix} follows the
    protocol's class name in the log prefix (C{logstr}).
    """
    # Set as attributes, not through __dict__: CPython 3.11 keeps an
    # object's attributes in its inline values until its __dict__ is
    # read; a transport filled through the dict takes the slower lookup
    # in every later `self.` of its read and write paths.
    # FileDescriptor.__init__, Connection.__init__, then Server.__init__.
    transport.reactor = reactor
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    transport.socket = skt
    skt.setblocking(False)
    transport.fileno = skt.fileno
    transport.protocol = protocol
    if len(client) != 2:
        transport._addressType = _IPV6
    transport.server = port
    transport.client = client
    transport.sessionno = session
    transport.hostname = hostname = client[0]
    name = protocol.__class__.__name__
    transport.logstr = f"{name}{prefix_suffix},{session},{hostname}"
    if port is not None:
        transport.repstr = f"<{name} #{session} on {port._realPortNumber}>"
    transport.startReading()
    transport.connected = 1


LeanPort._lean = staticmethod(server_transport)

#: Twisted's C{Protocol.logPrefix}: the protocol's class name.
_CLASS_NAME_PREFIX = Protocol.logPrefix
#: What a protocol without a C{__dict__} is taken to have: interfaces of
#: its own (Twisted's constructor then asks it for its log prefix). A
#: protocol whose C{__dict__} has C{__provides__} (C{directlyProvides}) or
#: C{logPrefix} (a prefix set on the instance) takes Twisted's constructor
#: too: its prefix may not be its class name.
_NO_STATE = {"__provides__": 1}
#: The address class Server.__init__ sets for an IPv6 client.
_IPV6 = IPv6Address


def _listen(endpoint: Any, factory: Any) -> IListeningPort:
    """C{reactor.listenTCP}, with a L{LeanPort} on Twisted's POSIX reactors."""
    reactor = endpoint._reactor
    if getattr(type(reactor), "listenTCP", None) is not PosixReactorBase.listenTCP:
        port: IListeningPort = reactor.listenTCP(
            endpoint._port, factory, backlog=endpoint._backlog, interface=endpoint._interface
        )
        return port
    # PosixReactorBase.listenTCP's body, with the lean port.
    lean = LeanPort(endpoint._port, factory, endpoint._backlog, endpoint._interface, reactor)
    lean.startListening()
    return lean


class LeanTCP4ServerEndpoint(TCP4ServerEndpoint):
    """Twisted's C{TCP4ServerEndpoint} whose port is a L{LeanPort}."""

    def listen(self, protocolFactory: Any) -> Deferred[IListeningPort]:
        """Listen on TCP (IPv4), as Twisted's endpoint does."""
        return execute(_listen, self, protocolFactory)


class LeanTCP6ServerEndpoint(TCP6ServerEndpoint):
    """Twisted's C{TCP6ServerEndpoint} whose port is a L{LeanPort}."""

    def listen(self, protocolFactory: Any) -> Deferred[IListeningPort]:
        """Listen on TCP (IPv6), as Twisted's endpoint does."""
        return execute(_listen, self, protocolFactory)


_LEAN: dict[type, type] = {
    TCP4ServerEndpoint: LeanTCP4ServerEndpoint,
    TCP6ServerEndpoint: LeanTCP6ServerEndpoint,
}


def lean_endpoint(endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
    """
    C{endpoint} (from Twisted's C{serverFromString}) with a L{LeanPort} when
    it is Twisted's own plain TCP endpoint (the same attributes); any other
    endpoint as it is.
    """
    lean = _LEAN.get(type(endpoint))
    if lean is None:
        return endpoint
    copy: IStreamServerEndpoint = object.__new__(lean)
    copy.__dict__.update(endpoint.__dict__)
    return copy
