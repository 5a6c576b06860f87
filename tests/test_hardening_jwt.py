"""
JWT NumericDate claims (C{exp}, C{nbf}, C{iat}) must be JSON numbers (RFC
7519 section 2): PyJWT converts strings and booleans with int(), so a
C{"nbf": "0"} or a C{"exp": "<far future>"} string passed. Any other type
is refused with 401, a signed token included; ints and floats still work.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
import pytest_twisted
import websockets
from conftest import CapturedLog, aio
from websockets.exceptions import InvalidStatus

from txwssec import Consumer, ConsumerDirectory, JWTAuthenticator, RoutePolicy, SecureServerFactory
from txwssec.apps.echo import EchoProtocol

SECRET = b"hardening-jwt-tests-secret-0123456789"
FUTURE = int(time.time()) + 3600
PAST = int(time.time()) - 3600

#: For each claim, values of the wrong type that PyJWT would take or that
#: must be refused anyway; strings are numeric ones (int() accepts them).
WRONG: dict[str, Any] = {
    "numeric-string": "{n}",
    "true": True,
    "false": False,
    "null": None,
    "list": ["{n}"],
    "object": {"n": "{n}"},
    "huge-int": 10**400,
}


def claim_value(claim: str, kind: str) -> Any:
    """The wrong value of C{kind} for C{claim}, around a time that would pass."""
    n = str(FUTURE if claim == "exp" else PAST)
    value = WRONG[kind]
    if isinstance(value, str):
        return value.format(n=n)
    if isinstance(value, list):
        return [n]
    if isinstance(value, dict):
        return {"n": n}
    return value


def token(**claims: Any) -> str:
    payload: dict[str, Any] = {"sub": "john", "exp": FUTURE}
    payload.update(claims)
    return jwt.encode(payload, SECRET, algorithm="HS256")


def factory() -> SecureServerFactory:
    authenticator = JWTAuthenticator(ConsumerDirectory([Consumer("john")]), SECRET)
    return SecureServerFactory(RoutePolicy("/echo", [authenticator], protocol=EchoProtocol))


async def status_for(port: int, value: str) -> int:
    """The handshake's status: 101 (after an echo) or the refusal's."""
    try:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/echo",
            additional_headers={"Authorization": f"Bearer {value}"},
            open_timeout=5,
        ) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
            return 101
    except InvalidStatus as error:
        return int(error.response.status_code)


@pytest.mark.parametrize("kind", list(WRONG))
@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest_twisted.ensureDeferred
async def test_wrong_type_refused(
    serve: Any, captured_log: CapturedLog, claim: str, kind: str
) -> None:
    port = serve(factory())
    assert await aio(status_for(port, token(**{claim: claim_value(claim, kind)}))) == 401
    (event,) = captured_log.matching(status=401)
    assert event["method"] == "jwt"
    assert event["reason"].startswith("jwt: ")


@pytest.mark.parametrize("claim", ["nbf", "iat"])
@pytest_twisted.ensureDeferred
async def test_numeric_string_reason(serve: Any, captured_log: CapturedLog, claim: str) -> None:
    """The check that fires is the type check (PyJWT alone would accept it)."""
    port = serve(factory())
    assert await aio(status_for(port, token(**{claim: str(PAST)}))) == 401
    (event,) = captured_log.matching(status=401)
    assert event["reason"] == f"jwt: invalid token: {claim} is not a number"


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": FUTURE},
        {"exp": FUTURE + 0.5},
        {"exp": FUTURE, "nbf": PAST, "iat": PAST},
        {"exp": float(FUTURE), "nbf": PAST + 0.25, "iat": PAST + 0.75},
        {"exp": FUTURE, "nbf": 0, "iat": 0.0},
    ],
)
@pytest_twisted.ensureDeferred
async def test_numbers_accepted(serve: Any, claims: dict[str, Any]) -> None:
    port = serve(factory())
    assert await aio(status_for(port, token(**claims))) == 101


@pytest_twisted.ensureDeferred
async def test_past_numbers_still_refused(serve: Any) -> None:
    port = serve(factory())
    assert await aio(status_for(port, token(exp=PAST))) == 401
    assert await aio(status_for(port, token(nbf=FUTURE))) == 401
