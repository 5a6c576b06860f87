"""
In-band refresh (routes with C{refresh = true}, txwssec.refresh): real
servers on 127.0.0.1, real clients (C{websockets}), short-lived JWTs
(seconds, so that a session outliving its first token takes seconds, not
minutes).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
import pytest_twisted
import websockets
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from conftest import aio
from twisted.internet import reactor
from twisted.internet.task import deferLater
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from txwssec import (
    Consumer,
    ConsumerDirectory,
    JWTAuthenticator,
    KeyAuthenticator,
    RoutePolicy,
    SecureServerFactory,
    SecureServerProtocol,
    ServerPolicy,
)
from txwssec.apps.echo import EchoProtocol
from txwssec.client import BearerToken, SecureClientFactory, SecureClientProtocol
from txwssec.consumers import key_digest
from txwssec.policy import Upstream
from txwssec.refresh import (
    MAX_REFRESH_BYTES,
    ConsumerChanged,
    RefreshRejected,
    is_refresh,
    read_token,
)

SECRET = "refresh-tests-hmac-secret-of-at-least-32-bytes"
JOHN_KEY = "john-refresh-key"
TIMEOUT = 15.0

Serve = Callable[[Any], int]


def directory() -> ConsumerDirectory:
    return ConsumerDirectory([Consumer("john", (key_digest(JOHN_KEY),)), Consumer("mary", ())])


def token(sub: str = "john", lifetime: float = 60, secret: str = SECRET) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + lifetime)}, secret, algorithm="HS256")


def exp_of(jwt_token: str) -> int:
    return int(jwt.decode(jwt_token, options={"verify_signature": False})["exp"])


def route(path: str = "/echo", **options: Any) -> RoutePolicy:
    consumers = directory()
    options.setdefault("protocol", EchoProtocol)
    return RoutePolicy(
        path,
        [KeyAuthenticator(consumers), JWTAuthenticator(consumers, SECRET)],
        **options,
    )


def server(*routes: RoutePolicy) -> SecureServerFactory:
    factory = SecureServerFactory(ServerPolicy(routes=tuple(routes), ping_interval=0))
    return factory


def seen_events(factory: SecureServerFactory) -> list[tuple[str, dict[str, Any]]]:
    seen: list[tuple[str, dict[str, Any]]] = []
    factory.events.add(lambda name, fields: seen.append((name, dict(fields))))
    return seen


async def connect(port: int, jwt_token: str, path: str = "/echo") -> ClientConnection:
    return await websockets.connect(
        f"ws://127.0.0.1:{port}{path}",
        additional_headers={"Authorization": f"Bearer {jwt_token}"},
        open_timeout=TIMEOUT,
        ping_interval=None,
    )


def refresh_message(credential: Any) -> str:
    return json.dumps({"type": "wssec.refresh", "token": credential})


async def ask(ws: ClientConnection, message: str) -> Any:
    await ws.send(message)
    reply = await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert isinstance(reply, str)
    return json.loads(reply)


async def closed(ws: ClientConnection) -> tuple[int, str]:
    try:
        async with asyncio.timeout(TIMEOUT):
            while True:
                await ws.recv()
    except ConnectionClosed as error:
        assert error.rcvd is not None
        return error.rcvd.code, error.rcvd.reason
    raise AssertionError("unreachable")


# -- what a refresh message is -------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type": "wssec.refresh", "token": "x"}',
        b'{"type":"wssec.refresh","token":"x"}',
        b'  \n{ "type" : "wssec.refresh" }',
        b'{"type": "wssec.refresh", "token": 5}',
        b'{"type": "wssec.refresh", "token": "x"' + b"x" * MAX_REFRESH_BYTES,
    ],
)
def test_is_refresh(payload: bytes) -> None:
    """A JSON object whose first member is "type": "wssec.refresh"."""
    assert is_refresh(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type": "wssec.refreshed", "token": "x"}',
        b'{"token": "x", "type": "wssec.refresh"}',
        b'["wssec.refresh"]',
        b"wssec.refresh",
        b'{"type": "chat", "text": "{\\"type\\": \\"wssec.refresh\\"}"}',
        b"",
    ],
)
def test_is_not_refresh(payload: bytes) -> None:
    """Anything else is an ordinary message."""
    assert not is_refresh(payload)


@pytest.mark.parametrize(
    ("payload", "outcome"),
    [
        (b'{"type": "wssec.refresh", "token": "x"' + b" " * MAX_REFRESH_BYTES + b"}", "too_large"),
        (b'{"type": "wssec.refresh", "token": "secret-tok', "malformed"),
        (b'{"type": "wssec.refresh"}', "malformed"),
        (b'{"type": "wssec.refresh", "token": 5}', "malformed"),
        (b'{"type": "wssec.refresh", "token": ""}', "malformed"),
        (b'{"type": "wssec.refresh", "token": null}', "malformed"),
    ],
)
def test_read_token_rejects(payload: bytes, outcome: str) -> None:
    """Malformed refresh messages are rejected with a fixed reason."""
    with pytest.raises(RefreshRejected) as raised:
        read_token(payload)
    assert raised.value.outcome == outcome
    assert "secret-tok" not in raised.value.reason + raised.value.detail


# -- an application route ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_refreshed_three_times_outlives_first_token(serve: Serve) -> None:
    """
    A session opened with a token valid 2 s is refreshed three times (one
    per second: the rate limit) with tokens valid 3 s: it is still open
    (echoing) after the first token's expiry, each answer names the new
    token's exp, and it finally closes 3000 when the last one expires.
    """
    factory = server(route(refresh=True, refresh_notice=0))
    seen = seen_events(factory)
    port = serve(factory)
    first = token(lifetime=2)

    async def client() -> tuple[list[Any], tuple[int, str]]:
        ws = await connect(port, first)
        answers = []
        for index in range(3):
            if index:
                await asyncio.sleep(1.05)
            fresh = token(lifetime=3)
            answer = await ask(ws, refresh_message(fresh))
            assert answer == {"type": "wssec.refreshed", "expires_at": exp_of(fresh)}
            answers.append(answer)
        await asyncio.sleep(max(0.0, exp_of(first) - time.time()) + 0.2)
        await ws.send("still here")
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "still here"
        return answers, await closed(ws)

    answers, close = await aio(client())
    assert close == (3000, "credentials expired")
    assert len(answers) == 3
    refreshed = [fields for name, fields in seen if name == "session.refreshed"]
    assert [fields["outcome"] for fields in refreshed] == ["refreshed"] * 3
    assert refreshed[-1]["consumer"] == "john"
    assert refreshed[-1]["method"] == "jwt"


@pytest_twisted.ensureDeferred
async def test_refresh_with_a_key(serve: Serve) -> None:
    """
    A key (the route's first method) refreshes too: it has no expiry, so
    the session has none any more (expires_at null).
    """
    port = serve(server(route(refresh=True, refresh_notice=0)))

    async def client() -> Any:
        async with await connect(port, token(lifetime=30)) as ws:
            return await ask(ws, refresh_message(JOHN_KEY))

    assert await aio(client()) == {"type": "wssec.refreshed", "expires_at": None}


@pytest_twisted.ensureDeferred
async def test_refresh_message_on_a_route_without_refresh(serve: Serve) -> None:
    """With refresh = false (the default) it is an ordinary message: echoed."""
    port = serve(server(route()))
    message = refresh_message(token())

    async def client() -> Any:
        async with await connect(port, token()) as ws:
            await ws.send(message)
            return await asyncio.wait_for(ws.recv(), TIMEOUT)

    assert await aio(client()) == message


class Recorder(SecureServerProtocol):
    """Records the messages the application receives; echoes them."""

    received: list[bytes] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        Recorder.received.append(payload)
        self.sendMessage(payload, isBinary)


@pytest_twisted.ensureDeferred
async def test_rejections_leave_the_session_as_it_was(serve: Serve) -> None:
    """
    Malformed messages, a bad credential and a second refresh within the
    second are each answered with a fixed reason (the token is never
    echoed), none reaches the application, and the session keeps its
    expiry and stays open. A bad credential counts as an authentication
    failure of the address.
    """
    Recorder.received = []
    factory = server(route(refresh=True, refresh_notice=0, protocol=Recorder))
    seen = seen_events(factory)
    port = serve(factory)
    first = token(lifetime=30)
    forged = token(lifetime=60, secret="another-secret-of-at-least-32-bytes-long")

    async def client() -> list[Any]:
        ws = await connect(port, first)
        answers = [
            await ask(ws, '{"type": "wssec.refresh", "token": "secret-tok'),
            await ask(ws, '{"type": "wssec.refresh"}'),
            await ask(ws, '{"type": "wssec.refresh", "token": ["secret-tok"]}'),
            await ask(ws, '{"type": "wssec.refresh", "token": "' + "x" * MAX_REFRESH_BYTES + '"}'),
            await ask(ws, refresh_message(forged)),
            await ask(ws, refresh_message(token(lifetime=60))),
        ]
        await ws.send("ordinary")
        answers.append(await asyncio.wait_for(ws.recv(), TIMEOUT))
        await ws.close()
        return answers

    answers = await aio(client())
    assert answers[:6] == [
        {"type": "wssec.refresh_rejected", "reason": "malformed refresh message"},
        {"type": "wssec.refresh_rejected", "reason": "malformed refresh message"},
        {"type": "wssec.refresh_rejected", "reason": "malformed refresh message"},
        {"type": "wssec.refresh_rejected", "reason": "message too large"},
        {"type": "wssec.refresh_rejected", "reason": "invalid credential"},
        {"type": "wssec.refresh_rejected", "reason": "too many refreshes"},
    ]
    assert answers[6] == "ordinary"
    assert Recorder.received == [b"ordinary"]
    outcomes = [f["outcome"] for name, f in seen if name == "session.refresh_rejected"]
    assert outcomes == [
        *("malformed", "malformed", "malformed", "too_large", "invalid", "rate_limited")
    ]
    assert not [name for name, _ in seen if name == "session.refreshed"]
    assert "secret-tok" not in repr(seen) and forged not in repr(seen)
    assert len(factory.admission.auth_failures) == 1  # the address failed once


def claimed(sub: str = "john", **claims: Any) -> str:
    """A JWT of C{sub} with C{claims} (C{jti}, C{iat}) that expires in a minute."""
    payload = {"sub": sub, "exp": int(time.time() + 60), **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


@pytest_twisted.ensureDeferred
async def test_revoked_tokens_do_not_refresh(serve: Serve) -> None:
    """
    A token whose jti is revoked, and a token issued before its consumer's
    revocation, are invalid credentials for a refresh (as for a handshake):
    rejected, counted as failed authentications, and the session keeps
    its principal (the token it opened with). The Python API says the same.
    """
    factory = server(route(refresh=True, refresh_notice=0))
    seen = seen_events(factory)
    port = serve(factory)
    now = time.time()
    factory.revocations.revoke_token("A", now + 3600)
    factory.revocations.revoke_consumer("john", now - 100)
    revoked = (claimed(jti="A", iat=int(now - 50)), claimed(jti="C", iat=int(now - 200)))

    async def client() -> list[Any]:
        sockets = [await connect(port, claimed(jti="B", iat=int(now - 50))) for _ in revoked]
        answers = [
            await ask(ws, refresh_message(t)) for ws, t in zip(sockets, revoked, strict=True)
        ]
        for ws in sockets:
            await ws.close()
        return answers

    answers = await aio(client())
    assert answers == [{"type": "wssec.refresh_rejected", "reason": "invalid credential"}] * 2
    outcomes = [f["outcome"] for name, f in seen if name == "session.refresh_rejected"]
    assert outcomes == ["invalid", "invalid"]
    assert not [name for name, _ in seen if name == "session.refreshed"]
    assert len(factory.admission.auth_failures) == 1  # the address failed


@pytest_twisted.ensureDeferred
async def test_revoked_token_keeps_the_principal(serve: Serve) -> None:
    """After a rejected refresh, the session's principal is its first token's."""
    factory = server(route(protocol=ApiRefresh))
    port = serve(factory)
    factory.revocations.revoke_token("A", time.time() + 3600)

    async def client() -> tuple[Any, list[str]]:
        ws = await connect(port, claimed(jti="B"))
        await ws.send(claimed(jti="A"))
        answer = await asyncio.wait_for(ws.recv(), TIMEOUT)
        jtis = [live.session.principal.claims["jti"] for live in factory.registry]
        await ws.close()
        return answer, jtis

    assert await aio(client()) == ("rejected: invalid credential", ["B"])


@pytest_twisted.ensureDeferred
async def test_credential_of_another_consumer_closes_3003(serve: Serve) -> None:
    """A valid credential naming another consumer closes the session: 3003."""
    factory = server(route(refresh=True))
    seen = seen_events(factory)
    port = serve(factory)

    async def client() -> tuple[int, str]:
        ws = await connect(port, token("john"))
        await ws.send(refresh_message(token("mary")))
        return await closed(ws)

    assert await aio(client()) == (3003, "consumer changed")
    rejected = [f for name, f in seen if name == "session.refresh_rejected"]
    assert [f["outcome"] for f in rejected] == ["consumer_changed"]


@pytest_twisted.ensureDeferred
async def test_expiring_notice(serve: Serve) -> None:
    """
    wssec.expiring arrives refresh_notice seconds before the expiry (not
    sooner), once; after a refresh, again before the new expiry.
    """
    port = serve(server(route(refresh=True, refresh_notice=1)))
    first = token(lifetime=2)

    async def client() -> tuple[Any, float, Any, Any]:
        ws = await connect(port, first)
        notice = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        when = time.time()
        fresh = token(lifetime=3)
        answer = await ask(ws, refresh_message(fresh))
        second = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        await ws.close()
        return notice, when, answer, second

    notice, when, answer, second = await aio(client())
    assert notice == {"type": "wssec.expiring", "expires_at": exp_of(first)}
    assert when >= exp_of(first) - 1
    assert answer["type"] == "wssec.refreshed"
    assert second == {"type": "wssec.expiring", "expires_at": answer["expires_at"]}


class ApiRefresh(SecureServerProtocol):
    """Refreshes through the Python API: C{await session.refresh(credential)}."""

    async def onMessage(self, payload: bytes, isBinary: bool) -> None:
        assert self.session is not None
        try:
            expires_at = await self.session.refresh(payload.decode())
        except RefreshRejected as rejected:
            self.sendMessage(f"rejected: {rejected.reason}".encode())
        except ConsumerChanged:
            pass
        else:
            self.sendMessage(f"refreshed: {expires_at}".encode())


@pytest_twisted.ensureDeferred
async def test_python_api(serve: Serve) -> None:
    """
    C{await protocol.session.refresh(credential)}: the new expiry, or
    RefreshRejected with the session left as it was.
    """
    port = serve(server(route(protocol=ApiRefresh)))  # (refresh = false: messages only)
    fresh = token(lifetime=50)

    async def client() -> list[Any]:
        ws = await connect(port, token(lifetime=20))
        answers = []
        for message in (fresh, "not-a-credential"):
            await ws.send(message)
            answers.append(await asyncio.wait_for(ws.recv(), TIMEOUT))
        await ws.close()
        return answers

    assert await aio(client()) == [
        f"refreshed: {float(exp_of(fresh))}",
        "rejected: invalid credential",
    ]


# -- a gateway route -----------------------------------------------------------


class Upstream_(WebSocketServerProtocol):
    """An upstream that records what it receives and echoes it."""

    received: list[bytes] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        Upstream_.received.append(payload)
        self.sendMessage(payload, isBinary)


def upstream_factory() -> WebSocketServerFactory:
    factory = WebSocketServerFactory()
    factory.protocol = Upstream_
    factory.setProtocolOptions(autoPingInterval=0)
    return factory


@pytest.mark.parametrize("compression", [False, True], ids=["relay", "autobahn"])
@pytest_twisted.ensureDeferred
async def test_gateway_refresh_never_reaches_upstream(serve: Serve, compression: bool) -> None:
    """
    Through a gateway route (the frame relay, and Autobahn's path when
    compression is on): a session refreshed three times outlives its first
    token; the upstream sees the ordinary messages only, never a refresh
    message, and a refresh split in two frames is consumed too.
    """
    Upstream_.received = []
    upstream_port = serve(upstream_factory())
    gateway = route(
        "/gw",
        protocol=None,
        refresh=True,
        refresh_notice=0,
        compression=compression,
        upstream=Upstream((f"ws://127.0.0.1:{upstream_port}/",)),
    )
    factory = server(gateway)
    seen = seen_events(factory)
    port = serve(factory)
    first = token(lifetime=2)

    async def client() -> list[Any]:
        ws = await websockets.connect(
            f"ws://127.0.0.1:{port}/gw",
            additional_headers={"Authorization": f"Bearer {first}"},
            open_timeout=TIMEOUT,
            ping_interval=None,
            compression="deflate" if compression else None,
        )
        answers = []
        for index in range(3):
            if index:
                await asyncio.sleep(1.05)
            await ws.send(f"before {index}")
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == f"before {index}"
            message = refresh_message(token(lifetime=3))
            if index == 2:
                await ws.send([message[:10], message[10:]])  # fragmented
                answers.append(json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)))
            else:
                answers.append(await ask(ws, message))
        await asyncio.sleep(max(0.0, exp_of(first) - time.time()) + 0.2)
        await ws.send("after")
        answers.append(await asyncio.wait_for(ws.recv(), TIMEOUT))
        await ws.close()
        return answers

    answers = await aio(client())
    assert [answer["type"] for answer in answers[:3]] == ["wssec.refreshed"] * 3
    assert answers[3] == "after"
    assert Upstream_.received == [b"before 0", b"before 1", b"before 2", b"after"]
    assert len([name for name, _ in seen if name == "session.refreshed"]) == 3


def test_relay_unmasks_exactly() -> None:
    """The relay's unmasking matches RFC 6455's (wsframes.apply_mask)."""
    import wsframes

    from txwssec.gateway.relay import _unmasked

    mask = b"\x01\x82\x13\xf4"
    for payload in (b"", b"a", b"abcd", b"abcde" * 7):
        data = b"xx" + mask + wsframes.apply_mask(payload, mask)
        assert _unmasked(data, 6, len(payload), 2) == payload
        assert _unmasked(data, 6, min(len(payload), 3), 2) == payload[:3]


# -- the Python client ---------------------------------------------------------


class RefreshingClient(SecureClientProtocol):
    """Records what reaches the application and the refresh answers."""

    def onOpen(self) -> None:
        self.messages: list[bytes] = []
        self.refreshed: list[float | None] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append(payload)

    def onRefreshed(self, expires_at: float | None) -> None:
        self.refreshed.append(expires_at)


@pytest_twisted.ensureDeferred
async def test_python_client_refreshes_on_its_own(serve: Serve) -> None:
    """
    SecureClientFactory(refresh=...): on each wssec.expiring (1 s ahead of
    the expiry) the client calls the callback (a coroutine here) and sends
    the new token; three refreshes later the session has outlived its
    first token, the application saw none of the refresh messages, and the
    session still echoes.
    """
    port = serve(server(route(refresh=True, refresh_notice=1)))
    first = token(lifetime=2)
    issued: list[str] = []

    async def new_token() -> str:
        fresh = token(lifetime=3.5)
        issued.append(fresh)
        return fresh

    factory = SecureClientFactory(
        f"ws://127.0.0.1:{port}/echo", BearerToken(first), refresh=new_token
    )
    factory.protocol = RefreshingClient
    protocol = await factory.connect()
    await protocol.opened
    assert isinstance(protocol, RefreshingClient)
    deadline = time.time() + TIMEOUT
    while len(protocol.refreshed) < 3 and time.time() < deadline:
        await deferLater(reactor, 0.05)
    assert len(protocol.refreshed) == 3, (protocol.refreshed, protocol.messages)
    assert time.time() > exp_of(first)
    protocol.sendMessage(b"still open")
    while not protocol.messages and time.time() < deadline:
        await deferLater(reactor, 0.05)
    assert protocol.messages == [b"still open"]
    assert protocol.refreshed[:3] == [float(exp_of(each)) for each in issued[:3]]
    protocol.sendClose(1000)
    await protocol.closed


@pytest_twisted.ensureDeferred
async def test_session_list_shows_the_new_expiry(serve: Serve) -> None:
    """The store's session list (what GET /sessions lists) gets the new expiry."""
    factory = server(route(refresh=True, refresh_notice=0))
    port = serve(factory)
    fresh = token(lifetime=90)

    async def client() -> tuple[list[Any], list[Any]]:
        ws = await connect(port, token(lifetime=30))
        before = [dict(each) for each in factory.admission.store.sessions()]
        await ask(ws, refresh_message(fresh))
        after = [dict(each) for each in factory.admission.store.sessions()]
        await ws.close()
        return before, after

    before, after = await aio(client())
    assert len(before) == len(after) == 1
    assert after[0]["expires_at"] == exp_of(fresh) != before[0]["expires_at"]
    assert after[0]["opened_at"] == before[0]["opened_at"] > 0
    assert after[0]["id"] == before[0]["id"]


# -- methods that ask an identity provider ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_refresh_with_jwks_and_introspection(serve: Serve, tmp_path: Any) -> None:
    """
    A route with JWKS keys and introspection (tests/idp.py, over HTTPS): a
    session opened with an opaque token is refreshed with a JWT signed by a
    JWKS key, then with another opaque token (both checked asynchronously);
    a revoked (inactive) opaque token is rejected, the session as it was.
    """
    from idp import IdentityProvider
    from test_introspect import introspection
    from test_jwks import authenticator, keys_of

    provider = IdentityProvider(tmp_path / "idp").start()
    try:
        key = provider.add_key("RS256")
        # (Each method in its own place: in a handshake the first method that
        # finds a credential decides. A refresh tries each method in turn.)
        methods = [
            authenticator(keys_of(provider)),
            introspection(provider, header="x-opaque", subprotocol="opaque"),
        ]
        policy = RoutePolicy(
            "/echo", methods, protocol=EchoProtocol, refresh=True, refresh_notice=0
        )
        port = serve(server(policy))
        first = provider.opaque("john", lifetime=30)
        signed = provider.sign(key, "john", lifetime=60)
        second = provider.opaque("john", lifetime=90)
        inactive = provider.opaque("john", lifetime=120)
        provider.tokens[inactive]["active"] = False

        async def client() -> list[Any]:
            ws = await websockets.connect(
                f"ws://127.0.0.1:{port}/echo",
                additional_headers={"x-opaque": first},
                open_timeout=TIMEOUT,
                ping_interval=None,
            )
            answers = [await ask(ws, refresh_message(signed))]
            await asyncio.sleep(1.05)
            answers.append(await ask(ws, refresh_message(second)))
            await asyncio.sleep(1.05)
            answers.append(await ask(ws, refresh_message(inactive)))
            await ws.close()
            return answers

        answers = await aio(client())
    finally:
        await provider.stop()
    assert answers == [
        {"type": "wssec.refreshed", "expires_at": exp_of(signed)},
        {"type": "wssec.refreshed", "expires_at": provider.tokens[second]["exp"]},
        {"type": "wssec.refresh_rejected", "reason": "invalid credential"},
    ]


@pytest_twisted.ensureDeferred
async def test_python_client_retries_a_rate_limited_refresh(serve: Serve) -> None:
    """
    Two refreshes sent at once: the server checks the first and rejects the
    second ("too many refreshes"); the client sends it again a second later
    on its own, and both end up refreshed.
    """
    port = serve(server(route(refresh=True, refresh_notice=0)))
    tokens = [token(lifetime=40), token(lifetime=50)]

    async def unused() -> str:
        raise AssertionError("no wssec.expiring on this route")

    factory = SecureClientFactory(
        f"ws://127.0.0.1:{port}/echo", BearerToken(token(lifetime=30)), refresh=unused
    )
    factory.protocol = RefreshingClient
    protocol = await factory.connect()
    await protocol.opened
    assert isinstance(protocol, RefreshingClient)
    for each in tokens:
        protocol.refresh(each)
    deadline = time.time() + TIMEOUT
    while len(protocol.refreshed) < 2 and time.time() < deadline:
        await deferLater(reactor, 0.05)
    assert protocol.refreshed == [float(exp_of(each)) for each in tokens]
    assert protocol.messages == []
    protocol.sendClose(1000)
    await protocol.closed


class FragmentingUpstream(WebSocketServerProtocol):
    """On C{!frag}: a text message in three frames, the last 0.3 s later."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if payload == b"!frag":
            self.beginMessage(isBinary=False)
            self.sendMessageFrame(b"part1-")
            reactor.callLater(0.3, self.finish)  # type: ignore[attr-defined]

    def finish(self) -> None:
        self.sendMessageFrame(b"part2")
        self.endMessage()


@pytest_twisted.ensureDeferred
async def test_gateway_answer_waits_for_a_relayed_message(serve: Serve) -> None:
    """
    A refresh answered while the upstream's fragmented message is being
    relayed to the client waits for that message's end (a data frame
    between its frames would be a protocol error for the client).
    """
    upstream = WebSocketServerFactory()
    upstream.protocol = FragmentingUpstream
    upstream.setProtocolOptions(autoPingInterval=0)
    upstream_port = serve(upstream)
    gateway = route(
        "/gw",
        protocol=None,
        refresh=True,
        refresh_notice=0,
        upstream=Upstream((f"ws://127.0.0.1:{upstream_port}/",)),
    )
    port = serve(server(gateway))
    fresh = token(lifetime=60)

    async def client() -> list[Any]:
        ws = await connect(port, token(lifetime=30), "/gw")
        await ws.send("!frag")
        await asyncio.sleep(0.1)
        await ws.send(refresh_message(fresh))
        received = [await asyncio.wait_for(ws.recv(), TIMEOUT) for _ in range(2)]
        await ws.close()
        return received

    assert await aio(client()) == [
        "part1-part2",
        json.dumps({"type": "wssec.refreshed", "expires_at": exp_of(fresh)}),
    ]
