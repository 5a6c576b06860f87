"""
Token revocations in the state store (L{txwssec.revocations}): by C{jti}
until the token's expiry, and a consumer's tokens issued before a time.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from txwssec.revocations import HORIZON, Revocations, matches
from txwssec.store import MemoryStore
from txwssec.types import Principal


def principal(consumer: str = "john", **claims: Any) -> Principal:
    return Principal(consumer, "jwt", {"sub": consumer, "exp": 2000.0, **claims})


def revocations(now: float = 1000.0) -> tuple[Revocations, Clock]:
    clock = Clock()
    clock.advance(now)
    return Revocations(MemoryStore(), clock), clock


def test_by_jti_until_expiry() -> None:
    revoked, clock = revocations()
    revoked.revoke_token("t-1", expires_at=1500)
    assert revoked.is_revoked(principal(jti="t-1"))
    assert not revoked.is_revoked(principal(jti="t-2"))
    assert not revoked.is_revoked(principal())
    clock.advance(500)
    assert not revoked.is_revoked(principal(jti="t-1"))  # the token has expired anyway


def test_consumer_issued_before() -> None:
    revoked, clock = revocations()
    revoked.revoke_consumer("john", issued_before=900)
    assert revoked.is_revoked(principal(iat=899))
    assert revoked.is_revoked(principal(iat=899.5))
    assert not revoked.is_revoked(principal(iat=900))
    assert not revoked.is_revoked(principal(iat=950))
    assert revoked.is_revoked(principal())  # no iat: counted as older
    assert not revoked.is_revoked(principal("mary", iat=1))
    # A later revocation of the same consumer widens it.
    revoked.revoke_consumer("john", issued_before=960)
    assert revoked.is_revoked(principal(iat=950))
    revoked.revoke_consumer("john", issued_before=100)
    assert revoked.is_revoked(principal(iat=950))
    # It lasts HORIZON after issued_before.
    clock.advance(960 + HORIZON - 1000 + 1)
    assert not revoked.is_revoked(principal(iat=950))
    assert not revoked.is_revoked(principal())


def test_principals_without_a_token_are_not_revoked() -> None:
    revoked, _ = revocations()
    revoked.revoke_consumer("john", issued_before=2000)
    assert not revoked.is_revoked(Principal("john", "key"))
    certificate = Principal("john", "tls", {"subject": "CN=john", "serial": 1})
    assert not revoked.is_revoked(certificate)
    assert not matches(certificate, consumer="john", issued_before=2000)


def test_matches_live_sessions() -> None:
    assert matches(principal(jti="a"), jti="a")
    assert not matches(principal(jti="a"), jti="b")
    assert not matches(principal(), jti="a")
    assert matches(principal(iat=5), consumer="john", issued_before=6)
    assert not matches(principal(iat=6), consumer="john", issued_before=6)
    assert matches(principal(), consumer="john", issued_before=6)
    assert not matches(principal("mary", iat=5), consumer="john", issued_before=6)
    assert not matches(Principal("john", "key"), consumer="john", issued_before=6)
