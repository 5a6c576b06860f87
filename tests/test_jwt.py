"""
JWT bearer authentication (txwssec.auth.jwt) through a real server.

Every refusal is checked on the wire (401, fixed body, ``Bearer`` challenge)
and in the security log (the reason names the check that fired, so a test
cannot pass because an earlier, unrelated check refused the token).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
import pytest
import pytest_twisted
import websockets
from conftest import CapturedLog, aio, raw_exchange, upgrade_request
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from twisted.internet.protocol import Factory, Protocol
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from txwssec import Consumer, ConsumerDirectory, KeyAuthenticator, RoutePolicy, SecureServerFactory
from txwssec.apps.echo import EchoProtocol
from txwssec.auth.jwt import MAX_TOKEN_LENGTH, JWTAuthenticator, KeyMismatch, check_key
from txwssec.consumers import key_digest

# -- keys (generated once per module) -------------------------------------

SECRET = b"0123456789abcdef0123456789abcdef"  # exactly 32 bytes
assert len(SECRET) == 32

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_1024_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
P256_KEY = ec.generate_private_key(ec.SECP256R1())
P384_KEY = ec.generate_private_key(ec.SECP384R1())
ED25519_KEY = ed25519.Ed25519PrivateKey.generate()


def public_pem(private: Any) -> bytes:
    """The SubjectPublicKeyInfo PEM of C{private}'s public key."""
    return bytes(
        private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )


RSA_PEM = public_pem(RSA_KEY)
BEARER_CHALLENGE = 'Bearer realm="wssec"'
UNAUTHORIZED_BODY = b"authentication required\n"

CONSUMERS = ConsumerDirectory(
    [
        Consumer("john"),
        Consumer("jane"),
        Consumer("keyed", (key_digest("keyed-key"),)),
    ]
)


# -- tokens ----------------------------------------------------------------


def claims(sub: Any = "john", lifetime: float = 300, **extra: Any) -> dict[str, Any]:
    """Claims with C{sub} and an C{exp} C{lifetime} seconds from now."""
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "exp": now + int(lifetime), "iat": now}
    payload.update(extra)
    return payload


def hs256(payload: Mapping[str, Any], **headers: Any) -> str:
    return jwt.encode(dict(payload), SECRET, algorithm="HS256", headers=headers or None)


def rs256(payload: Mapping[str, Any], key: Any = RSA_KEY, **headers: Any) -> str:
    return jwt.encode(dict(payload), key, algorithm="RS256", headers=headers or None)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: Mapping[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def hmac_signed(header: Mapping[str, Any], payload: Mapping[str, Any], secret: bytes) -> str:
    """An HS256 token signed by hand (for what PyJWT refuses to sign)."""
    signing_input = f"{b64json(header)}.{b64json(payload)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def unsigned(header: Mapping[str, Any], payload: Mapping[str, Any], signature: str = "") -> str:
    """A hand-made compact JWS: no library would produce these."""
    return f"{b64json(header)}.{b64json(payload)}.{signature}"


# -- server and client helpers ---------------------------------------------


class WhoAmI(EchoProtocol):
    """Echo, after first telling the client what its session holds."""

    def onOpen(self) -> None:
        session = self.session
        assert session is not None
        info = {
            "consumer": session.principal.consumer,
            "method": session.principal.method,
            "claims": dict(session.principal.claims),
            "expires_at": session.expires_at,
        }
        self.sendMessage(json.dumps(info).encode("utf-8"))


def jwt_factory(
    authenticator: JWTAuthenticator | None = None,
    *,
    subprotocols: tuple[str, ...] = (),
    extra: Sequence[Any] = (),
) -> SecureServerFactory:
    """A C{/echo} route authenticated by C{authenticator} (HS256 by default)."""
    if authenticator is None:
        authenticator = JWTAuthenticator(CONSUMERS, SECRET)
    return SecureServerFactory(
        RoutePolicy("/echo", [authenticator, *extra], protocol=WhoAmI, subprotocols=subprotocols)
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def session_info(
    port: int,
    *,
    headers: Mapping[str, str] | None = None,
    subprotocols: Sequence[str] | None = None,
    query: str = "",
) -> tuple[str | None, dict[str, Any]]:
    """
    Open a session, read what L{WhoAmI} reports, check the echo works.

    @return: the negotiated subprotocol and the session information.
    """
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/echo{query}",
        additional_headers=dict(headers or {}),
        subprotocols=None if subprotocols is None else [Subprotocol(s) for s in subprotocols],
    ) as ws:
        info = json.loads(await ws.recv())
        await ws.send("hello")
        assert await ws.recv() == "hello"
        return ws.subprotocol, info


async def refused(
    port: int,
    *,
    headers: Mapping[str, str] | None = None,
    subprotocols: Sequence[str] | None = None,
    query: str = "",
) -> Any:
    """The HTTP response of a handshake that must be refused."""
    try:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/echo{query}",
            additional_headers=dict(headers or {}),
            subprotocols=None if subprotocols is None else [Subprotocol(s) for s in subprotocols],
        ):
            pass
    except InvalidStatus as error:
        return error.response
    raise AssertionError("the handshake was accepted")


