"""
Log hygiene: refusals, acceptances and expiries are logged with named fields,
and no secret (API key, password, its Basic encoding, JWT, JWT signature,
signing secret) ever reaches the log, whether the credential was valid or not
and whichever way it was carried.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jwt
import pytest
import pytest_twisted
import websockets
from conftest import CapturedLog, aio, raw_exchange, upgrade_request
from twisted.logger import LogEvent, eventAsText, formatEvent
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from txwssec import (
    BasicAuthenticator,
    Consumer,
    ConsumerDirectory,
    JWTAuthenticator,
    KeyAuthenticator,
    RoutePolicy,
    SecureServerFactory,
    ServerPolicy,
    hash_password,
)
from txwssec.apps.echo import EchoProtocol
from txwssec.consumers import key_digest

JWT_SECRET = "logging-tests-jwt-signing-secret-0123456789"
WRONG_JWT_SECRET = "logging-tests-not-the-signing-secret-987654"
JOHN_KEY = "johnKEY-valid-7f3a91c2"
WRONG_KEY = "wrongKEY-invalid-5be04d18"
PASSWORD = "pw-Correct-Horse-81d2"
WRONG_PASSWORD = "pw-Wrong-Battery-44c9"

Serve = Callable[[Any], int]


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def make_token(secret: str = JWT_SECRET, exp: float | None = None, sub: str = "john") -> str:
    claims = {"sub": sub, "exp": time.time() + 60 if exp is None else exp}
    return jwt.encode(claims, secret, algorithm="HS256")


class Secrets:
    """Every secret a test sent, to be looked for in the log."""

    def __init__(self) -> None:
        self.values: set[str] = {JWT_SECRET, WRONG_JWT_SECRET}

    def add(self, *values: str) -> None:
        self.values.update(values)

    def token(self, secret: str = JWT_SECRET, exp: float | None = None, sub: str = "john") -> str:
        """A JWT, recorded with its signature part."""
        value = make_token(secret, exp, sub)
        self.add(value, value.rsplit(".", 1)[1])
        return value

    def basic(self, user: str, password: str) -> str:
        value = basic(user, password)
        self.add(password, value)
        return value


@pytest.fixture
def secrets() -> Iterator[Secrets]:
    yield Secrets()


def make_factory() -> SecureServerFactory:
    directory = ConsumerDirectory(
        [Consumer("john", (key_digest(JOHN_KEY),), hash_password(PASSWORD))]
    )
    methods = [
        KeyAuthenticator(directory, query="apikey"),
        BasicAuthenticator(directory),
        JWTAuthenticator(directory, JWT_SECRET, query="access_token"),
    ]
    return SecureServerFactory(
        # Many deliberate failures from 127.0.0.1: the brute-force limit
        # (tested in test_limits.py) would answer 429 before the method runs.
        ServerPolicy.single(
            RoutePolicy("/echo", methods, protocol=EchoProtocol), auth_failures_per_minute=0
        )
    )


async def accepted(
    port: int,
    headers: Mapping[str, str] | None = None,
    subprotocols: Sequence[str] | None = None,
    query: str = "",
) -> None:
    """Connect, echo once, close normally."""
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/echo{query}",
        additional_headers=dict(headers or {}),
        subprotocols=[Subprotocol(p) for p in subprotocols] if subprotocols else None,
        open_timeout=5,
    ) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"


async def refused(
    port: int,
    headers: Mapping[str, str] | None = None,
    subprotocols: Sequence[str] | None = None,
    query: str = "",
) -> int:
    """Connect expecting a refusal; return its status."""
    try:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/echo{query}",
            additional_headers=dict(headers or {}),
            subprotocols=[Subprotocol(p) for p in subprotocols] if subprotocols else None,
            open_timeout=5,
        ):
            pass
    except InvalidStatus as error:
        return int(error.response.status_code)
    raise AssertionError("handshake was accepted")


async def expired(port: int, token: str) -> tuple[int, str]:
    """Connect with a short-lived JWT in the subprotocol; wait for the close."""
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/echo",
        subprotocols=[Subprotocol("bearer"), Subprotocol(token)],
        open_timeout=5,
    ) as ws:
        try:
            async with asyncio.timeout(10):
                while True:
                    await ws.recv()
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code, closed.rcvd.reason
    raise AssertionError("unreachable")


def everything_logged(log: CapturedLog) -> str:
    """
    The captured log as text (the fixture's rendering), plus each event as
    text with its traceback and the repr of every event: a secret anywhere
    in an event is found.
    """
    parts = [log.text()]
    for event in log.events:
        parts.append(eventAsText(event, includeTraceback=True))
        parts.append(repr(event))
    return "\n".join(parts)


def assert_no_secret(log: CapturedLog, secrets: Secrets) -> None:
    text = everything_logged(log)
    leaked = sorted(s for s in secrets.values if s in text)
    assert leaked == [], f"secrets in the log: {leaked}"


def refusal_events(log: CapturedLog, status: int) -> list[LogEvent]:
    return [e for e in log.matching(status=status) if "reason" in e]


@pytest_twisted.ensureDeferred
async def test_no_secret_in_log(serve: Serve, captured_log: CapturedLog, secrets: Secrets) -> None:
    """
    A series of valid and invalid handshakes carrying every kind of secret,
    each way it may be carried, and one session expiry: none of the secret
    strings appears anywhere in the captured log.
    """
    factory = make_factory()
    port = serve(factory)
    secrets.add(JOHN_KEY, WRONG_KEY, PASSWORD, WRONG_PASSWORD)

    # API keys: header, Sec-WebSocket-Protocol, query string.
    await aio(accepted(port, {"apikey": JOHN_KEY}))
    assert await aio(refused(port, {"apikey": WRONG_KEY})) == 401
    await aio(accepted(port, subprotocols=["token", JOHN_KEY]))
    assert await aio(refused(port, subprotocols=["token", WRONG_KEY])) == 401
    await aio(accepted(port, query=f"?apikey={JOHN_KEY}"))
    assert await aio(refused(port, query=f"?apikey={WRONG_KEY}")) == 401

    # HTTP Basic: right and wrong password, unknown user.
    good = secrets.basic("john", PASSWORD)
    bad = secrets.basic("john", WRONG_PASSWORD)
    stranger = secrets.basic("nobody", PASSWORD)
    await aio(accepted(port, {"Authorization": f"Basic {good}"}))
    assert await aio(refused(port, {"Authorization": f"Basic {bad}"})) == 401
    assert await aio(refused(port, {"Authorization": f"Basic {stranger}"})) == 401

    # JWT: header, subprotocol and query; wrong signature, expired, unknown sub.
    await aio(accepted(port, {"Authorization": f"Bearer {secrets.token()}"}))
    await aio(accepted(port, subprotocols=["bearer", secrets.token()]))
    await aio(accepted(port, query=f"?access_token={secrets.token()}"))
    forged = secrets.token(WRONG_JWT_SECRET)
    assert await aio(refused(port, {"Authorization": f"Bearer {forged}"})) == 401
    assert await aio(refused(port, subprotocols=["bearer", forged])) == 401
    stale = secrets.token(exp=time.time() - 60)
    assert await aio(refused(port, {"Authorization": f"Bearer {stale}"})) == 401
    assert await aio(refused(port, subprotocols=["bearer", stale])) == 401
    unknown = secrets.token(sub="nobody")
    assert await aio(refused(port, {"Authorization": f"Bearer {unknown}"})) == 401

    # One session that expires while open (3000). PyJWT checks exp against
    # the real clock: 3 s leave room for a loaded machine's handshake
    # (1 s was sometimes spent before the token was checked: a 401).
    short = secrets.token(exp=time.time() + 3)
    assert await aio(expired(port, short)) == (3000, "credentials expired")

    assert len([e for e in captured_log.events if e.get("consumer") == "john"]) >= 7
    assert_no_secret(captured_log, secrets)


@pytest_twisted.ensureDeferred
async def test_no_secret_in_log_for_malformed_requests(
    serve: Serve, captured_log: CapturedLog, secrets: Secrets
) -> None:
    """
    Requests refused for their shape rather than their credential, by
    txwssec (a duplicated credential header: 400) or by Autobahn's own
    checks (duplicate subprotocol, broken request line, fragment), still
    carry secrets; the refusal log names what is wrong without them.
    """
    factory = make_factory()
    port = serve(factory)
    secrets.add(JOHN_KEY, WRONG_KEY)
    token = secrets.token()

    requests = [
        upgrade_request("/echo", f"apikey: {JOHN_KEY}", f"apikey: {WRONG_KEY}"),
        upgrade_request("/echo", f"Sec-WebSocket-Protocol: token, {JOHN_KEY}, {JOHN_KEY}"),
        upgrade_request("/echo", f"Sec-WebSocket-Protocol: bearer, {token}, {token}"),
        upgrade_request(f"/echo?apikey={JOHN_KEY} extra"),
        upgrade_request(f"/echo?apikey={JOHN_KEY}#{WRONG_KEY}"),
        upgrade_request(
            "/echo", f"Authorization: Bearer {token}", f"Authorization: Bearer {token}"
        ),
    ]
    for request in requests:
        response = await aio(raw_exchange(port, request))
        assert response.startswith(b"HTTP/1.1 400 "), response
        assert response.endswith(b"\r\n\r\nbad request\n")
        assert JOHN_KEY.encode() not in response
        assert WRONG_KEY.encode() not in response
        assert token.encode() not in response

    assert len(refusal_events(captured_log, 400)) == len(requests)
    assert_no_secret(captured_log, secrets)


@pytest_twisted.ensureDeferred
async def test_refusals_logged_with_named_fields(serve: Serve, captured_log: CapturedLog) -> None:
    factory = make_factory()
    port = serve(factory)

    assert await aio(refused(port, {"apikey": WRONG_KEY})) == 401
    assert await aio(refused(port)) == 401
    forged = make_token(WRONG_JWT_SECRET)
    assert await aio(refused(port, {"Authorization": f"Bearer {forged}"})) == 401

    events = refusal_events(captured_log, 401)
    assert len(events) == 3
    for event in events:
        for name in ("peer", "route", "status", "method", "reason"):
            assert name in event, name
        assert event["peer"].startswith("tcp4:127.0.0.1:")
        assert event["route"] == "/echo"
        assert event["status"] == 401
        assert event["log_level"].name in ("info", "warn")
        assert event["log_namespace"].startswith("txwssec")
    by_method = {e["method"]: e["reason"] for e in events}
    assert by_method["key"] == "key: unknown key"
    assert by_method["-"] == "no credentials"
    assert by_method["jwt"].startswith("jwt: invalid token")


@pytest_twisted.ensureDeferred
async def test_unknown_route_and_origin_refusals_logged(
    serve: Serve, captured_log: CapturedLog
) -> None:
    """404 and 403 refusals carry the same named fields."""
    factory = make_factory()
    port = serve(factory)

    response = await aio(raw_exchange(port, upgrade_request("/nowhere", f"apikey: {JOHN_KEY}")))
    assert response.startswith(b"HTTP/1.1 404 ")
    response = await aio(
        raw_exchange(
            port, upgrade_request("/echo", f"apikey: {JOHN_KEY}", "Origin: https://evil.example")
        )
    )
    assert response.startswith(b"HTTP/1.1 403 ")

    (not_found,) = refusal_events(captured_log, 404)
    assert not_found["route"] == "-"  # no route serves the path
    assert not_found["path"] == "/nowhere"
    assert not_found["method"] == "-"  # no method decided
    assert "/nowhere" in not_found["reason"]
    (forbidden,) = refusal_events(captured_log, 403)
    assert forbidden["route"] == "/echo"
    assert formatEvent(forbidden).startswith(
        f"refused {forbidden['peer']} on /echo with 403 (-): origin "
    )
    assert "evil.example" in forbidden["reason"]
    assert JOHN_KEY not in everything_logged(captured_log)


@pytest_twisted.ensureDeferred
async def test_acceptance_logs_consumer_and_method(
    serve: Serve, captured_log: CapturedLog
) -> None:
    factory = make_factory()
    port = serve(factory)

    await aio(accepted(port, {"apikey": JOHN_KEY}))
    await aio(accepted(port, {"Authorization": f"Basic {basic('john', PASSWORD)}"}))
    await aio(accepted(port, subprotocols=["bearer", make_token()]))

    events = [e for e in captured_log.events if "consumer" in e and "method" in e]
    assert [(e["consumer"], e["method"]) for e in events] == [
        ("john", "key"),
        ("john", "basic"),
        ("john", "jwt"),
    ]
    for event in events:
        assert event["peer"].startswith("tcp4:127.0.0.1:")
        assert event["route"] == "/echo"
        assert "status" not in event
    assert events[0]["expires_at"] is None
    assert events[2]["expires_at"] is not None


@pytest_twisted.ensureDeferred
async def test_expiry_logged(serve: Serve, captured_log: CapturedLog) -> None:
    factory = make_factory()
    port = serve(factory)
    exp = time.time() + 1
    assert await aio(expired(port, make_token(exp=exp))) == (3000, "credentials expired")

    (event,) = captured_log.matching(event="expired")
    assert event["code"] == 3000
    assert event["consumer"] == "john"
    assert event["route"] == "/echo"
    assert event["peer"].startswith("tcp4:127.0.0.1:")
    assert captured_log.matching(event="expired", code=3000) == [event]


@pytest_twisted.ensureDeferred
async def test_no_secret_in_log_with_txaio_debug(
    serve: Serve, captured_log: CapturedLog, secrets: Secrets
) -> None:
    """
    Autobahn's debug lines quote raw handshakes. Even with txaio's global
    level at "debug", txwssec's protocols keep Autobahn's logger at "info".
    """
    import txaio

    factory = make_factory()
    port = serve(factory)
    secrets.add(JOHN_KEY, WRONG_KEY)
    txaio.set_global_log_level("debug")
    try:
        await aio(accepted(port, {"apikey": JOHN_KEY}))
        await aio(accepted(port, subprotocols=["token", JOHN_KEY]))
        assert await aio(refused(port, {"apikey": WRONG_KEY})) == 401
        token = secrets.token()
        await aio(accepted(port, {"Authorization": f"Bearer {token}"}))
    finally:
        txaio.set_global_log_level("info")
    assert_no_secret(captured_log, secrets)


@pytest_twisted.ensureDeferred
async def test_refusals_and_handshake_timeouts_log_one_line_each(
    serve: Serve, captured_log: CapturedLog
) -> None:
    """
    txwssec's own line only: not Autobahn's "dropping connection to peer
    ... handshake refused" warning as well.
    """
    route = RoutePolicy("/echo", [KeyAuthenticator(ConsumerDirectory([]))], protocol=EchoProtocol)
    factory = SecureServerFactory(ServerPolicy.single(route, handshake_timeout=0.2))
    port = serve(factory)
    response = await aio(raw_exchange(port, upgrade_request("/nowhere")))
    assert response.startswith(b"HTTP/1.1 404 ")
    with pytest.raises(ConnectionResetError):
        await aio(raw_exchange(port, b"GET /echo HTTP/1.1\r\n"))
    lines = [formatEvent(e) for e in captured_log.events]
    dropping = [line for line in lines if "dropping" in line]
    assert len(dropping) == 1
    assert dropping[0].startswith("handshake timeout: dropping tcp4:127.0.0.1:")
    assert len([line for line in lines if line.startswith("refused ")]) == 1
