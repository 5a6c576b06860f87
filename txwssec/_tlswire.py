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
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from zope.interface import directlyProvides, providedBy

#: The interface declaration Twisted's C{makeConnection} leaves on a TLS
#: protocol, per (protocol class, transport class).
_provides: dict[tuple[type, type], Any] = {}


class ServerTLSProtocol(BufferingTLSTransport):
    """
    Twisted's buffering memory-BIO TLS transport, whose C{makeConnection}
    declares the transport's interfaces from a cache; used by every txwssec
    TLS listener (L{ServerTLSFactory}).
    """

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
        self._checkHandshakeStatus()


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