def assert_unauthorized(response: Any, challenges: Sequence[str] = (BEARER_CHALLENGE,)) -> None:
    assert response.status_code == 401
    assert response.body == UNAUTHORIZED_BODY
    assert response.headers.get_all("WWW-Authenticate") == list(challenges)


def assert_logged(log: CapturedLog, reason: str, status: int = 401) -> None:
    """Exactly one refusal was logged, with C{reason} and C{status}."""
    refusals = [e for e in log.events if "status" in e and "reason" in e]
    assert [(e["status"], e["reason"]) for e in refusals] == [(status, reason)]


async def refused_with(
    port: int, log: CapturedLog, reason: str, token: str | None = None, **kwargs: Any
) -> None:
    """
    Send C{token} as a Bearer header; expect a 401 logged with C{reason},
    and no part of the token in the log.
    """
    if token is not None:
        kwargs["headers"] = bearer(token)
    assert_unauthorized(await aio(refused(port, **kwargs)))
    assert_logged(log, reason)
    if token:
        text = log.text()
        assert all(part not in text for part in token.split(".") if len(part) > 8)


async def read_head(port: int, request: bytes) -> bytes:
    """Send C{request} on a raw socket; return the response head, then hang up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()


# -- accepted tokens ---------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "signing_key", "verifying_key"),
    [
        ("HS256", SECRET, SECRET),
        ("HS512", SECRET * 2, SECRET * 2),
        ("RS256", RSA_KEY, RSA_PEM),
        ("PS256", RSA_KEY, RSA_PEM.decode("ascii")),
        ("ES256", P256_KEY, public_pem(P256_KEY)),
        ("ES384", P384_KEY, public_pem(P384_KEY)),
        ("EdDSA", ED25519_KEY, public_pem(ED25519_KEY)),
    ],
    ids=["HS256", "HS512", "RS256", "PS256", "ES256", "ES384", "EdDSA"],
)
@pytest_twisted.ensureDeferred
async def test_bearer_header_accepted(
    serve: Any, algorithm: str, signing_key: Any, verifying_key: Any
) -> None:
    """
    C{Authorization: Bearer <jwt>} opens a session for the C{sub} consumer,
    with the verified claims and no subprotocol.
    """
    port = serve(jwt_factory(JWTAuthenticator(CONSUMERS, verifying_key, [algorithm])))
    payload = claims("jane", role="admin")
    token = jwt.encode(payload, signing_key, algorithm=algorithm)
    subprotocol, info = await aio(session_info(port, headers=bearer(token)))
    assert subprotocol is None
    assert info["consumer"] == "jane"
    assert info["method"] == "jwt"
    assert info["claims"] == payload
    assert info["expires_at"] == payload["exp"]


@pytest_twisted.ensureDeferred
async def test_bearer_scheme_is_case_insensitive(serve: Any) -> None:
    port = serve(jwt_factory())
    headers = {"Authorization": f"bEaReR {hs256(claims())}"}
    _, info = await aio(session_info(port, headers=headers))
    assert info["consumer"] == "john"


@pytest_twisted.ensureDeferred
async def test_custom_consumer_claim(serve: Any) -> None:
    """The consumer comes from C{consumer_claim}, not from C{sub}."""
    authenticator = JWTAuthenticator(CONSUMERS, SECRET, consumer_claim="client_id")
    port = serve(jwt_factory(authenticator))
    token = hs256(claims("someone-else", client_id="jane"))
    _, info = await aio(session_info(port, headers=bearer(token)))
    assert info["consumer"] == "jane"


@pytest_twisted.ensureDeferred
async def test_custom_consumer_claim_missing(serve: Any, captured_log: CapturedLog) -> None:
    """With C{consumer_claim} set, a valid C{sub} alone does not name a consumer."""
    authenticator = JWTAuthenticator(CONSUMERS, SECRET, consumer_claim="client_id")
    port = serve(jwt_factory(authenticator))
    await refused_with(
        port, captured_log, "jwt: token has no string client_id claim", hs256(claims("john"))
    )


@pytest_twisted.ensureDeferred
async def test_subprotocol_bearer_accepted_and_answered_bearer(serve: Any) -> None:
    """
    C{Sec-WebSocket-Protocol: bearer, <jwt>} (browsers) is accepted and
    answered with the marker C{bearer} only.
    """
    port = serve(jwt_factory())
    subprotocol, info = await aio(session_info(port, subprotocols=["bearer", hs256(claims())]))
    assert subprotocol == "bearer"
    assert info["consumer"] == "john"


@pytest_twisted.ensureDeferred
async def test_subprotocol_answer_never_contains_token_raw(serve: Any) -> None:
    """The raw 101 answers exactly C{bearer}; no byte of the token comes back."""
    port = serve(jwt_factory())
    token = hs256(claims())
    head = await aio(
        read_head(port, upgrade_request("/echo", f"Sec-WebSocket-Protocol: bearer, {token}"))
    )
    assert head.startswith(b"HTTP/1.1 101 ")
    lines = head.split(b"\r\n")
    assert [line for line in lines if line.lower().startswith(b"sec-websocket-protocol:")] == [
        b"Sec-WebSocket-Protocol: bearer"
    ]
    for part in token.split("."):
        assert part.encode("ascii") not in head


@pytest_twisted.ensureDeferred
async def test_subprotocol_application_protocol_preferred(serve: Any) -> None:
    """With an application subprotocol offered too, the reply names it."""
    port = serve(jwt_factory(subprotocols=("chat.v1",)))
    offered = ["chat.v1", "bearer", hs256(claims())]
    subprotocol, info = await aio(session_info(port, subprotocols=offered))
    assert subprotocol == "chat.v1"
    assert info["consumer"] == "john"


@pytest_twisted.ensureDeferred
async def test_subprotocol_marker_without_token(serve: Any, captured_log: CapturedLog) -> None:
    port = serve(jwt_factory())
    await refused_with(
        port,
        captured_log,
        'jwt: Sec-WebSocket-Protocol has "bearer" with no credential after it',
        subprotocols=["bearer"],
    )


@pytest_twisted.ensureDeferred
async def test_header_read_before_subprotocol(serve: Any, captured_log: CapturedLog) -> None:
    """
    The header is read first: an invalid Bearer header is not rescued by a
    valid token in C{Sec-WebSocket-Protocol}.
    """
    port = serve(jwt_factory())
    await refused_with(
        port,
        captured_log,
        "jwt: token names an unknown consumer",
        hs256(claims("mallory")),
        subprotocols=["bearer", hs256(claims("john"))],
    )


@pytest_twisted.ensureDeferred
async def test_query_token_refused_by_default(serve: Any, captured_log: CapturedLog) -> None:
    """Query strings leak into logs: C{?token=} is not read unless configured."""
    port = serve(jwt_factory())
    await refused_with(port, captured_log, "no credentials", query=f"?token={hs256(claims())}")


@pytest_twisted.ensureDeferred
async def test_query_token_accepted_when_configured(serve: Any) -> None:
    port = serve(jwt_factory(JWTAuthenticator(CONSUMERS, SECRET, query="token")))
    subprotocol, info = await aio(session_info(port, query=f"?token={hs256(claims())}"))
    assert subprotocol is None
    assert info["consumer"] == "john"


@pytest_twisted.ensureDeferred
async def test_query_token_twice_is_ambiguous(serve: Any, captured_log: CapturedLog) -> None:
    port = serve(jwt_factory(JWTAuthenticator(CONSUMERS, SECRET, query="token")))
    token = hs256(claims())
    response = await aio(refused(port, query=f"?token={token}&token={token}"))
    assert response.status_code == 400
    assert response.body == b"bad request\n"
    assert response.headers.get_all("WWW-Authenticate") == []
    assert_logged(captured_log, "jwt: query parameter token sent 2 times", status=400)


# -- expiry and leeway ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_expires_at_is_exp_plus_leeway(serve: Any) -> None:
    """The session ends when the token stops being valid by the same rule."""
    port = serve(jwt_factory(JWTAuthenticator(CONSUMERS, SECRET, leeway=2.5)))
    payload = claims()
    _, info = await aio(session_info(port, headers=bearer(hs256(payload))))
    assert info["expires_at"] == payload["exp"] + 2.5


@pytest_twisted.ensureDeferred
async def test_leeway_lets_just_expired_token_in(serve: Any) -> None:
    port = serve(jwt_factory(JWTAuthenticator(CONSUMERS, SECRET, leeway=60)))
    payload = claims(lifetime=-5)
    _, info = await aio(session_info(port, headers=bearer(hs256(payload))))
    assert info["consumer"] == "john"
    assert info["expires_at"] == payload["exp"] + 60


@pytest_twisted.ensureDeferred
async def test_leeway_extended_session_closed_3000(serve: Any) -> None:
    """
    A token accepted thanks to the leeway is closed with 3000 once
    C{exp + leeway} passes (about a second here).
    """
    port = serve(jwt_factory(JWTAuthenticator(CONSUMERS, SECRET, leeway=2)))
    # A fractional exp: with claims()' whole seconds, exp + leeway could fall
    # a few milliseconds after now, and the handshake would be refused.
    payload = {**claims(), "exp": time.time() - 1}

    async def client() -> tuple[int, str]:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/echo", additional_headers=bearer(hs256(payload))
        ) as ws:
            await ws.recv()  # WhoAmI's report
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except websockets.exceptions.ConnectionClosed as closed:
                assert closed.rcvd is not None
                return closed.rcvd.code, closed.rcvd.reason
        raise AssertionError("the session was not closed")

    code, reason = await aio(client())
    assert code == 3000
    assert reason == "credentials expired"


# -- refusals: claims -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_missing_exp(serve: Any, captured_log: CapturedLog) -> None:
    port = serve(jwt_factory())
    token = hs256({"sub": "john"})
    await refused_with(
        port, captured_log, 'jwt: invalid token: Token is missing the "exp" claim', token
    )


@pytest_twisted.ensureDeferred
async def test_expired(serve: Any, captured_log: CapturedLog) -> None:
    port = serve(jwt_factory())
    token = hs256(claims(lifetime=-5))
    await refused_with(port, captured_log, "jwt: invalid token: Signature has expired", token)


@pytest_twisted.ensureDeferred
async def test_expired_beyond_leeway(serve: Any, captured_log: CapturedLog) -> None:
    port = serve(jwt_factory(JWTAuthenticator(CONSUMERS, SECRET, leeway=10)))
    token = hs256(claims(lifetime=-30))
    await refused_with(port, captured_log, "jwt: invalid token: Signature has expired", token)


@pytest_twisted.ensureDeferred
async def test_nbf_in_future(serve: Any, captured_log: CapturedLog) -> None:
    port = serve(jwt_factory())
    token = hs256(claims(nbf=int(time.time()) + 120))
    await refused_with(
        port, captured_log, "jwt: invalid token: The token is not yet valid (nbf)", token
    )


@pytest_twisted.ensureDeferred
async def test_iat_in_future(serve: Any, captured_log: CapturedLog) -> None:
    """
    PyJWT (2.10 and later) refuses an C{iat} in the future with
    C{ImmatureSignatureError}; older versions only checked its type. This
    asserts what the pinned PyJWT really does: refused.
    """
    port = serve(jwt_factory())
    token = hs256(claims(iat=int(time.time()) + 120))
    await refused_with(
        port, captured_log, "jwt: invalid token: The token is not yet valid (iat)", token
    )


@pytest_twisted.ensureDeferred
async def test_issuer_and_audience_accepted(serve: Any) -> None:
    authenticator = JWTAuthenticator(
        CONSUMERS, SECRET, issuer="https://issuer.example", audience="wssec"
    )
    port = serve(jwt_factory(authenticator))
    token = hs256(claims(iss="https://issuer.example", aud="wssec"))
    _, info = await aio(session_info(port, headers=bearer(token)))
    assert info["consumer"] == "john"
    # RFC 7519 4.1.3: an audience list is accepted when it contains ours.
    token = hs256(claims(iss="https://issuer.example", aud=["other", "wssec"]))
    _, info = await aio(session_info(port, headers=bearer(token)))
    assert info["consumer"] == "john"


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"iss": "https://evil.example"}, "Invalid issuer"),
        # exact match: neither a prefix nor an extension of the issuer passes
        ({"iss": "https://issuer.example.evil"}, "Invalid issuer"),
        ({"iss": "https://issuer"}, "Invalid issuer"),
        ({"iss": ["https://issuer.example"]}, "Payload Issuer (iss) must be a string"),
        ({}, 'Token is missing the "iss" claim'),
    ],
)
@pytest_twisted.ensureDeferred
async def test_wrong_or_missing_issuer(
    serve: Any, captured_log: CapturedLog, extra: dict[str, Any], reason: str
) -> None:
    authenticator = JWTAuthenticator(CONSUMERS, SECRET, issuer="https://issuer.example")
    port = serve(jwt_factory(authenticator))
    # PyJWT will not sign a non-string iss: sign by hand
    token = hmac_signed({"alg": "HS256", "typ": "JWT"}, claims(**extra), SECRET)
    await refused_with(port, captured_log, f"jwt: invalid token: {reason}", token)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"aud": "other"}, "Audience doesn't match"),
        ({"aud": "wssec-other"}, "Audience doesn't match"),
        ({"aud": ["other"]}, "Audience doesn't match"),
        ({}, 'Token is missing the "aud" claim'),
    ],
)
@pytest_twisted.ensureDeferred
async def test_wrong_or_missing_audience(
    serve: Any, captured_log: CapturedLog, extra: dict[str, Any], reason: str
) -> None:
    port = serve(jwt_factory(JWTAuthenticator(CONSUMERS, SECRET, audience="wssec")))
    await refused_with(port, captured_log, f"jwt: invalid token: {reason}", hs256(claims(**extra)))


@pytest_twisted.ensureDeferred
async def test_audience_in_token_without_configured_audience(
    serve: Any, captured_log: CapturedLog
) -> None:
    """
    A token meant for some audience is refused when none is configured
    (PyJWT behaviour, documented in README): it was not issued for us.
    """
    port = serve(jwt_factory())
    token = hs256(claims(aud="somewhere"))
    await refused_with(port, captured_log, "jwt: invalid token: Invalid audience", token)


@pytest_twisted.ensureDeferred
async def test_unknown_consumer(serve: Any, captured_log: CapturedLog) -> None:
    port = serve(jwt_factory())
    token = hs256(claims("mallory"))
    await refused_with(port, captured_log, "jwt: token names an unknown consumer", token)


@pytest_twisted.ensureDeferred
async def test_sub_not_a_string(serve: Any, captured_log: CapturedLog) -> None:
    """PyJWT itself refuses a non-string C{sub} (RFC 7519 4.1.2)."""
    port = serve(jwt_factory())
    await refused_with(
        port, captured_log, "jwt: invalid token: Subject must be a string", hs256(claims(123))
    )


@pytest.mark.parametrize("value", [123, ["john"], {"name": "john"}, None])
@pytest_twisted.ensureDeferred
async def test_consumer_claim_not_a_string(
    serve: Any, captured_log: CapturedLog, value: Any
) -> None:
    """A custom claim PyJWT does not check is checked by txwssec."""
    authenticator = JWTAuthenticator(CONSUMERS, SECRET, consumer_claim="client_id")
    port = serve(jwt_factory(authenticator))
    token = hs256(claims(client_id=value))
    await refused_with(port, captured_log, "jwt: token has no string client_id claim", token)


# -- refusals: token shape and header -------------------------------------------


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (unsigned({"alg": "none", "typ": "JWT"}, claims()), "jwt: malformed token"),
        # with a dummy signature the shape passes and the alg check refuses it
        (unsigned({"alg": "none"}, claims(), "AAAA"), "jwt: token algorithm not allowed"),
        (unsigned({"alg": "None"}, claims(), "AAAA"), "jwt: token algorithm not allowed"),
        (unsigned({"alg": "NONE"}, claims(), "AAAA"), "jwt: token algorithm not allowed"),
        (unsigned({"typ": "JWT"}, claims(), "AAAA"), "jwt: token algorithm not allowed"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_alg_none(serve: Any, captured_log: CapturedLog, token: str, reason: str) -> None:
    port = serve(jwt_factory())
    await refused_with(port, captured_log, reason, token)


@pytest_twisted.ensureDeferred
async def test_hs_rs_key_confusion(serve: Any, captured_log: CapturedLog) -> None:
    """
    The classic attack: HMAC-sign with the server's RSA public key (PEM
    bytes) as the secret, and hope the server verifies with that same key.
    PyJWT will not produce such a token, so it is signed by hand.
    """
    port = serve(jwt_factory(JWTAuthenticator(CONSUMERS, RSA_PEM, ["RS256"])))
    token = hmac_signed({"alg": "HS256", "typ": "JWT"}, claims(), RSA_PEM)
    await refused_with(port, captured_log, "jwt: token algorithm not allowed", token)


@pytest_twisted.ensureDeferred
async def test_other_rsa_algorithm_refused(serve: Any, captured_log: CapturedLog) -> None:
    """Same key family, unconfigured algorithm: refused."""
    port = serve(jwt_factory(JWTAuthenticator(CONSUMERS, RSA_PEM, ["RS256"])))
    token = jwt.encode(claims(), RSA_KEY, algorithm="RS512")
    await refused_with(port, captured_log, "jwt: token algorithm not allowed", token)


@pytest_twisted.ensureDeferred
async def test_signed_by_another_key(serve: Any, captured_log: CapturedLog) -> None:
    port = serve(jwt_factory(JWTAuthenticator(CONSUMERS, RSA_PEM, ["RS256"])))
    token = rs256(claims(), RSA_OTHER_KEY)
    await refused_with(
        port, captured_log, "jwt: invalid token: Signature verification failed", token
    )


@pytest_twisted.ensureDeferred
async def test_tampered_payload(serve: Any, captured_log: CapturedLog) -> None:
    port = serve(jwt_factory())
    header, _, signature = hs256(claims("john")).split(".")
    token = f"{header}.{b64json(claims('jane'))}.{signature}"
    await refused_with(
        port, captured_log, "jwt: invalid token: Signature verification failed", token
    )


class CountingFactory(Factory):
    """Counts the connections it is offered (and hangs them up)."""

    def __init__(self) -> None:
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        self.connections += 1
        return Protocol()


@pytest.mark.parametrize("source", ["jku", "x5u", "jwk", "x5c"])
@pytest_twisted.ensureDeferred
async def test_key_source_header_refused_and_never_fetched(
    serve: Any, captured_log: CapturedLog, source: str
) -> None:
    """
    A token naming a key source is refused even though it is signed with
    the right key, and the URL it names is never contacted.
    """
    listener = CountingFactory()
    key_server = serve(listener)
    url = f"http://127.0.0.1:{key_server}/keys.json"
    attacker_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(RSA_OTHER_KEY.public_key(), as_dict=True)
    values: dict[str, Any] = {
        "jku": url,
        "x5u": url,
        "jwk": attacker_jwk,
        "x5c": [base64.b64encode(b"not really a certificate").decode("ascii")],
    }
    port = serve(jwt_factory(JWTAuthenticator(CONSUMERS, RSA_PEM, ["RS256"])))
    token = rs256(claims(), **{source: values[source]})
    await refused_with(
        port,
        captured_log,
        f"jwt: token header names a key source ({source}); keys are never fetched",
        token,
    )
    assert listener.connections == 0


@pytest_twisted.ensureDeferred
async def test_kid(serve: Any, captured_log: CapturedLog) -> None:
    """With C{kid="k1"}: C{k1} accepted; another kid, or none, refused."""
    port = serve(jwt_factory(JWTAuthenticator(CONSUMERS, RSA_PEM, ["RS256"], kid="k1")))
    _, info = await aio(session_info(port, headers=bearer(rs256(claims(), kid="k1"))))
    assert info["consumer"] == "john"
    for token in (rs256(claims(), kid="k2"), rs256(claims()), rs256(claims(), kid="K1")):
        assert_unauthorized(await aio(refused(port, headers=bearer(token))))
    refusals = [e["reason"] for e in captured_log.events if "status" in e and "reason" in e]
    assert refusals == ["jwt: token kid does not match"] * 3


@pytest_twisted.ensureDeferred
async def test_token_too_long(serve: Any, captured_log: CapturedLog) -> None:
    """
    A validly signed token of more than 8192 characters is refused on its
    length; the longest one within the limit is accepted.
    """
    port = serve(jwt_factory())

    # the longest token within the limit, and the next one beyond it
    padding = MAX_TOKEN_LENGTH * 3 // 4
    payload = claims()
    while len(hs256({**payload, "pad": "x" * padding})) > MAX_TOKEN_LENGTH:
        padding -= 1
    longest = hs256({**payload, "pad": "x" * padding})
    too_long = hs256({**payload, "pad": "x" * (padding + 1)})
    assert MAX_TOKEN_LENGTH - 2 <= len(longest) <= MAX_TOKEN_LENGTH < len(too_long)

    _, info = await aio(session_info(port, headers=bearer(longest)))
    assert info["consumer"] == "john"
    await refused_with(port, captured_log, "jwt: token too long", too_long)


@pytest_twisted.ensureDeferred
async def test_ten_kilobyte_token(serve: Any, captured_log: CapturedLog) -> None:
    port = serve(jwt_factory())
    token = hs256(claims(pad="x" * 7600))
    assert len(token) > 10_000
    await refused_with(port, captured_log, "jwt: token too long", token)


@pytest_twisted.ensureDeferred
async def test_non_ascii_token(serve: Any, captured_log: CapturedLog) -> None:
    """
    Latin-1 bytes in the token (sent raw: clients refuse to) are refused
    as malformed, with the usual 401, and the server keeps serving.
    """
    port = serve(jwt_factory())
    header, payload, signature = hs256(claims()).split(".")
    raw = f"Authorization: Bearer {header}.{payload}\u00e9\u00ff.{signature}"
    response = await aio(raw_exchange(port, upgrade_request("/echo", raw)))
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 401 Unauthorized"
    assert b'WWW-Authenticate: Bearer realm="wssec"' in lines
    assert body == UNAUTHORIZED_BODY
    assert_logged(captured_log, "jwt: malformed token")
    _, info = await aio(session_info(port, headers=bearer(hs256(claims()))))
    assert info["consumer"] == "john"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("a.b", "jwt: malformed token"),
        ("a.b.c.d", "jwt: malformed token"),
        ("a..c", "jwt: malformed token"),
        ("a.b.c=", "jwt: malformed token"),
        ("a b.c.d", "jwt: malformed token"),
        ("a.b.c,d.e.f", "jwt: malformed token"),
        # "Bearer" with nothing after it (the header value is stripped) is
        # not a Bearer credential at all
        ("", "no credentials"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_token(
    serve: Any, captured_log: CapturedLog, token: str, reason: str
) -> None:
    port = serve(jwt_factory())
    await refused_with(port, captured_log, reason, token)


@pytest.mark.parametrize(
    "header",
    [
        b"not json",
        b'["alg", "HS256"]',
        b'"HS256"',
        b'{"alg": "HS256"',
        b'{"alg": "HS256", "x": "\xff"}',
        b"[" * 3000 + b"]" * 3000,
    ],
    ids=["text", "array", "string", "truncated", "not-utf8", "nested"],
)
@pytest_twisted.ensureDeferred
async def test_undecodable_header(serve: Any, captured_log: CapturedLog, header: bytes) -> None:
    """Right shape, but the header segment is not a base64url JSON object."""
    port = serve(jwt_factory())
    _, payload, signature = hs256(claims()).split(".")
    token = f"{b64url(header)}.{payload}.{signature}"
    await refused_with(port, captured_log, "jwt: malformed token header", token)


@pytest_twisted.ensureDeferred
async def test_header_base64_that_only_pyjwt_refuses(
    serve: Any, captured_log: CapturedLog
) -> None:
    """
    A header segment with non-zero trailing bits decodes leniently for the
    precise refusals, but PyJWT, which verifies, refuses it: still 401.
    """
    port = serve(jwt_factory())
    header, payload, signature = next(
        token.split(".")
        for token in (hs256(claims(), note="x" * n) for n in range(3))
        if len(token.split(".")[0]) % 4 in (2, 3)
    )
    last = header[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    tweaked = header[:-1] + alphabet[alphabet.index(last) | 1]
    assert tweaked != header
    token = f"{tweaked}.{payload}.{signature}"
    await refused_with(port, captured_log, "jwt: invalid token: Invalid header padding", token)


@pytest_twisted.ensureDeferred
async def test_basic_credentials_on_jwt_route(serve: Any, captured_log: CapturedLog) -> None:
    """C{Authorization: Basic} is not a JWT method's credential: no credentials."""
    port = serve(jwt_factory())
    basic = base64.b64encode(b"john:password").decode("ascii")
    await refused_with(
        port, captured_log, "no credentials", headers={"Authorization": f"Basic {basic}"}
    )


