"""
One-time tickets (routes with C{tickets = true}, txwssec.tickets): a plain
C{POST <path>} authenticated by the route's methods answers 201 with a
ticket; C{GET <path>?ticket=...} opens one session with it, once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import jwt
import pytest
import pytest_twisted
import websockets
from conftest import CapturedLog, aio, raw_exchange, upgrade_request
from websockets.exceptions import InvalidStatus

from txwssec import (
    Consumer,
    ConsumerDirectory,
    JWTAuthenticator,
    KeyAuthenticator,
    OriginPolicy,
    RoutePolicy,
    SecureServerFactory,
    SecureServerProtocol,
    ServerPolicy,
)
from txwssec.consumers import key_digest
from txwssec.store import MemoryStore
from txwssec.tickets import issue, redeem, ticket_key
from txwssec.types import Accept, HandshakeRequest, Principal

SECRET = "ticket-tests-hmac-secret-of-at-least-32-bytes"
KEY = "john-ticket-key"
ORIGIN = "https://app.example"
TIMEOUT = 10.0

Serve = Callable[[Any], int]


class WhoAmI(SecureServerProtocol):
    """Says who connected and how: C{consumer method expires_at}."""

    def onOpen(self) -> None:
        assert self.session is not None
        principal = self.session.principal
        self.sendMessage(
            f"{principal.consumer} {principal.method} {self.session.expires_at}".encode()
        )


def server(**options: Any) -> SecureServerFactory:
    consumers = ConsumerDirectory([Consumer("john", (key_digest(KEY),))])
    options.setdefault("tickets", True)
    route = RoutePolicy(
        "/chat",
        [KeyAuthenticator(consumers), JWTAuthenticator(consumers, SECRET)],
        protocol=WhoAmI,
        origins=OriginPolicy.from_list([ORIGIN]),
        **options,
    )
    return SecureServerFactory(ServerPolicy.single(route, ping_interval=0))


def post(path: str = "/chat", *headers: str, method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Length: 0", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return int(status_line.split(" ")[1]), headers, body


async def get_ticket(port: int, *headers: str) -> tuple[str, float]:
    status, _, body = split(await raw_exchange(port, post("/chat", f"apikey: {KEY}", *headers)))
    assert status == 201, body
    answer = json.loads(body)
    return answer["ticket"], answer["expires_in"]


async def open_with(port: int, ticket: str) -> str:
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/chat?ticket={ticket}", open_timeout=TIMEOUT, ping_interval=None
    ) as ws:
        greeting = await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert isinstance(greeting, str)
        return greeting


async def status_with(port: int, ticket: str) -> int:
    try:
        await open_with(port, ticket)
    except InvalidStatus as refused:
        return refused.response.status_code
    return 101


@pytest_twisted.ensureDeferred
async def test_ticket_works_once(serve: Serve, captured_log: CapturedLog) -> None:
    """
    POST with a key: 201, a JSON ticket and its lifetime (the route's
    ticket_ttl, 30). The ticket opens one session as john (method
    "ticket"); a second use, and an unknown ticket, get 401. The ticket
    never reaches the log.
    """
    port = serve(server())

    async def client() -> tuple[str, float, str, int, int]:
        ticket, expires_in = await get_ticket(port)
        greeting = await open_with(port, ticket)
        again = await status_with(port, ticket)
        unknown = await status_with(port, "A" * 43)
        return ticket, expires_in, greeting, again, unknown

    ticket, expires_in, greeting, again, unknown = await aio(client())
    assert len(ticket) == 43  # 256 bits, base64url
    assert expires_in == 30
    assert greeting == "john ticket None"
    assert (again, unknown) == (401, 401)
    assert ticket not in captured_log.text()


@pytest_twisted.ensureDeferred
async def test_response_head(serve: Serve) -> None:
    """The 201's exact head: JSON, not cached, the connection closed."""
    port = serve(server())
    status, headers, body = split(await aio(raw_exchange(port, post("/chat", f"apikey: {KEY}"))))
    assert status == 201
    assert headers == {
        "content-length": str(len(body)),
        "connection": "close",
        "cache-control": "no-store",
        "content-type": "application/json",
    }
    assert set(json.loads(body)) == {"ticket", "expires_in"}


