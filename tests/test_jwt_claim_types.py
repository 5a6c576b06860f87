"""
Every wrong type of a NumericDate claim (C{exp}, C{nbf}, C{iat}) is refused
with the reason "<claim> is not a number", never with a time reason
("Signature has expired" for C{exp: true}) or PyJWT's own text: the type is
checked on the verified payload before the time checks.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_hardening_jwt import SECRET, WRONG, claim_value, token
from txwssec import Consumer, ConsumerDirectory, Deny, JWTAuthenticator
from txwssec.types import HandshakeRequest

AUTHENTICATOR = JWTAuthenticator(ConsumerDirectory([Consumer("john")]), SECRET)


def reason_for(value: str) -> str | None:
    request = HandshakeRequest(
        peer="tcp4:127.0.0.1:1",
        host="127.0.0.1",
        path="/",
        query={},
        headers=(("authorization", f"Bearer {value}"),),
        subprotocols=(),
    )
    verdict = AUTHENTICATOR.authenticate(request)
    return verdict.reason if isinstance(verdict, Deny) else None


#: Wrong values whose conversion by PyJWT would pass or fail a time check.
EXTRA: dict[str, Any] = {"true": True, "false": False, "zero-string": "0", "list-int": [0]}


@pytest.mark.parametrize("kind", [*WRONG, *EXTRA])
@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_wrong_type_reason(claim: str, kind: str) -> None:
    value = EXTRA[kind] if kind in EXTRA else claim_value(claim, kind)
    assert reason_for(token(**{claim: value})) == f"invalid token: {claim} is not a number"


def test_signature_checked_before_types() -> None:
    forged = token(exp=True)[:-4] + "AAAA"
    assert reason_for(forged) == "invalid token: Signature verification failed"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": 1}, "invalid token: Signature has expired"),
        ({"exp": 2**40, "nbf": 2**40}, "invalid token: The token is not yet valid (nbf)"),
        ({"exp": 2**40, "iat": 2**40}, "invalid token: The token is not yet valid (iat)"),
        ({"exp": None}, "invalid token: exp is not a number"),
        ({"exp": 2**40, "nbf": 1, "iat": 1.5}, None),
    ],
)
def test_time_checks_after_types(claims: dict[str, Any], reason: str | None) -> None:
    assert reason_for(token(**claims)) == reason


def test_missing_exp() -> None:
    import jwt

    value = jwt.encode({"sub": "john"}, SECRET, algorithm="HS256")
    assert reason_for(value) == 'invalid token: Token is missing the "exp" claim'
