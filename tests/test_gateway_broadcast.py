"""
Broadcasting is for application routes: L{SecureServerFactory.broadcast}
and C{openSessions} leave gateway sessions out (a gateway route named
explicitly is a L{ValueError}). A message of the gateway session's own
(wssec.refreshed, or a subclass's) never falls inside a message its upstream
sends in fragments: it waits for that message's end (see test_refresh).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from conftest import aio
from test_gateway import CONSUMERS, KEY, TIMEOUT, BackendFactory, connect, ws_url

from txwssec import KeyAuthenticator, OriginPolicy, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec.apps.echo import EchoProtocol
from txwssec.proxy import Upstream

Serve = Callable[[Any], int]


def server(upstream_port: int) -> SecureServerFactory:
    """C{/app}: an echo application; C{/echo}: a gateway route."""
    key = KeyAuthenticator(CONSUMERS)
    anyone = OriginPolicy.from_list(["*"])
    routes = [
        RoutePolicy("/app", [key], origins=anyone, protocol=EchoProtocol),
        RoutePolicy("/echo", [key], origins=anyone, upstream=Upstream((ws_url(upstream_port),))),
    ]
    return SecureServerFactory(ServerPolicy(routes, ping_interval=0))


@pytest_twisted.ensureDeferred
async def test_broadcast_to_all_routes_leaves_gateway_sessions_out(serve: Serve) -> None:
    backend = BackendFactory()
    factory = server(serve(backend))
    port = serve(factory)

    async def run() -> tuple[int, Any, Any, Any]:
        app = await connect(port, "/app", headers={"apikey": KEY})
        gateway = await connect(port, "/echo", headers={"apikey": KEY})
        try:
            opened = factory.openSessions()
            sent = factory.broadcast(b"to everyone")
            to_app = await asyncio.wait_for(app.recv(), TIMEOUT)
            # The first thing the gateway's client gets is its upstream's echo.
            await gateway.send("from the client")
            to_gateway = await asyncio.wait_for(gateway.recv(), TIMEOUT)
            return sent, [p.route.path for p in opened], to_app, to_gateway
        finally:
            await app.close()
            await gateway.close()

    sent, opened, to_app, to_gateway = await aio(run())
    assert (sent, opened) == (1, ["/app"])
    assert to_app == "to everyone"
    assert to_gateway == "from the client"


@pytest_twisted.ensureDeferred
async def test_a_gateway_route_named_explicitly_is_an_error(serve: Serve) -> None:
    factory = server(serve(BackendFactory()))
    serve(factory)
    with pytest.raises(ValueError, match="route /echo is a gateway route"):
        factory.broadcast(b"x", route="/echo")
    with pytest.raises(ValueError, match="route /echo is a gateway route"):
        factory.openSessions("/echo")
    assert factory.openSessions("/app") == []


@pytest_twisted.ensureDeferred
async def test_a_relaying_gateway_sessions_own_message_arrives_whole(serve: Serve) -> None:
    backend = BackendFactory()
    factory = server(serve(backend))
    port = serve(factory)

    async def run() -> Any:
        gateway = await connect(port, "/echo", headers={"apikey": KEY})
        try:
            (session,) = list(factory.registry)
            assert session.sendMessage(b"own") is True
            own = await asyncio.wait_for(gateway.recv(), TIMEOUT)
            await gateway.send("still relayed")
            return own, await asyncio.wait_for(gateway.recv(), TIMEOUT)
        finally:
            await gateway.close()

    assert await aio(run()) == ("own", "still relayed")
