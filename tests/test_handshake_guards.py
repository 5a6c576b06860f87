"""
Guards found missing by a security review: one handshake pipeline per
connection, no control characters in header lines, bounded password work,
the per-consumer slot released on 502, RFC 6455 only, JWT lookup past a
foreign Authorization scheme, and the client's Autobahn logger pinned.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from typing import Any

import jwt
import pytest
import pytest_twisted
import websockets
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from conftest import CapturedLog, aio, raw_exchange, upgrade_request
from twisted.internet.defer import Deferred

from txwssec import (
    AnonymousAuthenticator,
    BasicAuthenticator,
    Consumer,
    ConsumerDirectory,
    JWTAuthenticator,
    KeyAuthenticator,
    RoutePolicy,
    SecureServerFactory,
    SecureServerProtocol,
    ServerPolicy,
    hash_password,
)
from txwssec.apps.echo import EchoProtocol
from txwssec.client import ApiKey, SecureClientFactory
from txwssec.consumers import key_digest
from txwssec.passwords import _parse, dummy_hash_like
from txwssec.policy import RouteLimits
from txwssec.proxy import Upstream
from txwssec.types import Accept, HandshakeRequest, Principal

KEY = "guard-key-0123456789"
SECRET = "guard-jwt-secret-0123456789-0123456789"
PASSWORD = "correct horse"
PASSWORD_HASH = hash_password(PASSWORD, "pbkdf2-sha256")


def consumers() -> ConsumerDirectory:
    return ConsumerDirectory(
        [
            Consumer("alice", (key_digest(KEY),), PASSWORD_HASH),
            Consumer("root", (key_digest("root-key-0123456789"),)),
        ]
    )


class SlowAccept:
    """Accepts anyone, after the test fires C{release}."""

    name = "slow"
    challenge = "Slow"

    def __init__(self) -> None:
        self.release: Deferred[None] = Deferred()
        self.calls = 0

    def authenticate(self, request: HandshakeRequest) -> Deferred[Accept]:
        self.calls += 1
        d: Deferred[Any] = Deferred()
        self.release.addCallback(lambda _: d.callback(Accept(Principal("alice", self.name))))
        return d


class Admin(EchoProtocol):
    ran = 0

    def onOpen(self) -> None:
        Admin.ran += 1


@pytest_twisted.ensureDeferred
async def test_second_request_on_a_connection_never_starts_a_second_pipeline(serve: Any) -> None:
    """
    While the first request is being authenticated, a second request on the
    same connection (to a route the client may not use) is not read: one
    pipeline, one admission, no second route class.
    """
    slow = SlowAccept()
    admin = RoutePolicy(
        "/admin", [KeyAuthenticator(consumers())], consumers=frozenset({"root"}), protocol=Admin
    )
    factory = SecureServerFactory(
        ServerPolicy(routes=[RoutePolicy("/public", [slow], protocol=EchoProtocol), admin])
    )
    port = serve(factory)

    async def client() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(upgrade_request("/public"))
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(upgrade_request("/admin", f"apikey: {KEY}"))
        await writer.drain()
        await asyncio.sleep(0.2)
        slow.release.callback(None)
        data = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
        return data

    data = await aio(client())
    assert data.count(b"HTTP/1.1 101") == 1
    assert slow.calls == 1
    assert Admin.ran == 0
    assert factory.counters["session.opened"] == 1
    for _ in range(50):
        if factory.connections.total == 0:
            break
        await aio(asyncio.sleep(0.05))
    assert factory.connections.total == 0


@pytest.mark.parametrize(
    "value",
    [
        b"hi\nX-Consumer-Username: admin",
        b"hi\rX-Consumer-Username: admin",
        b"hi\x85X-Trace: 1",
        b"hi\x0bX-Trace: 1",
        b"hi\x00",
        b"hi\r",
        b"hi\n\r\n\r",
    ],
)
@pytest_twisted.ensureDeferred
async def test_header_line_with_a_line_break_never_reaches_the_upstream(
    serve: Any, value: bytes
) -> None:
    seen: list[Any] = []

    class Upstream_(WebSocketServerProtocol):
        def onConnect(self, request: Any) -> None:
            seen.append(request)

    upstream_factory = WebSocketServerFactory()
    upstream_factory.protocol = Upstream_
    upstream_port = serve(upstream_factory)
    route = RoutePolicy(
        "/gw",
        [KeyAuthenticator(consumers())],
        upstream=Upstream((f"ws://127.0.0.1:{upstream_port}/",)),
    )
    port = serve(SecureServerFactory(route))
    request = upgrade_request("/gw", f"apikey: {KEY}").replace(
        b"\r\n\r\n", b"\r\nX-Note: " + value + b"\r\n\r\n"
    )
    raw = await aio(raw_exchange(port, request))
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert seen == []


@pytest_twisted.ensureDeferred
async def test_concurrent_password_guesses_are_bounded_per_address(serve: Any) -> None:
    """
    Ten guesses at once from one address: two are hashed, the others get
    429 at once without waiting in the thread pool's queue.
    """
    policy = ServerPolicy.single(
        RoutePolicy("/echo", [BasicAuthenticator(consumers())], protocol=EchoProtocol),
        auth_failures_per_minute=0,
    )
    port = serve(SecureServerFactory(policy))
    guess = base64.b64encode(b"alice:wrong").decode()

    async def one() -> int:
        raw = await raw_exchange(port, upgrade_request("/echo", f"Authorization: Basic {guess}"))
        return int(raw.split(b" ", 2)[1])

    async def many() -> list[int]:
        return list(await asyncio.gather(*(one() for _ in range(10))))

    statuses = await aio(many())
    assert sorted(statuses) == [401, 401] + [429] * 8


def test_unknown_users_cost_the_configured_hash() -> None:
    """The dummy hash has the scheme and cost of the configured passwords."""
    dummy = dummy_hash_like(PASSWORD_HASH)
    assert _parse(dummy)[:2] == _parse(PASSWORD_HASH)[:2]
    assert BasicAuthenticator(consumers())._dummy == dummy
    start = time.perf_counter()
    from txwssec.passwords import verify_password

    assert verify_password(PASSWORD, dummy) is False
    assert time.perf_counter() - start > 0.01


@pytest_twisted.ensureDeferred
async def test_consumer_slot_is_released_after_502(serve: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    route = RoutePolicy(
        "/gw",
        [KeyAuthenticator(consumers())],
        upstream=Upstream((f"ws://127.0.0.1:{dead}/",)),
        limits=RouteLimits(connections_per_consumer=2),
    )
    factory = SecureServerFactory(route)
    port = serve(factory)
    for _ in range(5):
        raw = await aio(raw_exchange(port, upgrade_request("/gw", f"apikey: {KEY}")))
        assert raw.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert factory.admission.consumers.total == 0


@pytest_twisted.ensureDeferred
async def test_only_rfc_6455_is_spoken(serve: Any) -> None:
    """
    Version 8 (hybi-10) would carry the origin in Sec-WebSocket-Origin,
    which the Origin policy does not read: it is refused.
    """
    port = serve(SecureServerFactory(RoutePolicy("/echo", [AnonymousAuthenticator()])))
    request = upgrade_request("/echo", "Sec-WebSocket-Origin: https://evil.example").replace(
        b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"
    )
    raw = await aio(raw_exchange(port, request))
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Sec-WebSocket-Version: 13\r\n" in raw


@pytest_twisted.ensureDeferred
async def test_bearer_in_subprotocol_with_a_basic_header(serve: Any) -> None:
    """A foreign Authorization scheme does not stop the JWT method looking on."""
    token = jwt.encode({"sub": "alice", "exp": time.time() + 60}, SECRET, algorithm="HS256")
    route = RoutePolicy("/echo", [JWTAuthenticator(consumers(), SECRET)], protocol=EchoProtocol)
    port = serve(SecureServerFactory(route))

    async def client() -> str | None:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/echo",
            subprotocols=["bearer", token],  # type: ignore[list-item]
            additional_headers={"Authorization": "Basic Zm9vOmJhcg=="},
        ) as ws:
            return ws.subprotocol

    assert await aio(client()) == "bearer"


def test_upstream_route_needs_a_gateway_protocol() -> None:
    route = RoutePolicy(
        "/gw",
        [AnonymousAuthenticator()],
        protocol=SecureServerProtocol,
        upstream=Upstream(("ws://127.0.0.1:1/",)),
    )
    with pytest.raises(TypeError, match="must subclass GatewayProtocol"):
        SecureServerFactory(route)


@pytest_twisted.ensureDeferred
async def test_client_does_not_log_its_credentials_at_debug_level(
    serve: Any, captured_log: CapturedLog
) -> None:
    import txaio

    port = serve(
        SecureServerFactory(
            RoutePolicy("/echo", [KeyAuthenticator(consumers())], protocol=EchoProtocol)
        )
    )
    txaio.set_global_log_level("debug")
    try:
        factory = SecureClientFactory(f"ws://127.0.0.1:{port}/echo", ApiKey(KEY))
        protocol = await factory.connect()
        await protocol.opened
        protocol.sendClose(1000)
        await protocol.closed
    finally:
        txaio.set_global_log_level("info")
    assert KEY not in captured_log.text()


class Recorder(WebSocketServerProtocol):
    """An upstream that records the request it received and picks nothing."""

    requests: list[Any] = []

    def onConnect(self, request: Any) -> None:
        Recorder.requests.append(request)


async def response_head(port: int, request: bytes) -> bytes:
    """Send C{request}; return the response up to the end of its head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()


