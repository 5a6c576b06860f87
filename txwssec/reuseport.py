"""
Listeners that several processes share, for C{[server] workers} (see
L{txwssec.workers}): every worker listens on the same address with its own
socket and C{SO_REUSEPORT}, and the Linux kernel spreads the incoming
connections over the workers' listening sockets (by a hash of the
connection's addresses and ports).

Twisted has no option for C{SO_REUSEPORT} (twisted#9101); like Crossbar.io
(C{crossbar/common/twisted/sharedport.py}), L{ReusePort} is a TCP port that
sets it on its socket before binding. A TLS listener is the same port with
TLS in memory over each connection, as C{reactor.listenSSL} does; for a
C{tls:} or C{wss:} listener it is L{txwssec._tlsport}'s port (L{SharedTLSPort}),
whose txwssec WebSocket connections get the one-object TLS transport, as the
same listener's in a single process.

The supervisor resolves the address first with L{reserve}: a socket bound
with C{SO_REUSEPORT} but never listening. It turns C{tcp:0} into a concrete
port that the workers then all bind, and keeps the port while a worker
restarts. A bound socket that does not listen takes no connections (the
kernel hands a connection to a I{listening} socket of the group only).

Only Linux balances connections over the sockets of a group (L{SUPPORTED}).
Elsewhere the option means something else (on macOS and the BSDs the last
socket bound gets every connection; FreeBSD's balancing option is
C{SO_REUSEPORT_LB}), and C{twistd wssec} refuses C{workers > 1}.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred, execute
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from zope.interface import implementer

from txwssec import _tlsport
from txwssec._tlsport import DirectTLSPort
from txwssec._tlswire import ServerTLSFactory
from txwssec.listen import Description

#: Whether this platform balances connections over C{SO_REUSEPORT} sockets.
SUPPORTED = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")

#: The listen kinds workers can share (TCP, with or without TLS).
SHAREABLE_KINDS = ("tcp", "tcp6", "tls", "ssl", "wss")


def unshareable(listen: tuple[str, ...]) -> tuple[int, str] | None:
    """
    The first listen description (index and text) that workers cannot
    share: UNIX sockets and systemd's sockets are one socket, not an address
    each worker can bind.
    """
    for index, text in enumerate(listen):
        description = Description.parse(text)
        if description.kind not in SHAREABLE_KINDS or description.args[:1] == ("systemd",):
            return index, text
    return None


class ReusePort(tcp.Port):
    """A TCP port whose socket has C{SO_REUSEPORT} set before it binds."""

    def createInternetSocket(self) -> socket.socket:
        sock: socket.socket = super().createInternetSocket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock


class SharedTLSPort(ReusePort, DirectTLSPort):
    """
    L{ReusePort}'s socket with L{DirectTLSPort}'s connections: txwssec's
    WebSocket protocols get L{txwssec._tlsport.DirectTLSServer}, any other
    protocol Twisted's TCP transport with L{ServerTLSProtocol
    <txwssec._tlswire.ServerTLSProtocol>}.
    """


@implementer(IStreamServerEndpoint)
class SharedPortEndpoint:
    """
    Listens on C{interface}:C{port} with L{ReusePort}, with TLS over each
    connection when C{context} is given: with L{SharedTLSPort} when
    C{direct} (and L{txwssec._tlsport.direct}), as a single process's
    C{tls:} and C{wss:} listeners, else two-layer.
    """

    def __init__(
        self,
        reactor: Any,
        port: int,
        interface: str,
        backlog: int,
        context: Any = None,
        direct: bool = False,
    ) -> None:
        self._reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog
        self.context = context
        self.direct = direct

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        """Bind and listen now (the result has fired when this returns)."""
        return execute(self._listen, factory)

    def _listen(self, factory: Any) -> IListeningPort:
        if self.context is not None and self.direct and _tlsport.direct():
            tls = SharedTLSPort(
                self.port, factory, self.backlog, self.interface, self._reactor, self.context
            )
            tls.startListening()
            return tls
        if self.context is not None:
            factory = ServerTLSFactory(self.context, False, factory)
        port = ReusePort(self.port, factory, self.backlog, self.interface, self._reactor)
        if self.context is not None:
            port._type = "TLS"
        port.startListening()
        return port


def shared(
    endpoint: IStreamServerEndpoint, reactor: Any, port: int | None = None
) -> SharedPortEndpoint:
    """
    The shared form of a TCP or TLS endpoint made from a listen description
    (L{txwssec.listen.server_endpoint}), on C{port} if given (the port the
    supervisor reserved).

    @raise ValueError: for another kind of endpoint.
    """
    # Twisted's endpoints keep what they listen on in private attributes,
    # unchanged for a decade; reading them keeps every option of the
    # descriptions (tls:, ssl:, wss: and their contexts) in one place.
    if isinstance(endpoint, TCP4ServerEndpoint | TCP6ServerEndpoint | SSL4ServerEndpoint):
        context = getattr(endpoint, "_sslContextFactory", None)
        return SharedPortEndpoint(
            reactor,
            endpoint._port if port is None else port,
            endpoint._interface,
            endpoint._backlog,
            context,
            # tls: and wss: (not Twisted's ssl:), as without workers
            direct=isinstance(endpoint, _tlsport.TLSPortEndpoint),
        )
    raise ValueError(f"workers cannot share a {type(endpoint).__name__}")


def reserve(endpoint: SharedPortEndpoint) -> socket.socket:
    """
    A socket bound with C{SO_REUSEPORT} to C{endpoint}'s address, not
    listening: it fixes the port (a concrete one for port 0) for the workers.

    @raise OSError: the address is taken (by a socket without
        C{SO_REUSEPORT}, or of another user) or cannot be bound.
    """
    interface = endpoint.interface
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR as Twisted's own ports: connections an earlier server
        # on this port closed (TIME_WAIT) do not keep the port taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, endpoint.port))
    except OSError:
        sock.close()
        raise
    return sock
