"""
Opaque tokens checked by introspection (txwssec.auth.introspect, RFC 7662)
against the local HTTPS identity provider of tests/idp.py.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import websockets
from conftest import CapturedLog, aio
from idp import CLIENT_ID, CLIENT_SECRET, IdentityProvider
from test_jwt import (
    CONSUMERS,
    assert_logged,
    assert_unauthorized,
    bearer,
    jwt_factory,
    refused,
    session_info,
)
from twisted.internet import task
from twisted.internet.defer import Deferred

from txwssec._schema import Table
from txwssec.auth._https import HTTPSClient, load_trust_root
from txwssec.auth.context import BuildContext
from txwssec.auth.introspect import IntrospectionAuthenticator, basic_credentials, build
from txwssec.errors import ConfigError
from txwssec.types import Accept, Deny, HandshakeRequest


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[IdentityProvider]:
    provider = IdentityProvider(tmp_path / "idp").start()
    yield provider
    pytest_twisted.blockon(Deferred.fromCoroutine(provider.stop()))


def introspection(
    idp: IdentityProvider,
    *,
    secret: str = CLIENT_SECRET,
    timeout: float = 3.0,
    **options: Any,
) -> IntrospectionAuthenticator:
    client = HTTPSClient(load_trust_root(idp.ca_file), timeout=timeout)
    return IntrospectionAuthenticator(
        CONSUMERS, client, idp.introspection_url, CLIENT_ID, secret, **options
    )


def request(token: str) -> HandshakeRequest:
    return HandshakeRequest(
        peer="tcp4:127.0.0.1:1",
        host="127.0.0.1",
        path="/echo",
        query={},
        headers=(("authorization", f"Bearer {token}"),),
        subprotocols=(),
    )


async def verdict(auth: IntrospectionAuthenticator, token: str) -> Any:
    result = auth.authenticate(request(token))
    if isinstance(result, Deferred):
        return await result
    return result


def refusal_reasons(log: CapturedLog) -> list[tuple[int, str]]:
    return [(e["status"], e["reason"]) for e in log.events if "status" in e and "reason" in e]


@pytest_twisted.ensureDeferred
async def test_active_token_connects(serve: Any, idp: IdentityProvider) -> None:
    token = idp.opaque("john", lifetime=300, scope="chat")
    port = serve(jwt_factory(introspection(idp)))
    _, info = await aio(session_info(port, headers=bearer(token)))
    assert (info["consumer"], info["method"]) == ("john", "introspect")
    assert info["expires_at"] == idp.tokens[token]["exp"]
    assert info["claims"]["scope"] == "chat"


@pytest_twisted.ensureDeferred
async def test_token_in_bearer_subprotocol(serve: Any, idp: IdentityProvider) -> None:
    token = idp.opaque("jane")
    port = serve(jwt_factory(introspection(idp)))
    subprotocol, info = await aio(session_info(port, subprotocols=["bearer", token]))
    assert subprotocol == "bearer"
    assert info["consumer"] == "jane"


@pytest_twisted.ensureDeferred
async def test_session_closes_3000_at_exp(serve: Any, idp: IdentityProvider) -> None:
    token = idp.opaque("john", lifetime=300)
    idp.tokens[token]["exp"] = time.time() + 1.5
    port = serve(jwt_factory(introspection(idp)))

    async def client() -> int:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/echo", additional_headers=bearer(token)
        ) as ws:
            await ws.recv()
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except websockets.exceptions.ConnectionClosed as closed:
                assert closed.rcvd is not None
                return closed.rcvd.code
        raise AssertionError("the session was not closed")

    assert await aio(client()) == 3000


@pytest_twisted.ensureDeferred
async def test_client_credentials_sent_per_rfc(idp: IdentityProvider) -> None:
    token = idp.opaque()
    assert isinstance(await verdict(introspection(idp), token), Accept)
    [(form, authorization)] = idp.introspection_requests
    assert form == {"token": [token], "token_type_hint": ["access_token"]}
    # RFC 6749 2.3.1: each part form-urlencoded, then base64.
    expected = base64.b64encode(b"wssec:s3cret%3A+with+%26+odd+%3D+chars").decode()
    assert authorization == f"Basic {expected}"
    assert basic_credentials(CLIENT_ID, CLIENT_SECRET) == authorization


@pytest_twisted.ensureDeferred
async def test_inactive_token_401(
    serve: Any, idp: IdentityProvider, captured_log: CapturedLog
) -> None:
    port = serve(jwt_factory(introspection(idp)))
    assert_unauthorized(await aio(refused(port, headers=bearer("not-a-known-token"))))
    assert_logged(captured_log, "introspect: token not active")


@pytest_twisted.ensureDeferred
async def test_unknown_consumer_and_nbf(idp: IdentityProvider) -> None:
    auth = introspection(idp)
    assert await verdict(auth, idp.opaque("mallory")) == Deny("token names an unknown consumer")
    future = idp.opaque("john", nbf=int(time.time()) + 100)
    assert await verdict(auth, future) == Deny("token not yet valid")
    odd = idp.opaque("john", exp="tomorrow")
    assert await verdict(auth, odd) == Deny("introspection answer: exp is not a number")


@pytest_twisted.ensureDeferred
async def test_wrong_client_credentials_401_and_operator_log(
    serve: Any, idp: IdentityProvider, captured_log: CapturedLog
) -> None:
    token = idp.opaque()
    port = serve(jwt_factory(introspection(idp, secret="wrong-secret-value")))
    assert_unauthorized(await aio(refused(port, headers=bearer(token))))
    assert_logged(captured_log, "introspect: introspection refused our client credentials")
    text = captured_log.text()
    assert "the introspection endpoint refused our client credentials (HTTP 401)" in text
    assert "auth.introspect.client_secret" in text
    assert "wrong-secret-value" not in text
    assert token not in text


@pytest_twisted.ensureDeferred
async def test_slow_idp_401_within_timeout(
    serve: Any, idp: IdentityProvider, captured_log: CapturedLog
) -> None:
    token = idp.opaque()
    idp.behaviour("/introspect").mode = "hold"
    port = serve(jwt_factory(introspection(idp, timeout=0.5)))
    assert_unauthorized(await aio(refused(port, headers=bearer(token))))
    assert refusal_reasons(captured_log) == [(401, "introspect: introspection unavailable")]
    assert "no answer within 0.5 seconds" in captured_log.text()
    assert idp.requests["/introspect"] == 1


@pytest_twisted.ensureDeferred
async def test_requests_in_flight_bounded(idp: IdentityProvider) -> None:
    idp.behaviour("/introspect").mode = "hold"
    auth = introspection(idp, max_pending=2)
    waiting = [auth.authenticate(request(idp.opaque())) for _ in range(2)]
    assert all(isinstance(w, Deferred) for w in waiting)
    assert auth.authenticate(request(idp.opaque())) == Deny(
        "too many introspections in flight", status=503
    )
    while len(idp.held) < 2:
        await task.deferLater(reactor(), 0.01)
    idp.release()
    assert [await w for w in waiting] == [Deny("introspection unavailable")] * 2
    assert auth.pending == 0
    idp.behaviour("/introspect").mode = "ok"
    assert isinstance(await verdict(auth, idp.opaque()), Accept)


def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.mark.parametrize("mode", ["500", "invalid-json", "down"])
@pytest_twisted.ensureDeferred
async def test_idp_failing_401(
    idp: IdentityProvider, captured_log: CapturedLog, mode: str
) -> None:
    token = idp.opaque()
    auth = introspection(idp)
    if mode == "down":
        await idp.stop()
    else:
        idp.behaviour("/introspect").mode = mode
    assert await verdict(auth, token) == Deny("introspection unavailable")
    assert [e for e in captured_log.events if e.get("where") == "auth.introspect"]


@pytest_twisted.ensureDeferred
async def test_cached_second_handshake_makes_no_request(serve: Any, idp: IdentityProvider) -> None:
    token = idp.opaque()
    auth = introspection(idp)
    port = serve(jwt_factory(auth))
    await aio(session_info(port, headers=bearer(token)))
    await aio(session_info(port, headers=bearer(token)))
    assert idp.requests["/introspect"] == 1
    # Keyed by a digest: the token itself is not kept.
    assert all(token.encode() not in key for key in auth._cache)


@pytest_twisted.ensureDeferred
async def test_cache_never_beyond_exp(idp: IdentityProvider) -> None:
    clock = task.Clock()
    clock.advance(time.time())
    auth = introspection(idp, clock=clock, cache=60)
    token = idp.opaque(lifetime=300)
    idp.tokens[token]["exp"] = clock.seconds() + 10
    assert isinstance(await verdict(auth, token), Accept)
    clock.advance(9)
    assert isinstance(await verdict(auth, token), Accept)
    assert idp.requests["/introspect"] == 1
    clock.advance(1)  # exp reached: the cached answer is gone
    result = await verdict(auth, token)
    assert idp.requests["/introspect"] == 2
    assert isinstance(result, Deny)


@pytest_twisted.ensureDeferred
async def test_cache_lifetime_and_bound(idp: IdentityProvider) -> None:
    clock = task.Clock()
    clock.advance(time.time())
    auth = introspection(idp, clock=clock, cache=60, max_entries=2)
    token = idp.opaque()
    await verdict(auth, token)
    clock.advance(59)
    await verdict(auth, token)
    assert idp.requests["/introspect"] == 1
    clock.advance(1)
    await verdict(auth, token)
    assert idp.requests["/introspect"] == 2
    for _ in range(5):
        await verdict(auth, idp.opaque())
    assert len(auth._cache) == 2


# -- configuration -----------------------------------------------------------

VALID = {
    "url": "https://idp.example/oauth2/introspect",
    "client_id": "wssec",
    "client_secret": "s3cret",
}


def build_from(data: dict[str, Any], base_dir: Path = Path()) -> IntrospectionAuthenticator:
    return build(Table(data, "auth.introspect"), BuildContext(CONSUMERS, base_dir))


def test_config_defaults() -> None:
    auth = build_from(dict(VALID))
    assert (auth.cache, auth.header, auth.subprotocol, auth.query) == (
        60,
        "Authorization",
        "bearer",
        "",
    )
    assert (auth.consumer_claim, auth.client.timeout, auth.client.trust_root) == ("sub", 3.0, None)
    assert (auth.max_entries, auth.max_pending) == (10000, 64)
    assert "s3cret" not in repr(auth)


def test_config_valid(idp: IdentityProvider) -> None:
    auth = build_from(
        {
            **VALID,
            "cache": 120,
            "header": "X-Token",
            "query": "access_token",
            "consumer_claim": "client_id",
            "timeout": 1,
            "max_pending": 8,
            "ca": str(idp.ca_file),
        }
    )
    assert (auth.cache, auth.header, auth.query, auth.consumer_claim) == (
        120,
        "X-Token",
        "access_token",
        "client_id",
    )
    assert auth.client.trust_root is not None
    assert (auth.max_pending, auth.client.timeout) == (8, 1)


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ({"url": "http://idp/x"}, "auth.introspect.url", "must be an https:// URL"),
        ({"url": 1}, "auth.introspect.url", "expected string"),
        ({"url": None}, "auth.introspect.url", "is required"),
        ({"client_id": None}, "auth.introspect.client_id", "is required"),
        ({"client_secret": ""}, "auth.introspect.client_secret", "must not be empty"),
        ({"cache": -1}, "auth.introspect.cache", "at least 0"),
        ({"cache": 100000}, "auth.introspect.cache", "at most 86400"),
        ({"cache": "1m"}, "auth.introspect.cache", "expected number"),
        ({"timeout": 0}, "auth.introspect.timeout", "at least 0.1"),
        ({"ca": "missing.pem"}, "auth.introspect.ca", "cannot read"),
        ({"max_pending": 0}, "auth.introspect.max_pending", "at least 1"),
        ({"max_entries": "many"}, "auth.introspect.max_entries", "expected integer"),
        ({"secret": "x"}, "auth.introspect.secret", "unknown key"),
    ],
)
def test_config_errors(data: dict[str, Any], path: str, message: str) -> None:
    merged = {k: v for k, v in {**VALID, **data}.items() if v is not None}
    with pytest.raises(ConfigError) as raised:
        build_from(merged)
    assert raised.value.path == path
    assert message in str(raised.value)
    assert "s3cret" not in str(raised.value)
