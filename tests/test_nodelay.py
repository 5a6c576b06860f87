"""
TCP_NODELAY on the server's plain TCP connections (issue 19, round 5,
bench/RESULTS.md "Round 5: server handshake and text bulk"): Autobahn's
C{tcpNoDelay} option (default on) is honoured, its protocol's own value
first, then its factory's, as Autobahn's C{_connectionMade} copies options.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import test_tls_wire
from conftest import aio
from test_tls_details import _connect
from test_upgrade_reader import exchange, request
from twisted.internet import error
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec._wire import no_delay
from txwssec.apps.echo import EchoProtocol
from txwssec.client import SecureClientFactory, SecureClientProtocol
from txwssec.gateway.upstream import UpstreamProtocol, _Attempt, upstream_endpoint

folder = test_tls_wire.folder

#: TCP_NODELAY of each server socket at onOpen.
SEEN: list[int] = []


class Watched(EchoProtocol):
    def onOpen(self) -> None:
        sock = self.transport.socket
        SEEN.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        super().onOpen()


class Nagle(Watched):
    tcpNoDelay = False


def factory(protocol: type[Watched] = Watched, **options: Any) -> SecureServerFactory:
    route = RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=protocol)
    made = SecureServerFactory(ServerPolicy(routes=(route,)))
    made.protocol = protocol
    if options:
        made.setProtocolOptions(**options)
    return made


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "protocol,options,expected",
    [(Watched, {}, 1), (Watched, {"tcpNoDelay": False}, 0), (Nagle, {}, 0)],
    ids=["default", "factory off", "protocol off"],
)
async def test_nodelay_as_the_option_says(
    serve: Any, protocol: type[Watched], options: dict[str, Any], expected: int
) -> None:
    SEEN.clear()
    port = serve(factory(protocol, **options))
    answer = await aio(exchange(port, request()))
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert SEEN == [expected]


def test_no_delay_reads_the_option_as_autobahn_copies_it() -> None:
    class Plain(Protocol):
        pass

    class Own(Protocol):
        tcpNoDelay = True

    made: Any = Factory()
    protocol: Any = Plain()
    protocol.factory = made
    assert no_delay(protocol) is False  # no option anywhere
    made.tcpNoDelay = True
    assert no_delay(protocol) is True
    protocol.tcpNoDelay = False  # the instance's own value wins
    assert no_delay(protocol) is False
    own: Any = Own()
    own.factory = made
    made.tcpNoDelay = False
    assert no_delay(own) is True  # the class's value wins


# -- the client and the gateway's upstream leg ---------------------------------------


class NoDelayClient(SecureClientProtocol):
    """Records its socket's TCP_NODELAY once open."""

    seen: list[int] = []

    def onOpen(self) -> None:
        sock = self.transport.getHandle()
        NoDelayClient.seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        self.sendClose(1000)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "options,expected", [({}, 1), ({"tcpNoDelay": False}, 0)], ids=["default", "off"]
)
async def test_client_nodelay_as_the_option_says(
    serve: Any, options: dict[str, Any], expected: int
) -> None:
    """txwssec's client sets TCP_NODELAY as Autobahn's tcpNoDelay option says."""
    NoDelayClient.seen.clear()
    port = serve(factory())
    client = SecureClientFactory(f"ws://127.0.0.1:{port}/echo")
    client.protocol = NoDelayClient
    if options:
        client.setProtocolOptions(**options)
    protocol = await client.connect()
    assert await protocol.closed == (True, 1000, None)
    assert NoDelayClient.seen == [expected]


def test_gateway_upstream_leg_nodelay() -> None:
    """The gateway's upstream connection gets TCP_NODELAY (the option's default)."""
    reactor = EPollReactor()
    silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        url = f"ws://127.0.0.1:{silent.getHost().port}/"
        client = SecureClientFactory(url, handshake_timeout=5, reactor=reactor)
        client.protocol = UpstreamProtocol
        endpoint = upstream_endpoint(client, 5)
        attempt = _Attempt(client, lambda: endpoint, 5, reactor)
        end = time.monotonic() + 5
        while attempt._protocol is None and time.monotonic() < end:
            reactor.iterate(0.01)
        sock = attempt._protocol.transport.getHandle()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        attempt.result.addErrback(lambda failure: None)  # BadGateway: dropped below
        attempt._protocol.transport.abortConnection()
        reactor.iterate(0.01)
    finally:
        silent.stopListening()
        for selectable in reactor.removeAll():
            selectable.connectionLost(Failure(error.ConnectionDone()))
        reactor.waker.connectionLost(None)


class TLSWatched(EchoProtocol):
    """Records the TCP socket's TCP_NODELAY under its TLS transport at onOpen."""

    def onOpen(self) -> None:
        sock = self.transport.transport.getHandle()
        SEEN.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        super().onOpen()


@pytest_twisted.ensureDeferred
async def test_wss_server_nodelay(serve: Any, folder: Path) -> None:
    """A wss server connection's TCP socket gets TCP_NODELAY too (the option's default)."""
    SEEN.clear()
    answer = await _connect(serve, folder, TLSWatched, None)
    assert answer == b"HTTP/1.1 101 Switching Protocols|\x88\x02\x03\xe8"
    assert SEEN == [1]