@pytest_twisted.ensureDeferred
async def test_ttl_bounded_by_the_credential(serve: Serve) -> None:
    """
    A JWT valid 5 s more gets a ticket for at most 5 s, and the session
    it opens ends at the JWT's exp.
    """
    port = serve(server())
    exp = int(time.time()) + 5
    issued = jwt.encode({"sub": "john", "exp": exp}, SECRET, algorithm="HS256")

    async def client() -> tuple[int, dict[str, Any], str]:
        response = await raw_exchange(port, post("/chat", f"Authorization: Bearer {issued}"))
        status, _, body = split(response)
        answer = json.loads(body)
        return status, answer, await open_with(port, answer["ticket"])

    status, answer, greeting = await aio(client())
    assert status == 201
    assert 0 < answer["expires_in"] <= 5
    assert greeting == f"john ticket {float(exp)}"


@pytest_twisted.ensureDeferred
async def test_expired_ticket(serve: Serve) -> None:
    """A ticket not used within ticket_ttl (1 s here) gets 401."""
    port = serve(server(ticket_ttl=1))

    async def client() -> int:
        ticket, expires_in = await get_ticket(port)
        assert expires_in == 1
        await asyncio.sleep(1.1)
        return await status_with(port, ticket)

    assert await aio(client()) == 401


@pytest_twisted.ensureDeferred
async def test_concurrent_redemption(serve: Serve) -> None:
    """Of ten handshakes sent at once with one ticket, exactly one opens."""
    port = serve(server())

    async def client() -> list[int]:
        ticket, _ = await get_ticket(port)
        request = upgrade_request(f"/chat?ticket={ticket}")
        answers = await asyncio.gather(
            *(raw_exchange(port, request, timeout=2) for _ in range(10)),
            return_exceptions=True,
        )
        statuses = []
        for answer in answers:
            if isinstance(answer, BaseException):
                statuses.append(101)  # the open one: the server keeps it open
            else:
                statuses.append(int(answer.split(b" ")[1]))
        return sorted(statuses)

    assert await aio(client()) == [101] + [401] * 9


def test_store_keeps_hashes_only() -> None:
    """The store holds the ticket's SHA-256, never the ticket; take is once."""
    store = MemoryStore()
    consumers = ConsumerDirectory([Consumer("john", (key_digest(KEY),))])
    route = RoutePolicy("/chat", [KeyAuthenticator(consumers)], tickets=True)
    issuer = Principal("john", "key", key=key_digest(KEY))
    ticket, ttl = issue(store, route, Accept(issuer), 100.0)
    assert ttl == 30
    assert ticket not in repr(store.__dict__)
    assert ticket_key(ticket) in repr(store.__dict__)
    request = HandshakeRequest("tcp4:1.2.3.4:5", "1.2.3.4", "/chat", {"ticket": (ticket,)}, (), ())
    accept = redeem(store, route, request, 101.0)
    assert accept is not None
    assert accept.principal == Principal("john", "ticket", issued_by="key")
    assert accept.principal.key == key_digest(KEY)  # (the issuer's: a reload checks it)
    assert accept.credential.query == "ticket"
    with pytest.raises(Exception, match="unknown, used or expired"):
        redeem(store, route, request, 101.0)


def test_ticket_keeps_the_issuers_identity() -> None:
    """
    A redeemed ticket's principal has the issuing token's jti, iat and exp
    (no other claim) and its key; once the route's methods no longer know
    that key (a reload), the ticket does not open.
    """
    store = MemoryStore()
    consumers = ConsumerDirectory([Consumer("john", (key_digest(KEY),))])
    method = JWTAuthenticator(consumers, SECRET)
    route = RoutePolicy("/chat", [method], tickets=True)
    claims = {"sub": "john", "jti": "A", "iat": 90, "exp": 200, "scope": "chat"}
    issuer = Principal("john", "jwt", claims, key=method.key_digest)
    request = HandshakeRequest("tcp4:1.2.3.4:5", "1.2.3.4", "/chat", {}, (), ())
    tickets = [issue(store, route, Accept(issuer, expires_at=200.0), 100.0)[0] for _ in "12"]
    accept = redeem(store, route, replace(request, query={"ticket": (tickets[0],)}), 101.0)
    assert accept is not None
    assert accept.principal == Principal(
        "john", "ticket", {"jti": "A", "iat": 90, "exp": 200}, issued_by="jwt"
    )
    assert accept.principal.key == method.key_digest
    rotated = RoutePolicy("/chat", [JWTAuthenticator(consumers, SECRET + "-new")], tickets=True)
    with pytest.raises(Exception, match="no longer accepted"):
        redeem(store, rotated, replace(request, query={"ticket": (tickets[1],)}), 101.0)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (post("/chat"), 401),  # no credential
        (post("/chat", "apikey: wrong-key"), 401),
        (post("/chat", f"apikey: {KEY}", "Origin: https://evil.example"), 403),
        (post("/nowhere", f"apikey: {KEY}"), 405),  # no route: as without tickets
    ],
)
@pytest_twisted.ensureDeferred
async def test_refused_posts(serve: Serve, request_bytes: bytes, status: int) -> None:
    """Refusals as for a handshake; no CORS header for another origin."""
    port = serve(server())
    answer, headers, _ = split(await aio(raw_exchange(port, request_bytes)))
    assert answer == status
    assert "access-control-allow-origin" not in headers
    if status == 401:
        assert "www-authenticate" in headers