@pytest_twisted.ensureDeferred
async def test_no_credentials(serve: Any, captured_log: CapturedLog) -> None:
    port = serve(jwt_factory())
    await refused_with(port, captured_log, "no credentials")


@pytest_twisted.ensureDeferred
async def test_two_authorization_headers(serve: Any, captured_log: CapturedLog) -> None:
    port = serve(jwt_factory())
    token = hs256(claims())
    request = upgrade_request(
        "/echo", f"Authorization: Bearer {token}", f"Authorization: Bearer {token}"
    )
    response = await aio(raw_exchange(port, request))
    assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert response.endswith(b"\r\n\r\nbad request\n")
    assert b"WWW-Authenticate" not in response
    assert_logged(captured_log, "jwt: Authorization header sent 2 times", status=400)


@pytest_twisted.ensureDeferred
async def test_jwt_then_key_route(serve: Any) -> None:
    """On C{[jwt, key]} a request with only an API key goes to the key method."""
    factory = jwt_factory(extra=[KeyAuthenticator(CONSUMERS, subprotocol="")])
    port = serve(factory)
    _, info = await aio(session_info(port, headers={"apikey": "keyed-key"}))
    assert (info["consumer"], info["method"]) == ("keyed", "key")
    _, info = await aio(session_info(port, headers=bearer(hs256(claims()))))
    assert (info["consumer"], info["method"]) == ("john", "jwt")
    response = await aio(refused(port))
    assert_unauthorized(response, [BEARER_CHALLENGE, 'ApiKey header="apikey"'])


