"""
txwssec copies the factory's Autobahn protocol options onto each connection
itself (see txwssec._autobahn.copy_options): every option must still arrive,
and a subclass's own value must still win, as with Autobahn's own copy.
"""

from typing import Any

import pytest_twisted
import websockets
from autobahn.websocket.protocol import WebSocketClientProtocol, WebSocketServerProtocol
from conftest import aio
from twisted.internet.defer import Deferred

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory
from txwssec.apps.echo import EchoProtocol
from txwssec.client import SecureClientFactory, SecureClientProtocol


class RecordingEcho(EchoProtocol):
    """Records the connection's options when it opens."""

    opened: "Deferred[dict[str, Any]]"
    autoPingTimeout = 7.5  # a subclass's own value

    def onOpen(self) -> None:
        RecordingEcho.opened.callback(
            {name: getattr(self, name) for name in WebSocketServerProtocol.CONFIG_ATTRS}
        )


@pytest_twisted.ensureDeferred
async def test_server_connection_gets_every_factory_option(serve):
    RecordingEcho.opened = Deferred()
    factory = SecureServerFactory(
        RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=RecordingEcho)
    )
    port = serve(factory)

    async def client() -> None:
        async with websockets.connect(f"ws://127.0.0.1:{port}/echo") as ws:
            await ws.send("x")
            await ws.recv()

    await aio(client())
    options = await RecordingEcho.opened
    assert options["autoPingTimeout"] == 7.5
    for name in WebSocketServerProtocol.CONFIG_ATTRS:
        if name in ("autoPingTimeout", "maxFramePayloadSize", "maxMessagePayloadSize"):
            continue  # the subclass's value; the route's sizes (set by the pipeline)
        assert options[name] == getattr(factory, name), name
    assert options["failByDrop"] is False
    assert options["autoPingInterval"] == factory.policy.ping_interval
    assert options["maxMessagePayloadSize"] == factory.policy.routes[0].max_message_size


@pytest_twisted.ensureDeferred
async def test_client_connection_gets_every_factory_option(serve):
    factory = SecureServerFactory(
        RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=EchoProtocol)
    )
    port = serve(factory)
    client = SecureClientFactory(f"ws://127.0.0.1:{port}/echo", max_message_size=4096)
    protocol: SecureClientProtocol = await client.connect()
    await protocol.opened
    for name in WebSocketClientProtocol.CONFIG_ATTRS:
        assert getattr(protocol, name) == getattr(client, name), name
    assert protocol.maxMessagePayloadSize == 4096
    protocol.sendClose(1000)
    await protocol.closed
