"""
L{DirectTCP}: the gateway's TCP endpoint for C{ws://} upstreams with an
IPv4 address, whose transports speak to the upstream protocol directly
(no C{_WrappingProtocol} between them), and which connects, fails and
cancels as Twisted's C{TCP4ClientEndpoint} does.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from conftest import aio
from test_gateway import BackendFactory, connect, exchange, gateway, ws_url
from twisted.internet import reactor
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError, NoProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from txwssec.gateway.upstream import DirectTCP, UpstreamProtocol, pool_for

Serve = Callable[[Any], int]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Recorder(Protocol):
    def __init__(self) -> None:
        self.made = False

    def connectionMade(self) -> None:
        self.made = True


@pytest_twisted.ensureDeferred
async def test_connect_fires_with_the_protocol_itself(serve: Serve) -> None:
    port = serve(Factory.forProtocol(Protocol))
    protocol = await DirectTCP(reactor, "127.0.0.1", port).connect(Factory.forProtocol(Recorder))
    assert isinstance(protocol, Recorder)
    # Fired once built; connected right after, in the same call.
    await deferLater(reactor, 0, lambda: None)
    assert protocol.made
    assert protocol.transport.protocol is protocol  # type: ignore[attr-defined]
    protocol.transport.abortConnection()  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_connect_refused_fails() -> None:
    with pytest.raises(ConnectionRefusedError):
        await DirectTCP(reactor, "127.0.0.1", closed_port()).connect(Factory.forProtocol(Recorder))


@pytest_twisted.ensureDeferred
async def test_cancel_stops_the_attempt(serve: Serve) -> None:
    accepted: list[Protocol] = []

    class Counting(Factory):
        def buildProtocol(self, addr: Any) -> Protocol:
            protocol = Protocol()
            accepted.append(protocol)
            return protocol

    port = serve(Counting())
    built: list[Recorder] = []

    class Client(Factory):
        def buildProtocol(self, addr: Any) -> Recorder:
            built.append(Recorder())
            return built[-1]

    connecting = DirectTCP(reactor, "127.0.0.1", port).connect(Client())
    connecting.cancel()
    with pytest.raises(ConnectingCancelledError):
        await connecting
    assert built == []


@pytest_twisted.ensureDeferred
async def test_a_factory_that_builds_nothing_fails(serve: Serve) -> None:
    port = serve(Factory.forProtocol(Protocol))

    class Nothing(Factory):
        def buildProtocol(self, addr: Any) -> None:
            return None

    with pytest.raises(NoProtocol):
        await DirectTCP(reactor, "127.0.0.1", port).connect(Nothing())


@pytest_twisted.ensureDeferred
async def test_gateway_upstream_transport_speaks_to_the_upstream_leg(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ws:// upstream by IPv4 address: no protocol between the transport and the leg."""
    legs: list[tuple[UpstreamProtocol, Any]] = []
    attach = UpstreamProtocol.attach

    def attached(self: UpstreamProtocol, downstream: Any) -> None:
        transport: Any = self.transport
        legs.append((self, transport.protocol))
        attach(self, downstream)

    monkeypatch.setattr(UpstreamProtocol, "attach", attached)
    factory = gateway(ws_url(serve(BackendFactory())))
    port = serve(factory)

    async def run() -> str | bytes:
        ws = await connect(port)
        try:
            return await exchange(ws, "hello")
        finally:
            await ws.close()

    assert await aio(run()) == "hello"
    assert len(legs) == 1
    leg, spoken_to = legs[0]
    assert spoken_to is leg
    pool = pool_for(factory, factory.policy.routes[0])
    assert [type(e) for e in pool._endpoints.values()] == [DirectTCP]