# -- check_key ---------------------------------------------------------------------


def test_check_key_hmac_secret_length() -> None:
    assert check_key(SECRET, ["HS256"]) == SECRET
    assert check_key(SECRET.decode("ascii"), ["HS256", "HS512"]) == SECRET
    with pytest.raises(KeyMismatch, match="at least 32 bytes") as info:
        check_key(SECRET[:31], ["HS256"])
    assert not info.value.about_algorithms
    with pytest.raises(KeyMismatch, match="at least 32 bytes"):
        check_key("", ["HS256"])


@pytest.mark.parametrize(
    "key",
    [
        RSA_PEM,
        RSA_PEM.decode("ascii"),
        RSA_KEY.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ" + "A" * 40,
    ],
)
def test_check_key_public_key_as_hmac_secret(key: str | bytes) -> None:
    """Key confusion is stopped at configuration time too."""
    with pytest.raises(KeyMismatch, match="shared secret, not a public key"):
        check_key(key, ["HS256"])


@pytest.mark.parametrize("key", [SECRET, RSA_PEM])
def test_check_key_mixed_families(key: bytes) -> None:
    with pytest.raises(KeyMismatch, match="cannot be mixed") as info:
        check_key(key, ["HS256", "RS256"])
    assert info.value.about_algorithms