@pytest_twisted.ensureDeferred
async def test_route_without_tickets(serve: Serve) -> None:
    """
    tickets = false (the default): POST gets 405 as before, OPTIONS too, and
    ?ticket= is no credential.
    """
    port = serve(server(tickets=False))
    for method in ("POST", "OPTIONS"):
        request = post("/chat", f"apikey: {KEY}", f"Origin: {ORIGIN}", method=method)
        status, headers, _ = split(await aio(raw_exchange(port, request)))
        assert status == 405
        assert not [name for name in headers if name.startswith("access-control")]
    assert await aio(status_with(port, "A" * 43)) == 401


@pytest_twisted.ensureDeferred
async def test_cors(serve: Serve) -> None:
    """
    From the allowed origin: the preflight gets 204 naming POST and the
    methods' headers, the POST and a refusal its origin back; from another
    origin, no CORS header at all.
    """
    port = serve(server())
    preflight = post(
        "/chat",
        f"Origin: {ORIGIN}",
        "Access-Control-Request-Method: POST",
        "Access-Control-Request-Headers: apikey",
        method="OPTIONS",
    )
    status, headers, body = split(await aio(raw_exchange(port, preflight)))
    assert status == 204 and body == b""
    assert headers["access-control-allow-origin"] == ORIGIN
    assert headers["access-control-allow-methods"] == "POST"
    assert headers["access-control-allow-headers"] == "apikey, authorization"
    assert headers["vary"] == "Origin"
    allowed = post("/chat", f"apikey: {KEY}", f"Origin: {ORIGIN}")
    status, headers, _ = split(await aio(raw_exchange(port, allowed)))
    assert (status, headers["access-control-allow-origin"]) == (201, ORIGIN)
    unauthenticated = post("/chat", f"Origin: {ORIGIN}")
    status, headers, _ = split(await aio(raw_exchange(port, unauthenticated)))
    assert (status, headers["access-control-allow-origin"]) == (401, ORIGIN)
    other = post("/chat", "Origin: https://evil.example", method="OPTIONS")
    status, headers, _ = split(await aio(raw_exchange(port, other)))
    assert status == 403
    assert not [name for name in headers if name.startswith("access-control")]


# -- configuration -------------------------------------------------------------


def _config(**route: Any) -> dict[str, Any]:
    return {
        "auth": {"key": {}},
        "consumer": [{"name": "john", "keys": [KEY]}],
        "route": [{"path": "/chat", "app": "echo", "auth": ["key"], **route}],
    }


def test_config_defaults() -> None:
    """refresh, tickets off; notice 30 s; ticket_ttl 30 s."""
    from txwssec.config import parse

    route = parse(_config()).policy.routes[0]
    assert (route.refresh, route.refresh_notice, route.tickets, route.ticket_ttl) == (
        False,
        30,
        False,
        30,
    )


def test_config_values() -> None:
    from txwssec.config import parse

    route = parse(
        _config(refresh=True, refresh_notice=0, tickets=True, ticket_ttl=12.5)
    ).policy.routes[0]
    assert (route.refresh, route.refresh_notice, route.tickets, route.ticket_ttl) == (
        True,
        0,
        True,
        12.5,
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"refresh": "yes"}, "route[0].refresh: expected boolean"),
        ({"refresh_notice": "30"}, "route[0].refresh_notice: expected number"),
        ({"refresh_notice": -1}, "route[0].refresh_notice: must be at least 0"),
        ({"tickets": 1}, "route[0].tickets: expected boolean"),
        ({"ticket_ttl": "30"}, "route[0].ticket_ttl: expected number"),
        ({"ticket_ttl": 0}, "route[0].ticket_ttl: must be at least 1"),
        ({"ticket_ttl": 301}, "route[0].ticket_ttl: must be at most 300 seconds"),
    ],
)
def test_config_errors(options: dict[str, Any], message: str) -> None:
    from txwssec.config import parse
    from txwssec.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        parse(_config(**options))
    assert str(raised.value).startswith(message)


