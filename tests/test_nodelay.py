"""
TCP_NODELAY on the server's plain TCP connections (issue 19, round 5,
bench/RESULTS.md "Round 5: server handshake and text bulk"): Autobahn's
C{tcpNoDelay} option (default on) is honoured, its protocol's own value
first, then its factory's, as Autobahn's C{_connectionMade} copies options.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from conftest import aio
from test_upgrade_reader import exchange, request
from twisted.internet.protocol import Factory, Protocol

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec._wire import no_delay
from txwssec.apps.echo import EchoProtocol

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
