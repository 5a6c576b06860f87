"""
JWT HS* verification checks the configured secret once, not per token
(txwssec.auth.jwt._decoder), and decides exactly as PyJWT's module does.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
import jwt.algorithms
import pytest

from txwssec import Consumer, ConsumerDirectory
from txwssec.auth.jwt import JWTAuthenticator
from txwssec.types import Accept, Deny, HandshakeRequest

SECRET = b"0123456789abcdef" * 4
CONSUMERS = ConsumerDirectory([Consumer("john", ())])


def request(token: str) -> HandshakeRequest:
    return HandshakeRequest(
        peer="tcp4:127.0.0.1:1",
        host="127.0.0.1",
        path="/",
        query={},
        headers=(("authorization", f"Bearer {token}"),),
        subprotocols=(),
    )


def token(secret: bytes = SECRET, alg: str = "HS256", **claims: Any) -> str:
    payload = {"sub": "john", "exp": int(time.time()) + 300, **claims}
    return jwt.encode(payload, secret, algorithm=alg)


def test_secret_checked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[bytes] = []
    original = jwt.algorithms.is_pem_format

    def counting(key: bytes) -> bool:
        checks.append(key)
        return original(key)

    tokens = [token(), token(), token(), token(alg="HS512")]
    monkeypatch.setattr(jwt.algorithms, "is_pem_format", counting)
    auth = JWTAuthenticator(CONSUMERS, SECRET, ("HS256", "HS512"))
    made = len(checks)
    for each in tokens:
        assert isinstance(auth.authenticate(request(each)), Accept)
    assert len(checks) == made


@pytest.mark.parametrize(
    "case",
    ["good", "other secret", "expired", "not yet", "wrong alg", "issuer", "audience", "no sub"],
)
def test_same_verdicts_as_pyjwts_module(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = {
        "good": token(),
        "other secret": token(secret=b"x" * 64),
        "expired": token(exp=int(time.time()) - 10),
        "not yet": token(nbf=int(time.time()) + 100),
        "wrong alg": token(alg="HS384"),
        "issuer": token(iss="someone"),
        "audience": token(aud="other"),
        "no sub": jwt.encode({"exp": int(time.time()) + 300}, SECRET, algorithm="HS256"),
    }

    def verdict() -> Any:
        auth = JWTAuthenticator(CONSUMERS, SECRET, ("HS256",), issuer="me", audience="us")
        found = auth.authenticate(request(tokens[case]))
        assert isinstance(found, Accept | Deny)
        return found.reason if isinstance(found, Deny) else found.principal

    checked = verdict()
    monkeypatch.setattr("txwssec.auth.jwt._decoder", lambda key, algorithms: jwt)
    assert checked == verdict()