# -- a gateway route -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ticket_on_a_gateway_route(serve: Serve) -> None:
    """
    A ticket opens a gateway session; the upstream's request carries no
    ticket (the parameter is a consumed credential) and names the consumer.
    """
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

    from txwssec.policy import Upstream

    seen: list[tuple[str, dict[str, Any], str | None]] = []

    class Recording(WebSocketServerProtocol):
        def onConnect(self, request: Any) -> None:
            seen.append(
                (request.path, dict(request.params), request.headers.get("x-consumer-username"))
            )

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.sendMessage(payload, isBinary)

    upstream = WebSocketServerFactory()
    upstream.protocol = Recording
    upstream.setProtocolOptions(autoPingInterval=0)
    upstream_port = serve(upstream)
    consumers = ConsumerDirectory([Consumer("john", (key_digest(KEY),))])
    route = RoutePolicy(
        "/chat",
        [KeyAuthenticator(consumers)],
        tickets=True,
        upstream=Upstream((f"ws://127.0.0.1:{upstream_port}/up",)),
    )
    port = serve(SecureServerFactory(ServerPolicy.single(route, ping_interval=0)))

    async def client() -> Any:
        ticket, _ = await get_ticket(port)
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/chat?ticket={ticket}&room=1", open_timeout=TIMEOUT
        ) as ws:
            await ws.send("through")
            return ticket, await asyncio.wait_for(ws.recv(), TIMEOUT)

    ticket, echoed = await aio(client())
    assert echoed == "through"
    assert seen == [("/up", {"room": ["1"]}, "john")]
    assert ticket not in repr(seen)


# -- a ticket stands for its issuing credential: revocations, reloads ---------


def token_of(jti: str, iat: float) -> str:
    """john's JWT with C{jti} and C{iat}, for a minute."""
    claims = {"sub": "john", "jti": jti, "iat": int(iat), "exp": int(time.time() + 60)}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def ticket_for(port: int, header: str) -> str:
    """A ticket for the credential in C{header} (only)."""
    status, _, body = split(await raw_exchange(port, post("/chat", header)))
    assert status == 201, body
    ticket: str = json.loads(body)["ticket"]
    return ticket


def revoke(factory: SecureServerFactory, now: float) -> None:
    """Revoke jti "A", and john's tokens issued before C{now - 100}."""
    factory.revocations.revoke_token("A", now + 3600)
    factory.revocations.revoke_consumer("john", now - 100)


@pytest_twisted.ensureDeferred
async def test_revoked_token_gets_no_ticket(serve: Serve) -> None:
    """
    POST with a revoked token (its jti, or issued before its consumer's
    revocation): 401, as its handshake would be; another token: 201.
    """
    factory = server()
    port = serve(factory)
    now = time.time()
    revoke(factory, now)

    async def client() -> list[int]:
        statuses = []
        for jti, iat in (("A", now - 50), ("C", now - 200), ("B", now - 50)):
            authorization = f"Authorization: Bearer {token_of(jti, iat)}"
            statuses.append(split(await raw_exchange(port, post("/chat", authorization)))[0])
        return statuses

    assert await aio(client()) == [401, 401, 201]


@pytest_twisted.ensureDeferred
async def test_ticket_of_a_token_revoked_since_does_not_open(serve: Serve) -> None:
    """
    Tickets issued before their token was revoked (its jti, or its
    consumer's tokens issued before a time) get 401 when redeemed; a ticket
    of a token that is not revoked opens, as john (method "ticket").
    """
    factory = server()
    port = serve(factory)
    now = time.time()

    async def client() -> list[Any]:
        tickets = []
        for jti, iat in (("A", now - 50), ("C", now - 200), ("B", now - 50)):
            tickets.append(await ticket_for(port, f"Authorization: Bearer {token_of(jti, iat)}"))
        revoke(factory, now)
        return [
            await status_with(port, tickets[0]),
            await status_with(port, tickets[1]),
            await open_with(port, tickets[2]),
        ]

    expires = float(jwt.decode(token_of("B", now), options={"verify_signature": False})["exp"])
    answers = await aio(client())
    assert answers[:2] == [401, 401]
    assert answers[2].split(" ")[:2] == ["john", "ticket"]
    assert abs(float(answers[2].split(" ")[2]) - expires) <= 1


