import pytest_twisted
import websockets
from conftest import aio

from txwssec import Consumer, ConsumerDirectory, KeyAuthenticator, RoutePolicy, SecureServerFactory
from txwssec.apps.echo import EchoProtocol
from txwssec.consumers import key_digest


@pytest_twisted.ensureDeferred
async def test_echo_with_key(serve):
    consumers = ConsumerDirectory([Consumer("john", (key_digest("k1"),))])
    factory = SecureServerFactory(
        RoutePolicy("/echo", [KeyAuthenticator(consumers)], protocol=EchoProtocol)
    )
    port = serve(factory)

    async def client():
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/echo", additional_headers={"apikey": "k1"}
        ) as ws:
            await ws.send("hello")
            return await ws.recv()

    assert await aio(client()) == "hello"