@pytest.mark.parametrize(
    ("private", "algorithms"),
    [
        (P256_KEY, ["ES384"]),
        (P384_KEY, ["ES256"]),
        (P256_KEY, ["ES256", "ES384"]),
        (RSA_1024_KEY, ["RS256"]),
        (RSA_1024_KEY, ["PS256"]),
        (RSA_KEY, ["ES256"]),
        (RSA_KEY, ["EdDSA"]),
        (P256_KEY, ["RS256"]),
        (ED25519_KEY, ["RS256"]),
        (ED25519_KEY, ["ES256"]),
    ],
)
def test_check_key_wrong_public_key(private: Any, algorithms: list[str]) -> None:
    with pytest.raises(KeyMismatch, match="does not suit") as info:
        check_key(public_pem(private), algorithms)
    assert not info.value.about_algorithms


@pytest.mark.parametrize(
    ("private", "algorithms", "kind"),
    [
        (RSA_KEY, ["RS256", "RS512", "PS256"], rsa.RSAPublicKey),
        (P256_KEY, ["ES256"], ec.EllipticCurvePublicKey),
        (P384_KEY, ["ES384"], ec.EllipticCurvePublicKey),
        (ED25519_KEY, ["EdDSA"], ed25519.Ed25519PublicKey),
    ],
)
def test_check_key_suitable_public_key(private: Any, algorithms: list[str], kind: type) -> None:
    assert isinstance(check_key(public_pem(private), algorithms), kind)


@pytest.mark.parametrize(
    "key",
    [
        b"not a key at all, but long enough to be a secret",
        RSA_KEY.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
    ],
)
def test_check_key_not_a_pem_public_key(key: bytes) -> None:
    """A private key is not accepted where a public key is expected."""
    with pytest.raises(KeyMismatch, match="not a PEM public key"):
        check_key(key, ["RS256"])


@pytest.mark.parametrize(
    "algorithms", [["none"], ["None"], ["HS256", "none"], ["HS1"], ["RS128"], ["hs256"], []]
)
def test_check_key_unknown_algorithms(algorithms: list[str]) -> None:
    with pytest.raises(KeyMismatch) as info:
        check_key(SECRET, algorithms)
    assert info.value.about_algorithms


def test_authenticator_checks_its_key() -> None:
    """The constructor refuses what check_key refuses."""
    with pytest.raises(KeyMismatch):
        JWTAuthenticator(CONSUMERS, RSA_PEM, ["HS256"])
    with pytest.raises(KeyMismatch):
        JWTAuthenticator(CONSUMERS, SECRET[:16])
    with pytest.raises(KeyMismatch):
        JWTAuthenticator(CONSUMERS, SECRET, ["none"])