def recording_upstream(serve: Any) -> int:
    Recorder.requests = []
    factory = WebSocketServerFactory()
    factory.protocol = Recorder
    return int(serve(factory))


@pytest_twisted.ensureDeferred
async def test_gateway_strips_every_methods_subprotocol_credential(serve: Any) -> None:
    """
    With auth = [jwt, key], a Bearer header accepts the connection while a
    key also rides in Sec-WebSocket-Protocol: the key never goes upstream.
    """
    upstream = recording_upstream(serve)
    token = jwt.encode({"sub": "alice", "exp": time.time() + 60}, SECRET, algorithm="HS256")
    route = RoutePolicy(
        "/gw",
        [JWTAuthenticator(consumers(), SECRET), KeyAuthenticator(consumers())],
        upstream=Upstream((f"ws://127.0.0.1:{upstream}/",)),
    )
    port = serve(SecureServerFactory(route))
    request = upgrade_request(
        "/gw",
        f"Authorization: Bearer {token}",
        f"Sec-WebSocket-Protocol: chat.v1, token, {KEY}",
    )
    raw = await aio(response_head(port, request))
    assert raw.startswith(b"HTTP/1.1 101")
    assert KEY.encode() not in raw
    (seen,) = Recorder.requests
    assert seen.protocols == ["chat.v1"]
    assert KEY not in repr(seen.headers)