@pytest_twisted.ensureDeferred
async def test_revocation_closes_ticket_sessions(serve: Serve) -> None:
    """
    POST /revocations closes (3003) the sessions opened with tickets of the
    revoked tokens, as those of the tokens themselves; others stay.
    """
    from txwssec.ops import Metrics, admin_site, token_digest

    factory = server()
    port = serve(factory)
    admin = serve(admin_site(factory, Metrics(factory).registry, token_digest("admin-0123456789")))
    now = time.time()

    async def http(body: dict[str, Any]) -> tuple[int, Any]:
        data = json.dumps(body).encode()
        head = (
            "POST /revocations HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Authorization: Bearer admin-0123456789\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        status, _, answer = split(await raw_exchange(admin, head.encode() + data))
        return status, json.loads(answer)

    async def client() -> list[Any]:
        sockets = []
        for jti, iat in (("A", now - 50), ("C", now - 200), ("B", now - 50)):
            ticket = await ticket_for(port, f"Authorization: Bearer {token_of(jti, iat)}")
            ws = await websockets.connect(
                f"ws://127.0.0.1:{port}/chat?ticket={ticket}", ping_interval=None
            )
            await asyncio.wait_for(ws.recv(), TIMEOUT)  # the greeting
            sockets.append(ws)
        first = await http({"jti": "A", "expires_at": now + 3600})
        await asyncio.wait_for(sockets[0].wait_closed(), TIMEOUT)
        second = await http({"consumer": "john", "issued_before": now - 100})
        await asyncio.wait_for(sockets[1].wait_closed(), TIMEOUT)
        codes = [sockets[0].close_code, sockets[1].close_code, sockets[2].close_code]
        await sockets[2].close()
        return [first, second, codes]

    assert await aio(client()) == [(200, {"closed": 1}), (200, {"closed": 1}), [3003, 3003, None]]


RELOAD_CONFIG = """
[server]
listen = ["tcp:0:interface=127.0.0.1"]

[auth.key]
header = "apikey"

[[consumer]]
name = "john"
keys = [{keys}]

[[route]]
path = "/chat"
app = "echo"
auth = ["key"]
tickets = true
"""


@pytest_twisted.ensureDeferred
async def test_reload_removing_a_key_ends_its_tickets(serve: Serve, tmp_path: Any) -> None:
    """
    A reload that removes the API key a ticket was issued with closes the
    ticket's session (3003) as it closes the key's own, and the key's
    unredeemed ticket no longer opens (401); another key's ticket session
    stays open.
    """
    from txwssec.config import load
    from txwssec.lifecycle import reload

    path = tmp_path / "tickets.toml"
    path.write_text(RELOAD_CONFIG.format(keys=f'"{KEY}", "kept-key"'))
    current = load(path)
    factory = SecureServerFactory(current.policy)
    port = serve(factory)

    async def client() -> list[Any]:
        def ticket_url(ticket: str) -> str:
            return f"ws://127.0.0.1:{port}/chat?ticket={ticket}"

        by_key = await websockets.connect(
            f"ws://127.0.0.1:{port}/chat", additional_headers={"apikey": KEY}, ping_interval=None
        )
        removed = await websockets.connect(ticket_url((await get_ticket(port))[0]))
        kept = await websockets.connect(ticket_url(await ticket_for(port, "apikey: kept-key")))
        unredeemed, _ = await get_ticket(port)
        path.write_text(RELOAD_CONFIG.format(keys='"kept-key"'))
        reload(path, [factory], current)
        await asyncio.wait_for(by_key.wait_closed(), TIMEOUT)
        await asyncio.wait_for(removed.wait_closed(), TIMEOUT)
        late = await status_with(port, unredeemed)
        await kept.send("still here")
        echoed = await asyncio.wait_for(kept.recv(), TIMEOUT)
        await kept.close()
        return [by_key.close_code, removed.close_code, late, echoed]

    assert await aio(client()) == [3003, 3003, 401, "still here"]
