"""
The gateway's upstream attempt against the client's own handshake: an
upstream that does not finish in time gives 504 (never a reset), even when
the client's C{handshake_timeout} comes before C{upstream_timeout}; a client
that leaves while its upstream connects has that connection closed at once
and is never logged as accepted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from conftest import CapturedLog, aio, raw_exchange, upgrade_request
from test_config import minimal
from test_gateway import CONSUMERS, KEY, RawFactory, eventually, raw_servers, ws_url
from twisted.internet.defer import Deferred

from txwssec import KeyAuthenticator, OriginPolicy, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec.config import parse
from txwssec.errors import ConfigError, http_refusal
from txwssec.proxy import Upstream

Serve = Callable[[Any], int]

__all__ = ["raw_servers"]  # the fixture

REQUEST = upgrade_request("/echo", f"apikey: {KEY}")


def gateway(url: str, *, handshake_timeout: float, upstream_timeout: float) -> SecureServerFactory:
    route = RoutePolicy(
        "/echo",
        [KeyAuthenticator(CONSUMERS)],
        origins=OriginPolicy.from_list(["*"]),
        upstream=Upstream((url,), timeout=upstream_timeout),
    )
    return SecureServerFactory(
        ServerPolicy.single(route, ping_interval=0, handshake_timeout=handshake_timeout)
    )


def observed(factory: SecureServerFactory) -> list[str]:
    names: list[str] = []
    factory.events.add(lambda name, fields: names.append(name))
    return names


def closed(connection: Any) -> bool:
    return not getattr(connection.transport, "connected", True)


class Hanging(WebSocketServerProtocol):
    """An upstream that reads the upgrade request and never answers it."""

    factory: HangingFactory

    def onConnect(self, request: ConnectionRequest) -> Deferred[None]:
        self.factory.waiting.append(self)
        return Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost += 1
        super().connectionLost(reason)


class HangingFactory(WebSocketServerFactory):
    protocol = Hanging  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.setProtocolOptions(openHandshakeTimeout=0)
        self.waiting: list[Hanging] = []
        self.lost = 0


@pytest_twisted.ensureDeferred
async def test_client_handshake_timeout_before_the_upstreams_gives_504(
    serve: Serve, raw_servers: Any, captured_log: CapturedLog
) -> None:
    """
    The client's handshake_timeout (0.5 s) comes while the upstream, which
    accepts TCP and never answers, still has its upstream_timeout (5 s) to
    go: the client gets a 504, not a reset, and the upstream connection is
    closed with it.
    """
    silent = raw_servers(RawFactory())
    factory = gateway(ws_url(serve(silent)), handshake_timeout=0.5, upstream_timeout=5)
    names = observed(factory)
    port = serve(factory)
    assert await aio(raw_exchange(port, REQUEST, timeout=10)) == http_refusal(504)
    assert factory.counters["handshake.refused.504"] == 1
    assert factory.counters["limit.handshake_timeout"] == 0
    assert names.count("upstream.failed") == 1
    assert "handshake.accepted" not in names
    assert len(silent.connections) == 1
    await eventually(lambda: closed(silent.connections[0]), "the upstream to be closed")
    # The gateway's own lines say it, not Autobahn's warning as well.
    assert "dropping connection" not in captured_log.text()


async def send_then_leave(port: int, arrived: Callable[[], bool]) -> None:
    """Send the upgrade request; once the upstream has it, reset the connection."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST)
    await writer.drain()
    while not arrived():
        await asyncio.sleep(0.01)
    writer.transport.abort()


@pytest_twisted.ensureDeferred
async def test_clients_leaving_close_their_upstream_connections_at_once(
    serve: Serve, raw_servers: Any
) -> None:
    """
    Three clients leave while a silent upstream "connects" (upstream_timeout
    60 s): each upstream connection is closed as its client goes, so
    max_connections bounds the upstream connections too; nothing is
    counted as a 504.
    """
    silent = raw_servers(RawFactory())
    factory = gateway(ws_url(serve(silent)), handshake_timeout=60, upstream_timeout=60)
    names = observed(factory)
    port = serve(factory)

    def arrived(count: int) -> Callable[[], bool]:
        return lambda: (
            len(silent.connections) == count and b"\r\n\r\n" in silent.connections[-1].buffer
        )

    for count in (1, 2, 3):
        await aio(send_then_leave(port, arrived(count)))
    await eventually(
        lambda: all(closed(c) for c in silent.connections), "the upstream connections to close"
    )
    await eventually(lambda: factory.connections.total == 0, "the admission to be released")
    assert factory.counters["handshake.refused.504"] == 0
    assert "upstream.failed" not in names
    assert "handshake.accepted" not in names


@pytest_twisted.ensureDeferred
async def test_client_leaving_before_a_slow_upstream_answers_is_not_accepted(
    serve: Serve, captured_log: CapturedLog
) -> None:
    """
    The upstream has read the upgrade request and not answered yet when the
    client leaves: its connection is closed then, and the client is never
    logged as accepted.
    """
    upstream = HangingFactory()
    factory = gateway(ws_url(serve(upstream)), handshake_timeout=60, upstream_timeout=60)
    names = observed(factory)
    port = serve(factory)
    await aio(send_then_leave(port, lambda: len(upstream.waiting) == 1))
    await eventually(lambda: upstream.lost == 1, "the upstream connection to be closed")
    assert "handshake.accepted" not in names
    assert "accepted" not in captured_log.text()


# -- the configuration ---------------------------------------------------------------


def gateway_config(**server: Any) -> dict[str, Any]:
    data = minimal()
    del data["route"][0]["app"]
    data["route"][0]["upstream"] = "ws://127.0.0.1:8080/"
    data["server"] = server
    return data


def test_upstream_timeout_longer_than_the_handshake_timeout_is_an_error() -> None:
    data = gateway_config()
    data["route"][0]["upstream_timeout"] = 6
    with pytest.raises(ConfigError) as caught:
        parse(data)
    assert str(caught.value) == (
        "route[0].upstream_timeout: 6 s is longer than server.handshake_timeout (5 s): "
        "the client's handshake would time out first"
    )


def test_upstream_timeout_within_the_handshake_timeout() -> None:
    (route,) = parse(gateway_config()).policy.routes  # the defaults: 5 and 5
    assert route.upstream is not None and route.upstream.timeout == 5
    data = gateway_config(handshake_timeout=10)
    data["route"][0]["upstream_timeout"] = 8
    (route,) = parse(data).policy.routes
    assert route.upstream is not None and route.upstream.timeout == 8
