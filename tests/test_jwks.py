"""
JWT keys from an identity provider (txwssec.auth.jwks): a local HTTPS IdP
(tests/idp.py) serves the key set; tokens go through a real server.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
from conftest import CapturedLog, aio
from cryptography.hazmat.primitives.asymmetric import rsa
from idp import IdentityProvider, new_key, public_jwk
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
from twisted.internet.defer import Deferred, gatherResults

from txwssec._schema import Table
from txwssec.auth._https import FetchError, HTTPSClient, load_trust_root
from txwssec.auth.context import BuildContext
from txwssec.auth.jwks import (
    JWK,
    MAX_CACHE,
    MIN_CACHE,
    STALE_BOUND,
    JWKSKeys,
    cache_lifetime,
    parse_jwk,
)
from txwssec.auth.jwt import JWTAuthenticator, build
from txwssec.errors import ConfigError
from txwssec.types import Accept, Deny, HandshakeRequest


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[IdentityProvider]:
    provider = IdentityProvider(tmp_path / "idp").start()
    yield provider
    pytest_twisted.blockon(Deferred.fromCoroutine(provider.stop()))


def keys_of(
    idp: IdentityProvider,
    algorithms: tuple[str, ...] = ("RS256", "ES256"),
    *,
    clock: Any = None,
    timeout: float = 3.0,
    **options: Any,
) -> JWKSKeys:
    client = HTTPSClient(load_trust_root(idp.ca_file), timeout=timeout)
    options.setdefault("url", idp.jwks_url)
    return JWKSKeys(client, algorithms, clock=clock, **options)


def authenticator(keys: JWKSKeys, **options: Any) -> JWTAuthenticator:
    return JWTAuthenticator(CONSUMERS, None, keys.algorithms, keys=keys, **options)


def request(token: str) -> HandshakeRequest:
    return HandshakeRequest(
        peer="tcp4:127.0.0.1:1",
        host="127.0.0.1",
        path="/echo",
        query={},
        headers=(("authorization", f"Bearer {token}"),),
        subprotocols=(),
    )


async def verdict(auth: JWTAuthenticator, token: str) -> Any:
    result = auth.authenticate(request(token))
    if isinstance(result, Deferred):
        return await result
    return result


# -- accepted --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_rs256_and_es256_tokens_accepted(serve: Any, idp: IdentityProvider) -> None:
    rsa_key = idp.add_key("RS256")
    ec_key = idp.add_key("ES256")
    keys = keys_of(idp)
    port = serve(jwt_factory(authenticator(keys)))
    for key in (rsa_key, ec_key):
        _, info = await aio(session_info(port, headers=bearer(idp.sign(key))))
        assert (info["consumer"], info["method"]) == ("john", "jwt")
    assert idp.requests["/jwks.json"] == 1
    assert keys.ready and keys.reasons == []


@pytest_twisted.ensureDeferred
async def test_keys_loaded_at_start(idp: IdentityProvider) -> None:
    idp.add_key("RS256")
    keys = keys_of(idp)
    assert not keys.ready
    assert keys.reasons == ["auth.jwt: JWKS keys not loaded yet"]
    keys.startService()
    try:
        await keys.fetch()
        assert keys.ready
        assert idp.requests["/jwks.json"] == 1
    finally:
        await keys.stopService()


@pytest_twisted.ensureDeferred
async def test_rotation_without_restart(serve: Any, idp: IdentityProvider) -> None:
    old = idp.add_key("RS256")
    clock = task.Clock()
    port = serve(jwt_factory(authenticator(keys_of(idp, clock=clock, cooldown=30))))
    await aio(session_info(port, headers=bearer(idp.sign(old))))
    new = idp.rotate("RS256")
    clock.advance(30)  # the unknown kid refetches (once the cooldown since the last fetch passed)
    _, info = await aio(session_info(port, headers=bearer(idp.sign(new))))
    assert info["consumer"] == "john"
    assert idp.requests["/jwks.json"] == 2


@pytest_twisted.ensureDeferred
async def test_concurrent_fetches_shared(idp: IdentityProvider) -> None:
    key = idp.add_key("RS256")
    auth = authenticator(keys_of(idp))
    results = await gatherResults(
        [Deferred.fromCoroutine(verdict(auth, idp.sign(key))) for _ in range(20)]
    )
    assert all(isinstance(r, Accept) for r in results)
    assert idp.requests["/jwks.json"] == 1


# -- unknown kids ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_kid_flood_costs_one_fetch_per_cooldown(
    serve: Any, idp: IdentityProvider, captured_log: CapturedLog
) -> None:
    key = idp.add_key("RS256")
    attacker = new_key("RS256")
    clock = task.Clock()
    keys = keys_of(idp, clock=clock, cooldown=30)
    auth = authenticator(keys)
    assert isinstance(await verdict(auth, idp.sign(key)), Accept)
    assert idp.requests["/jwks.json"] == 1
    clock.advance(30)  # the cooldown has passed: one refetch allowed
    for _ in range(1000):
        attacker.kid = uuid.uuid4().hex
        result = await verdict(auth, idp.sign(attacker))
        assert result == Deny("unknown kid")
    assert idp.requests["/jwks.json"] == 2
    # Through real sockets too: still no fetch within the cooldown.
    port = serve(jwt_factory(auth))
    for _ in range(8):  # under the per-IP failure limit (429 after 10)
        attacker.kid = uuid.uuid4().hex
        assert_unauthorized(await aio(refused(port, headers=bearer(idp.sign(attacker)))))
    assert idp.requests["/jwks.json"] == 2
    clock.advance(30)
    attacker.kid = uuid.uuid4().hex
    assert await verdict(auth, idp.sign(attacker)) == Deny("unknown kid")
    assert idp.requests["/jwks.json"] == 3


# -- algorithms stay pinned -------------------------------------------------


def rsa_token_signed_as(key: Any, alg: str, kid: str) -> str:
    return jwt.encode({"sub": "john", "exp": 2**31}, key, algorithm=alg, headers={"kid": kid})


@pytest_twisted.ensureDeferred
async def test_ps256_key_never_verifies_rs256_token(
    serve: Any, idp: IdentityProvider, captured_log: CapturedLog
) -> None:
    key = idp.add_key("PS256")
    port = serve(jwt_factory(authenticator(keys_of(idp, ("RS256", "PS256")))))
    await aio(session_info(port, headers=bearer(idp.sign(key))))  # PS256 works
    token = rsa_token_signed_as(key.private, "RS256", key.kid)
    captured_log.events.clear()
    assert_unauthorized(await aio(refused(port, headers=bearer(token))))
    assert_logged(captured_log, "jwt: the key of this kid does not allow the token's alg")


@pytest_twisted.ensureDeferred
async def test_rsa_key_never_verifies_es256_token(
    serve: Any, idp: IdentityProvider, captured_log: CapturedLog
) -> None:
    rsa_key = idp.add_key("RS256", publish_alg=False)
    ec_key = new_key("ES256")
    port = serve(jwt_factory(authenticator(keys_of(idp))))
    token = jwt.encode(
        {"sub": "john", "exp": 2**31},
        ec_key.private,
        algorithm="ES256",
        headers={"kid": rsa_key.kid},
    )
    assert_unauthorized(await aio(refused(port, headers=bearer(token))))
    assert_logged(captured_log, "jwt: the key of this kid does not allow the token's alg")


@pytest_twisted.ensureDeferred
async def test_oct_key_in_key_set_refused(
    serve: Any, idp: IdentityProvider, captured_log: CapturedLog
) -> None:
    idp.add_key("RS256")
    secret = b"0123456789abcdef0123456789abcdef"
    idp.extra_jwks.append(
        {"kty": "oct", "kid": "hmac", "k": jwt.utils.base64url_encode(secret).decode()}
    )
    port = serve(jwt_factory(authenticator(keys_of(idp, ("RS256",)))))
    # An RS256-labelled token with the oct key's kid: the key was never loaded.
    token = rsa_token_signed_as(new_key("RS256").private, "RS256", "hmac")
    assert_unauthorized(await aio(refused(port, headers=bearer(token))))
    assert_logged(captured_log, "jwt: unknown kid")
    # An HS256 token signed with the published secret: the alg is not allowed.
    captured_log.events.clear()
    forged = jwt.encode({"sub": "john", "exp": 2**31}, secret, "HS256", headers={"kid": "hmac"})
    assert_unauthorized(await aio(refused(port, headers=bearer(forged))))
    assert_logged(captured_log, "jwt: token algorithm not allowed")


def test_hs_algorithms_refused_with_keys(idp: IdentityProvider) -> None:
    from txwssec.auth.jwt import KeyMismatch

    with pytest.raises(KeyMismatch, match="HS256 cannot be used with keys from an identity"):
        JWTAuthenticator(CONSUMERS, None, ["HS256"], keys=keys_of(idp, ("HS256",)))


@pytest_twisted.ensureDeferred
async def test_alg_not_configured(
    serve: Any, idp: IdentityProvider, captured_log: CapturedLog
) -> None:
    idp.add_key("RS256")
    ec_key = idp.add_key("ES256")
    port = serve(jwt_factory(authenticator(keys_of(idp, ("RS256",)))))
    assert_unauthorized(await aio(refused(port, headers=bearer(idp.sign(ec_key)))))
    assert_logged(captured_log, "jwt: token algorithm not allowed")


@pytest.mark.parametrize("source", ["jku", "x5u", "x5c"])
@pytest_twisted.ensureDeferred
async def test_token_key_urls_never_fetched(
    serve: Any, idp: IdentityProvider, captured_log: CapturedLog, source: str
) -> None:
    key = idp.add_key("RS256")
    port = serve(jwt_factory(authenticator(keys_of(idp))))
    token = idp.sign(key, headers={source: f"{idp.issuer}/evil/{source}"})
    assert_unauthorized(await aio(refused(port, headers=bearer(token))))
    assert_logged(
        captured_log, f"jwt: token header names a key source ({source}); keys are never fetched"
    )
    assert [path for path in idp.requests if path.startswith("/evil")] == []


@pytest_twisted.ensureDeferred
async def test_token_without_kid(idp: IdentityProvider) -> None:
    """Without a kid, the one key that fits the alg verifies; two are ambiguous."""
    key = idp.add_key("RS256")
    token = jwt.encode({"sub": "john", "exp": 2**31}, key.private, algorithm="RS256")
    assert isinstance(await verdict(authenticator(keys_of(idp)), token), Accept)
    idp.add_key("RS256")
    result = await verdict(authenticator(keys_of(idp)), token)
    assert result == Deny("token has no kid and the key set has not exactly one key for its alg")


def test_parse_jwk_rules() -> None:
    rsa_jwk = new_key("RS256").jwk
    algorithms = ("RS256", "PS256", "ES256")
    parsed = parse_jwk(rsa_jwk, algorithms)
    assert isinstance(parsed, JWK) and parsed.algorithms == {"RS256"}
    no_alg = {k: v for k, v in rsa_jwk.items() if k != "alg"}
    parsed = parse_jwk(no_alg, algorithms)
    assert isinstance(parsed, JWK) and parsed.algorithms == {"RS256", "PS256"}
    assert parse_jwk({**rsa_jwk, "use": "enc"}, algorithms) == "use is not sig"
    assert parse_jwk({**rsa_jwk, "key_ops": ["encrypt"]}, algorithms) == "key_ops lacks verify"
    assert parse_jwk({**rsa_jwk, "alg": "RS512"}, algorithms) == "suits no configured algorithm"
    assert parse_jwk({**rsa_jwk, "d": "AQAB"}, algorithms) == "holds a private key"
    assert parse_jwk({"kty": "oct", "k": "AAAA"}, algorithms).startswith("symmetric")
    assert parse_jwk({"kty": "RSA", "n": "AQAB"}, algorithms) == "invalid key parameters"
    assert parse_jwk(new_key("ES256").jwk, ("RS256",)) == "suits no configured algorithm"
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    assert (
        parse_jwk(public_jwk(short, "k", "RS256"), algorithms) == "RSA key shorter than 2048 bits"
    )
    huge = {**rsa_jwk, "n": jwt.utils.base64url_encode(b"\xff" * 1040).decode()}
    assert parse_jwk(huge, algorithms) == "RSA key longer than 8192 bits"


# -- caching ---------------------------------------------------------------


def test_cache_lifetime_bounds() -> None:
    assert cache_lifetime("", 300) == 300
    assert cache_lifetime("public, max-age=120", 300) == 120
    assert cache_lifetime("max-age=5", 300) == MIN_CACHE
    assert cache_lifetime("max-age=99999999", 300) == MAX_CACHE
    assert cache_lifetime("no-store", 300) == MIN_CACHE


@pytest_twisted.ensureDeferred
async def test_cache_control_honoured(idp: IdentityProvider) -> None:
    key = idp.add_key("RS256")
    idp.behaviour("/jwks.json").cache_control = "public, max-age=120"
    clock = task.Clock()
    keys = keys_of(idp, clock=clock, cache=300)
    auth = authenticator(keys)
    token = idp.sign(key)
    assert isinstance(await verdict(auth, token), Accept)
    clock.advance(119)
    assert isinstance(await verdict(auth, token), Accept)
    assert not keys.fetching
    clock.advance(1)  # old now: the cached keys answer, a refresh starts
    assert isinstance(await verdict(auth, token), Accept)
    assert keys.fetching
    await keys.fetch()
    assert idp.requests["/jwks.json"] == 2


@pytest.mark.parametrize(
    ("cache_control", "lifetime"), [("max-age=1", MIN_CACHE), ("max-age=999999999", MAX_CACHE)]
)
@pytest_twisted.ensureDeferred
async def test_cache_control_bounded(
    idp: IdentityProvider, cache_control: str, lifetime: int
) -> None:
    key = idp.add_key("RS256")
    idp.behaviour("/jwks.json").cache_control = cache_control
    clock = task.Clock()
    keys = keys_of(idp, clock=clock, cache=300)
    auth = authenticator(keys)
    token = idp.sign(key, lifetime=2 * MAX_CACHE)
    assert isinstance(await verdict(auth, token), Accept)
    clock.advance(lifetime - 1)
    assert isinstance(await verdict(auth, token), Accept)
    assert not keys.fetching
    clock.advance(1)
    assert isinstance(await verdict(auth, token), Accept)
    assert keys.fetching
    await keys.fetch()
    assert idp.requests["/jwks.json"] == 2


# -- the identity provider fails --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_idp_down_cached_keys_used_within_bound(idp: IdentityProvider) -> None:
    key = idp.add_key("RS256")
    clock = task.Clock()
    keys = keys_of(idp, clock=clock, cache=300)
    auth = authenticator(keys)
    token = idp.sign(key, lifetime=2 * STALE_BOUND)
    assert isinstance(await verdict(auth, token), Accept)
    await idp.stop()
    clock.advance(300)
    assert isinstance(await verdict(auth, token), Accept)  # starts a refresh
    await keys.fetch()  # the refresh fails: connection refused
    assert "Connection was refused" in keys._last_error
    clock.advance(STALE_BOUND - 1)  # the cache lifetime (300 s) plus the stale bound
    assert isinstance(await verdict(auth, token), Accept)
    assert keys.ready
    clock.advance(1)
    result = await verdict(auth, token)
    assert isinstance(result, Deny) and result.reason.startswith("JWKS keys unavailable")
    assert not keys.ready
    assert keys.reasons[0].startswith("auth.jwt: JWKS keys older than the stale bound")


@pytest.mark.parametrize("mode", ["500", "invalid-json", "down"])
@pytest_twisted.ensureDeferred
async def test_idp_failing_without_cached_keys(
    serve: Any, idp: IdentityProvider, captured_log: CapturedLog, mode: str
) -> None:
    key = idp.add_key("RS256")
    token = idp.sign(key)
    keys = keys_of(idp)
    if mode == "down":
        await idp.stop()
    else:
        idp.behaviour("/jwks.json").mode = mode
    port = serve(jwt_factory(authenticator(keys)))
    assert_unauthorized(await aio(refused(port, headers=bearer(token))))
    refusals = [e for e in captured_log.events if "status" in e and "reason" in e]
    assert [e["status"] for e in refusals] == [401]
    assert refusals[0]["reason"].startswith("jwt: JWKS keys unavailable")
    assert not keys.ready
    warnings = [e for e in captured_log.events if e.get("error") and e.get("where") == "auth.jwt"]
    assert warnings, "the operator log names the failed fetch"


@pytest_twisted.ensureDeferred
async def test_handshake_waits_for_slow_first_fetch_then_401(
    serve: Any, idp: IdentityProvider, captured_log: CapturedLog
) -> None:
    key = idp.add_key("RS256")
    idp.behaviour("/jwks.json").mode = "hold"
    keys = keys_of(idp, timeout=0.5)
    port = serve(jwt_factory(authenticator(keys)))
    assert_unauthorized(await aio(refused(port, headers=bearer(idp.sign(key)))))
    refusals = [e for e in captured_log.events if "status" in e and "reason" in e]
    assert refusals[0]["reason"] == "jwt: JWKS keys unavailable (no answer within 0.5 seconds)"


@pytest_twisted.ensureDeferred
async def test_response_size_bounded(idp: IdentityProvider) -> None:
    idp.add_key("RS256")
    idp.extra_jwks.extend({"kty": "junk", "pad": "x" * 1000} for _ in range(100))
    client = HTTPSClient(load_trust_root(idp.ca_file), max_bytes=50_000)
    with pytest.raises(FetchError, match="larger than"):
        await client.get(idp.jwks_url)
    await client.close()


@pytest_twisted.ensureDeferred
async def test_untrusted_certificate_refused(idp: IdentityProvider, tmp_path: Path) -> None:
    client = HTTPSClient(None)  # the system's trust store does not know the test CA
    with pytest.raises(FetchError):
        await client.get(idp.jwks_url)
    await client.close()


# -- discovery ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_discovery(idp: IdentityProvider) -> None:
    key = idp.add_key("ES256")
    auth = authenticator(keys_of(idp, url="", issuer=idp.issuer), issuer=idp.issuer)
    assert isinstance(await verdict(auth, idp.sign(key, iss=idp.issuer)), Accept)
    assert idp.requests["/.well-known/openid-configuration"] == 1


@pytest_twisted.ensureDeferred
async def test_discovery_and_key_set_share_one_timeout(idp: IdentityProvider) -> None:
    """Each answer comes within the timeout, both together do not: 401."""
    key = idp.add_key("ES256")
    idp.behaviour("/.well-known/openid-configuration").delay = 0.4
    idp.behaviour("/jwks.json").delay = 0.4
    keys = keys_of(idp, url="", issuer=idp.issuer, timeout=0.6)
    result = await verdict(authenticator(keys), idp.sign(key))
    assert result == Deny("JWKS keys unavailable (no answer within 0.6 seconds)")


@pytest_twisted.ensureDeferred
async def test_discovery_issuer_mismatch_refused(idp: IdentityProvider) -> None:
    key = idp.add_key("ES256")
    idp.discovery_issuer = "https://evil.example"
    keys = keys_of(idp, url="", issuer=idp.issuer)
    auth = authenticator(keys, issuer=idp.issuer)
    result = await verdict(auth, idp.sign(key, iss=idp.issuer))
    assert isinstance(result, Deny)
    assert "is not the configured issuer" in result.reason
    assert idp.requests["/jwks.json"] == 0
    assert not keys.ready


# -- configuration -----------------------------------------------------------


def build_from(data: dict[str, Any], base_dir: Path = Path()) -> JWTAuthenticator:
    return build(Table(data, "auth.jwt"), BuildContext(CONSUMERS, base_dir))


def test_config_jwks_defaults(tmp_path: Path) -> None:
    auth = build_from({"algorithms": ["RS256"], "jwks_url": "https://idp.example/jwks"})
    assert auth.keys is not None
    assert (auth.keys.cache, auth.keys.cooldown, auth.keys.client.timeout) == (300, 30, 3.0)
    assert auth.keys.client.trust_root is None
    assert auth.keys.url == "https://idp.example/jwks"


def test_config_jwks_valid(idp: IdentityProvider) -> None:
    auth = build_from(
        {
            "algorithms": ["ES256"],
            "discovery": True,
            "issuer": "https://idp.example",
            "ca": str(idp.ca_file),
            "jwks_cache": 600,
            "jwks_cooldown": 10,
            "jwks_timeout": 1.5,
        }
    )
    assert auth.keys is not None
    assert (auth.keys.issuer, auth.keys.cache, auth.keys.cooldown) == (
        "https://idp.example",
        600,
        10,
    )
    assert auth.keys.client.trust_root is not None


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ({"jwks_url": "http://idp.example/jwks"}, "auth.jwt.jwks_url", "must be an https:// URL"),
        ({"jwks_url": 3}, "auth.jwt.jwks_url", "expected string"),
        ({"discovery": "yes"}, "auth.jwt.discovery", "expected boolean"),
        ({"discovery": True}, "auth.jwt.discovery", "needs issuer"),
        (
            {"discovery": True, "issuer": "http://idp.example"},
            "auth.jwt.issuer",
            "must be an https:// URL",
        ),
        (
            {"jwks_url": "https://a/j", "secret": "x" * 32},
            "auth.jwt.secret",
            "set exactly one of secret, public_key, jwks_url and discovery",
        ),
        (
            {"jwks_url": "https://a/j", "discovery": True, "issuer": "https://a"},
            "auth.jwt.jwks_url",
            "set exactly one",
        ),
        ({"jwks_url": "https://a/j", "jwks_cache": 30}, "auth.jwt.jwks_cache", "at least 60"),
        ({"jwks_url": "https://a/j", "jwks_cache": 90000}, "auth.jwt.jwks_cache", "at most 86400"),
        (
            {"jwks_url": "https://a/j", "jwks_cache": "5m"},
            "auth.jwt.jwks_cache",
            "expected number",
        ),
        ({"jwks_url": "https://a/j", "jwks_cooldown": 0}, "auth.jwt.jwks_cooldown", "at least 1"),
        ({"jwks_url": "https://a/j", "jwks_cooldown": 400}, "auth.jwt.jwks_cooldown", "at most"),
        ({"jwks_url": "https://a/j", "ca": "missing.pem"}, "auth.jwt.ca", "cannot read"),
        ({"jwks_url": "https://a/j", "ca": 1}, "auth.jwt.ca", "expected string"),
        ({"secret": "x" * 32, "ca": "ca.pem"}, "auth.jwt.ca", "only applies with jwks_url"),
        ({"secret": "x" * 32, "jwks_cache": 60}, "auth.jwt.jwks_cache", "only applies"),
    ],
)
def test_config_jwks_errors(data: dict[str, Any], path: str, message: str) -> None:
    if "secret" not in data:
        data = {"algorithms": ["RS256"], **data}
    with pytest.raises(ConfigError) as raised:
        build_from(data)
    assert raised.value.path == path
    assert message in str(raised.value)


def test_config_jwks_hmac_refused() -> None:
    with pytest.raises(ConfigError) as raised:
        build_from({"algorithms": ["HS256"], "jwks_url": "https://a/j"})
    assert raised.value.path == "auth.jwt.algorithms"
    assert "HMAC keys are never taken from a key set" in str(raised.value)


def test_config_ca_not_pem(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("hello")
    with pytest.raises(ConfigError) as raised:
        build_from({"algorithms": ["RS256"], "jwks_url": "https://a/j", "ca": "ca.pem"}, tmp_path)
    assert raised.value.path == "auth.jwt.ca"
    assert "no PEM certificate" in str(raised.value)