@pytest_twisted.ensureDeferred
async def test_gateway_strips_declared_and_forgeable_headers(serve: Any) -> None:
    """
    A custom method's declared credential header, and forwarding headers a
    client could forge (underscored names, Forwarded, X-Real-IP,
    X-Forwarded-*), never reach the upstream.
    """

    class SharedSecret:
        name = "shared-secret"
        challenge = "SharedSecret"
        credential_headers = ("x-shared-secret",)

        def authenticate(self, request: HandshakeRequest) -> Accept | None:
            if request.header_values("x-shared-secret") == ("s3cret-value",):
                return Accept(Principal("alice", self.name))
            return None

    upstream = recording_upstream(serve)
    route = RoutePolicy(
        "/gw", [SharedSecret()], upstream=Upstream((f"ws://127.0.0.1:{upstream}/",))
    )
    port = serve(SecureServerFactory(route))
    request = upgrade_request(
        "/gw",
        "X-Shared-Secret: s3cret-value",
        "X_Consumer_Username: admin",
        "Forwarded: for=6.6.6.6",
        "X-Real-IP: 6.6.6.6",
        "X-Forwarded-Host: evil.example",
        "X-Trace: kept",
    )
    raw = await aio(response_head(port, request))
    assert raw.startswith(b"HTTP/1.1 101")
    (seen,) = Recorder.requests
    headers = seen.headers
    assert "x-shared-secret" not in headers
    assert not any("_" in name for name in headers)
    assert {"forwarded", "x-real-ip", "x-forwarded-host"}.isdisjoint(headers)
    assert headers["x-trace"] == "kept"
    assert headers["x-consumer-username"] == "alice"
