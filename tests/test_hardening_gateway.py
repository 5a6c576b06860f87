"""
What the gateway forwards: hop-by-hop headers (and the ones C{Connection}
names) never; every credential place of every configured method never;
C{Cookie} and C{Authorization} only when the route says so; the query
string exactly as the client sent it, minus the credential parameters.

Each test sends the exact bytes of the client's request (a raw socket) and
asserts the exact request line and header names the upstream received.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from conftest import aio, upgrade_request
from test_gateway import CONSUMERS, JWT_SECRET, KEY, BackendFactory, ws_url

from txwssec import (
    BasicAuthenticator,
    JWTAuthenticator,
    KeyAuthenticator,
    OriginPolicy,
    RoutePolicy,
    SecureServerFactory,
    ServerPolicy,
)
from txwssec.apps.echo import EchoProtocol
from txwssec.config import parse
from txwssec.errors import ConfigError
from txwssec.proxy import Upstream

Serve = Callable[[Any], int]

#: What the gateway's own client always sends (Autobahn's handshake).
HANDSHAKE_HEADERS = [
    "host",
    "upgrade",
    "connection",
    "pragma",
    "cache-control",
    "sec-websocket-key",
    "sec-websocket-version",
]


def gateway(upstream_port: int, **route_options: Any) -> SecureServerFactory:
    """
    C{/echo}: a gateway route with the key method (header C{apikey}, query
    C{apikey}); C{/other}: an application route with JWT (Authorization, or
    query C{access_token}) and a custom method reading C{x-ticket}.
    """
    key = KeyAuthenticator(CONSUMERS, query="apikey")
    jwt = JWTAuthenticator(CONSUMERS, JWT_SECRET, query="access_token")

    class Ticket:
        name = "ticket"
        challenge = ""
        credential_headers = ("x-ticket",)
        credential_queries = ("ticket",)

        def authenticate(self, request: Any) -> None:
            return None

    routes = [
        RoutePolicy(
            "/echo",
            [key],
            origins=OriginPolicy.from_list(["*"]),
            upstream=Upstream((ws_url(upstream_port),)),
            **route_options,
        ),
        RoutePolicy("/other", [jwt, Ticket()], protocol=EchoProtocol),
    ]
    return SecureServerFactory(ServerPolicy(routes, ping_interval=0))


async def handshake(port: int, request: bytes) -> bytes:
    """Send C{request}; the response head (the connection is then closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()


def received(backend: BackendFactory) -> tuple[bytes, list[tuple[str, str]]]:
    """The request line and the (name, value) header lines the upstream got."""
    head = backend.last.raw.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    lines = [line.split(":", 1) for line in head[1:]]
    return head[0].encode("latin-1"), [(name.lower(), value.strip()) for name, value in lines]


SENT = (
    f"apikey: {KEY}",
    "Cookie: session=abc",
    "Authorization: Bearer not-for-upstream",
    "X-Ticket: other-method-secret",
    "Connection: Upgrade, X-Hop-Secret",
    "X-Hop-Secret: hop-only",
    "Keep-Alive: timeout=5",
    "Proxy-Authorization: Basic cHJveHk6c2VjcmV0",
    "Proxy-Authenticate: Basic",
    "TE: trailers",
    "Trailer: X-Checksum",
    "X-Trace: trace-1",
)

RAW_QUERY = "a=1%20b&access_token=JWT&b=c+d&apikey=QUERYKEY&&Ticket=T&ticket=T2&z=%2F%3d&x"


@pytest_twisted.ensureDeferred
async def test_upstream_gets_no_hop_or_credential_header_and_the_raw_query(serve: Serve) -> None:
    backend = BackendFactory()
    port = serve(gateway(serve(backend)))
    request = upgrade_request(f"/echo?{RAW_QUERY}", *SENT)
    response = await aio(handshake(port, request))
    assert response.startswith(b"HTTP/1.1 101 ")

    line, headers = received(backend)
    # Every credential parameter of every configured method is gone (apikey
    # of this route, access_token and ticket of /other); every other byte of
    # the query is as sent: %20 stays %20, + stays +, the empty piece, the
    # case of "Ticket" (another name), the lone "x".
    assert line == b"GET /echo?a=1%20b&b=c+d&&Ticket=T&z=%2F%3d&x HTTP/1.1"
    names = [name for name, _ in headers]
    assert sorted(names) == sorted(
        [*HANDSHAKE_HEADERS, "x-trace", "x-forwarded-for", "x-consumer-username"]
    )
    assert dict(headers)["connection"] == "Upgrade"
    assert dict(headers)["x-trace"] == "trace-1"
    for secret in (KEY, "abc", "not-for-upstream", "other-method-secret", "hop-only", "JWT"):
        assert secret.encode() not in backend.last.raw


@pytest_twisted.ensureDeferred
async def test_query_without_credentials_is_forwarded_byte_for_byte(serve: Serve) -> None:
    backend = BackendFactory()
    port = serve(gateway(serve(backend)))
    query = "sig=a%2Bb%3D%3D&exp=1700000000&path=%2Fx%20y&q=a+b"
    request = upgrade_request(f"/echo?{query}", f"apikey: {KEY}")
    assert (await aio(handshake(port, request))).startswith(b"HTTP/1.1 101 ")
    assert received(backend)[0] == f"GET /echo?{query} HTTP/1.1".encode()


@pytest_twisted.ensureDeferred
async def test_forward_cookie_and_authorization_when_the_route_says_so(serve: Serve) -> None:
    """
    forward_cookie / forward_authorization = true: those two pass, as sent;
    hop-by-hop headers and the other methods' credential places still go.
    """
    backend = BackendFactory()
    port = serve(gateway(serve(backend), forward_cookie=True, forward_authorization=True))
    request = upgrade_request(f"/echo?{RAW_QUERY}", *SENT)
    assert (await aio(handshake(port, request))).startswith(b"HTTP/1.1 101 ")
    line, headers = received(backend)
    assert line == b"GET /echo?a=1%20b&b=c+d&&Ticket=T&z=%2F%3d&x HTTP/1.1"
    assert sorted(name for name, _ in headers) == sorted(
        [
            *HANDSHAKE_HEADERS,
            "cookie",
            "authorization",
            "x-trace",
            "x-forwarded-for",
            "x-consumer-username",
        ]
    )
    assert dict(headers)["cookie"] == "session=abc"
    assert dict(headers)["authorization"] == "Bearer not-for-upstream"


def test_forward_authorization_refused_when_the_route_reads_it() -> None:
    """A consumed credential is never forwarded: the option is an error there."""
    with pytest.raises(ValueError, match="forward_authorization"):
        RoutePolicy(
            "/x",
            [BasicAuthenticator(CONSUMERS)],
            upstream=Upstream(("ws://127.0.0.1:1/",)),
            forward_authorization=True,
        )
    base = {
        "path": "/x",
        "upstream": "ws://127.0.0.1:1/",
        "auth": ["basic"],
        "forward_authorization": True,
    }
    with pytest.raises(ConfigError) as caught:
        parse({"route": [base]})
    assert caught.value.path == "route[0].forward_authorization"
    assert "Authorization" in str(caught.value)


def test_forward_options_config() -> None:
    """Defaults off; booleans; only on gateway routes."""
    gateway_route = {"path": "/x", "upstream": "ws://127.0.0.1:1/", "auth": ["anonymous"]}
    route = parse({"route": [gateway_route]}).policy.routes[0]
    assert (route.forward_cookie, route.forward_authorization) == (False, False)
    route = parse(
        {"route": [{**gateway_route, "forward_cookie": True, "forward_authorization": True}]}
    ).policy.routes[0]
    assert (route.forward_cookie, route.forward_authorization) == (True, True)
    with pytest.raises(ConfigError) as caught:
        parse({"route": [{**gateway_route, "forward_cookie": "yes"}]})
    assert str(caught.value) == "route[0].forward_cookie: expected boolean"
    app_route = {"path": "/x", "app": "echo", "auth": ["anonymous"], "forward_cookie": False}
    with pytest.raises(ConfigError) as caught:
        parse({"route": [app_route]})
    assert str(caught.value) == "route[0].forward_cookie: only applies to routes with an upstream"


@pytest_twisted.ensureDeferred
async def test_ticket_query_parameter_never_reaches_the_upstream(serve: Serve) -> None:
    """
    A route without tickets, and no method reading C{ticket}: a one-time
    ticket sent in the query is still a credential and is removed; every
    other byte of the query is as sent.
    """
    backend = BackendFactory()
    key = KeyAuthenticator(CONSUMERS)
    route = RoutePolicy("/ws", [key], upstream=Upstream((ws_url(serve(backend)),)))
    port = serve(SecureServerFactory(ServerPolicy([route], ping_interval=0)))
    query = "a=%2F+b&ticket=LIVE-TICKET-VALUE&x=1&ticket&Ticket=T"
    request = upgrade_request(f"/ws?{query}", f"apikey: {KEY}")
    assert (await aio(handshake(port, request))).startswith(b"HTTP/1.1 101 ")
    assert received(backend)[0] == b"GET /ws?a=%2F+b&x=1&Ticket=T HTTP/1.1"
    assert b"LIVE-TICKET-VALUE" not in backend.last.raw
