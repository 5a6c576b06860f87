"""
HTTP Basic authentication (txwssec.auth.basic) through a real server, and
the password hashes behind it (txwssec.passwords).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
import pytest
import pytest_twisted
import websockets
from conftest import CapturedLog, aio, raw_exchange, upgrade_request
from websockets.exceptions import InvalidStatus

from txwssec import (
    BasicAuthenticator,
    Consumer,
    ConsumerDirectory,
    JWTAuthenticator,
    KeyAuthenticator,
    RoutePolicy,
    SecureServerFactory,
)
from txwssec.apps.echo import EchoProtocol
from txwssec.auth.basic import MAX_CREDENTIALS_LENGTH
from txwssec.consumers import key_digest
from txwssec.interfaces import Authenticator
from txwssec.passwords import (
    DUMMY_HASH,
    check_password_hash,
    hash_password,
    verify_password,
)

# Hashing is deliberately slow: each password is hashed once, here.
ALICE_PASSWORD = "s3cr:et-\u00fc"  # a colon and non-ASCII: both legal in a password
BOB_PASSWORD = "hunter2-pbkdf2"
ALICE_HASH = hash_password(ALICE_PASSWORD, "scrypt")
BOB_HASH = hash_password(BOB_PASSWORD, "pbkdf2-sha256")

SECRET = b"0123456789abcdef0123456789abcdef"
BASIC_CHALLENGE = 'Basic realm="wssec", charset="UTF-8"'
UNAUTHORIZED_BODY = b"authentication required\n"

CONSUMERS = ConsumerDirectory(
    [
        Consumer("alice", password=ALICE_HASH),
        Consumer("bob", password=BOB_HASH),
        Consumer("carol", (key_digest("carol-key"),)),  # no password
    ]
)


def basic(user: str, password: str) -> dict[str, str]:
    """An C{Authorization: Basic} header for C{user:password} in UTF-8."""
    return basic_raw(f"{user}:{password}".encode())


def basic_raw(decoded: bytes) -> dict[str, str]:
    """An C{Authorization: Basic} header whose value decodes to C{decoded}."""
    return {"Authorization": "Basic " + base64.b64encode(decoded).decode("ascii")}


class WhoAmI(EchoProtocol):
    """Echo, after first telling the client who it is."""

    def onOpen(self) -> None:
        session = self.session
        assert session is not None
        info = {
            "consumer": session.principal.consumer,
            "method": session.principal.method,
            "expires_at": session.expires_at,
        }
        self.sendMessage(json.dumps(info).encode("utf-8"))


def factory(*authenticators: Authenticator) -> SecureServerFactory:
    """A C{/echo} route trying C{authenticators} (Basic alone by default)."""
    methods = list(authenticators) or [BasicAuthenticator(CONSUMERS)]
    return SecureServerFactory(RoutePolicy("/echo", methods, protocol=WhoAmI))


async def session_info(port: int, headers: Mapping[str, str]) -> dict[str, Any]:
    """Open a session, return what L{WhoAmI} reports, check the echo."""
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/echo", additional_headers=dict(headers)
    ) as ws:
        info: dict[str, Any] = json.loads(await ws.recv())
        await ws.send("hello")
        assert await ws.recv() == "hello"
        return info


async def refused(port: int, headers: Mapping[str, str] | None = None) -> Any:
    """The HTTP response of a handshake that must be refused."""
    try:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/echo", additional_headers=dict(headers or {})
        ):
            pass
    except InvalidStatus as error:
        return error.response
    raise AssertionError("the handshake was accepted")


def assert_unauthorized(response: Any, challenges: Sequence[str] = (BASIC_CHALLENGE,)) -> None:
    assert response.status_code == 401
    assert response.body == UNAUTHORIZED_BODY
    assert response.headers.get_all("WWW-Authenticate") == list(challenges)


def refusal_reasons(log: CapturedLog) -> list[tuple[int, str]]:
    """The (status, reason) of every refusal logged."""
    return [(e["status"], e["reason"]) for e in log.events if "status" in e and "reason" in e]


def split_response(response: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


# -- accepted ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "password"),
    [("alice", ALICE_PASSWORD), ("bob", BOB_PASSWORD)],
    ids=["scrypt", "pbkdf2-sha256"],
)
@pytest_twisted.ensureDeferred
async def test_accepted(serve: Any, user: str, password: str) -> None:
    """
    Both hash schemes work; the password may contain a colon (only the
    first one separates the user name) and non-ASCII characters (UTF-8).
    """
    port = serve(factory())
    info = await aio(session_info(port, basic(user, password)))
    assert info == {"consumer": user, "method": "basic", "expires_at": None}


@pytest_twisted.ensureDeferred
async def test_scheme_is_case_insensitive(serve: Any) -> None:
    port = serve(factory())
    value = basic("bob", BOB_PASSWORD)["Authorization"].replace("Basic", "bAsIc")
    info = await aio(session_info(port, {"Authorization": value}))
    assert info["consumer"] == "bob"


@pytest_twisted.ensureDeferred
async def test_custom_realm(serve: Any) -> None:
    port = serve(factory(BasicAuthenticator(CONSUMERS, realm="internal")))
    response = await aio(refused(port))
    assert_unauthorized(response, ['Basic realm="internal", charset="UTF-8"'])


# -- refused -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (basic("alice", "wrong"), "basic: wrong user name or password"),
        (basic("alice", ALICE_PASSWORD.upper()), "basic: wrong user name or password"),
        (basic("alice", "s3cr"), "basic: wrong user name or password"),
        (basic("bob", ALICE_PASSWORD), "basic: wrong user name or password"),
        (basic("Alice", ALICE_PASSWORD), "basic: wrong user name or password"),
        (basic("mallory", "anything"), "basic: wrong user name or password"),
        (basic("", ""), "basic: wrong user name or password"),
        # carol exists but has no password: no password opens her account
        (basic("carol", ""), "basic: wrong user name or password"),
        (basic("carol", "carol-key"), "basic: wrong user name or password"),
        ({"Authorization": "Basic !!!not-base64!!!"}, "basic: malformed basic credentials"),
        ({"Authorization": "Basic YWxpY2U6cw"}, "basic: malformed basic credentials"),
        ({"Authorization": "Basic"}, "basic: malformed basic credentials"),
        (basic_raw(b"alice"), "basic: malformed basic credentials"),
        (basic_raw(b"alice:\xff\xfe"), "basic: malformed basic credentials"),
        (basic_raw(b"\xe9lise:pw"), "basic: malformed basic credentials"),
    ],
    ids=[
        "wrong-password",
        "password-case",
        "password-prefix",
        "other-users-password",
        "user-name-case",
        "unknown-user",
        "empty",
        "user-without-password",
        "user-without-password-key",
        "not-base64",
        "bad-padding",
        "scheme-only",
        "missing-colon",
        "non-utf8-password",
        "latin1-user",
    ],
)
@pytest_twisted.ensureDeferred
async def test_refused(
    serve: Any, captured_log: CapturedLog, headers: dict[str, str], reason: str
) -> None:
    port = serve(factory())
    assert_unauthorized(await aio(refused(port, headers)))
    assert refusal_reasons(captured_log) == [(401, reason)]


@pytest_twisted.ensureDeferred
async def test_overlong_credentials(serve: Any, captured_log: CapturedLog) -> None:
    """
    Credentials longer than the limit are refused without being decoded
    (so without hashing); the longest allowed are checked as usual.
    """
    port = serve(factory())
    # 1024 base64 characters decode to 768 bytes: "alice:" + 762 bytes
    at_limit = basic("alice", "x" * (MAX_CREDENTIALS_LENGTH * 3 // 4 - len("alice:")))
    assert len(at_limit["Authorization"]) == len("Basic ") + MAX_CREDENTIALS_LENGTH
    over_limit = basic("alice", "x" * (MAX_CREDENTIALS_LENGTH * 3 // 4 - len("alice:") + 1))
    assert_unauthorized(await aio(refused(port, at_limit)))
    assert_unauthorized(await aio(refused(port, over_limit)))
    assert_unauthorized(await aio(refused(port, basic("alice", "x" * 10_000))))
    assert refusal_reasons(captured_log) == [
        (401, "basic: wrong user name or password"),
        (401, "basic: basic credentials too long"),
        (401, "basic: basic credentials too long"),
    ]


@pytest_twisted.ensureDeferred
async def test_two_authorization_headers(serve: Any, captured_log: CapturedLog) -> None:
    """Two Authorization headers are ambiguous: 400, even if both are valid."""
    port = serve(factory())
    value = basic("bob", BOB_PASSWORD)["Authorization"]
    request = upgrade_request("/echo", f"Authorization: {value}", f"Authorization: {value}")
    lines, body = split_response(await aio(raw_exchange(port, request)))
    assert lines[0] == b"HTTP/1.1 400 Bad Request"
    assert body == b"bad request\n"
    assert not [line for line in lines if line.lower().startswith(b"www-authenticate")]
    assert refusal_reasons(captured_log) == [(400, "basic: authorization header sent 2 times")]


@pytest_twisted.ensureDeferred
async def test_unknown_user_and_wrong_password_look_the_same(serve: Any) -> None:
    """
    The client cannot tell an unknown user from a wrong password: the two
    responses are byte-for-byte identical (no Date header, fixed body).
    """
    port = serve(factory())

    async def exchange(user: str, password: str) -> bytes:
        value = basic(user, password)["Authorization"]
        return await raw_exchange(port, upgrade_request("/echo", f"Authorization: {value}"))

    unknown = await aio(exchange("mallory", "wrong"))
    wrong = await aio(exchange("alice", "wrong"))
    no_password = await aio(exchange("carol", "wrong"))
    assert unknown == wrong == no_password
    lines, body = split_response(unknown)
    assert lines[0] == b"HTTP/1.1 401 Unauthorized"
    assert f"WWW-Authenticate: {BASIC_CHALLENGE}".encode("ascii") in lines
    assert body == UNAUTHORIZED_BODY


@pytest_twisted.ensureDeferred
async def test_password_never_logged(serve: Any, captured_log: CapturedLog) -> None:
    port = serve(factory())
    await aio(session_info(port, basic("bob", BOB_PASSWORD)))
    assert_unauthorized(await aio(refused(port, basic("bob", "wrong-but-secret"))))
    text = captured_log.text()
    for secret in (BOB_PASSWORD, "wrong-but-secret", basic("bob", BOB_PASSWORD)["Authorization"]):
        assert secret not in text
    assert base64.b64encode(b"bob:wrong-but-secret").decode("ascii") not in text


@pytest_twisted.ensureDeferred
async def test_bearer_on_basic_route(serve: Any, captured_log: CapturedLog) -> None:
    """A Bearer token is not Basic's credential: no credentials, 401."""
    port = serve(factory())
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, SECRET, "HS256")
    assert_unauthorized(await aio(refused(port, {"Authorization": f"Bearer {token}"})))
    assert refusal_reasons(captured_log) == [(401, "no credentials")]


@pytest_twisted.ensureDeferred
async def test_server_keeps_serving_after_refusals(serve: Any) -> None:
    port = serve(factory())
    for headers in (basic("mallory", "x"), {"Authorization": "Basic %%%"}, basic_raw(b"\xff")):
        assert (await aio(refused(port, headers))).status_code == 401
    info = await aio(session_info(port, basic("alice", ALICE_PASSWORD)))
    assert info["consumer"] == "alice"


# -- routes with several methods ---------------------------------------------------

JWT_CHALLENGE = 'Bearer realm="wssec"'
KEY_CHALLENGE = 'ApiKey header="apikey"'


@pytest_twisted.ensureDeferred
async def test_jwt_and_basic_route(serve: Any, captured_log: CapturedLog) -> None:
    """
    On C{[jwt, basic]}: Bearer goes to jwt, Basic to basic; an invalid
    credential of either kind is refused with both challenges.
    """
    port = serve(factory(JWTAuthenticator(CONSUMERS, SECRET), BasicAuthenticator(CONSUMERS)))
    token = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60}, SECRET, "HS256")
    info = await aio(session_info(port, {"Authorization": f"Bearer {token}"}))
    assert (info["consumer"], info["method"]) == ("carol", "jwt")
    info = await aio(session_info(port, basic("alice", ALICE_PASSWORD)))
    assert (info["consumer"], info["method"]) == ("alice", "basic")

    challenges = [JWT_CHALLENGE, BASIC_CHALLENGE]
    assert_unauthorized(await aio(refused(port, {"Authorization": "Bearer a.b"})), challenges)
    assert_unauthorized(await aio(refused(port, basic("alice", "wrong"))), challenges)
    assert_unauthorized(await aio(refused(port)), challenges)
    assert refusal_reasons(captured_log) == [
        (401, "jwt: malformed token"),
        (401, "basic: wrong user name or password"),
        (401, "no credentials"),
    ]


@pytest_twisted.ensureDeferred
async def test_first_method_with_a_credential_decides(
    serve: Any, captured_log: CapturedLog
) -> None:
    """
    On C{[key, basic]}: a wrong API key is not rescued by valid Basic
    credentials (the key method found its credential, so it decides); a
    valid key wins even when the Basic credentials are wrong.
    """
    port = serve(factory(KeyAuthenticator(CONSUMERS), BasicAuthenticator(CONSUMERS)))
    headers = {"apikey": "wrong-key", **basic("alice", ALICE_PASSWORD)}
    assert_unauthorized(await aio(refused(port, headers)), [KEY_CHALLENGE, BASIC_CHALLENGE])
    assert refusal_reasons(captured_log) == [(401, "key: unknown key")]

    info = await aio(session_info(port, {"apikey": "carol-key", **basic("alice", "wrong")}))
    assert (info["consumer"], info["method"]) == ("carol", "key")
    info = await aio(session_info(port, basic("alice", ALICE_PASSWORD)))
    assert (info["consumer"], info["method"]) == ("alice", "basic")


# -- txwssec.passwords ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "password", "prefix"),
    [(ALICE_HASH, ALICE_PASSWORD, "scrypt:15:8:1:"), (BOB_HASH, BOB_PASSWORD, "pbkdf2-sha256:")],
    ids=["scrypt", "pbkdf2-sha256"],
)
def test_round_trip(stored: str, password: str, prefix: str) -> None:
    assert stored.startswith(prefix)
    check_password_hash(stored)
    assert verify_password(password, stored) is True
    assert verify_password(password + "x", stored) is False
    assert verify_password("", stored) is False
    assert password not in stored


def test_hash_format() -> None:
    scheme, log2_n, r, p, salt, digest = ALICE_HASH.split(":")
    assert (scheme, log2_n, r, p) == ("scrypt", "15", "8", "1")
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(digest)) == 32
    scheme, iterations, salt, digest = BOB_HASH.split(":")
    assert (scheme, iterations) == ("pbkdf2-sha256", "600000")
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(digest)) == 32


def test_fresh_salt_each_time() -> None:
    """The same password hashes differently twice (random salt)."""
    again = hash_password(ALICE_PASSWORD, "scrypt")
    assert again != ALICE_HASH
    assert again.split(":")[4] != ALICE_HASH.split(":")[4]
    assert verify_password(ALICE_PASSWORD, again)


def test_hash_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="unknown scheme"):
        hash_password("pw", "md5")


def test_dummy_hash_never_verifies() -> None:
    check_password_hash(DUMMY_HASH)
    for password in ("", "password", "\x00", ALICE_PASSWORD):
        assert verify_password(password, DUMMY_HASH) is False


_SALT = base64.b64encode(b"s" * 16).decode("ascii")
_DIGEST = base64.b64encode(b"d" * 32).decode("ascii")


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        ("", "unknown password scheme"),
        ("plaintext-password", "unknown password scheme"),
        (f"bcrypt:12:{_SALT}:{_DIGEST}", "unknown password scheme"),
        (f"argon2id:3:{_SALT}:{_DIGEST}", "unknown password scheme"),
        (f"SCRYPT:15:8:1:{_SALT}:{_DIGEST}", "unknown password scheme"),
        ("scrypt", "scrypt hash must be"),
        (f"scrypt:15:8:1:{_SALT}", "scrypt hash must be"),
        (f"scrypt:15:8:1:{_SALT}:{_DIGEST}:extra", "scrypt hash must be"),
        (f"scrypt:x:8:1:{_SALT}:{_DIGEST}", "must be integers"),
        (f"scrypt:-15:8:1:{_SALT}:{_DIGEST}", "must be integers"),
        (f"scrypt:1e1:8:1:{_SALT}:{_DIGEST}", "must be integers"),
        (f"scrypt:9:8:1:{_SALT}:{_DIGEST}", "out of range"),
        (f"scrypt:18:8:1:{_SALT}:{_DIGEST}", "out of range"),
        (f"scrypt:15:0:1:{_SALT}:{_DIGEST}", "out of range"),
        (f"scrypt:15:17:1:{_SALT}:{_DIGEST}", "out of range"),
        (f"scrypt:15:8:0:{_SALT}:{_DIGEST}", "out of range"),
        (f"scrypt:15:8:5:{_SALT}:{_DIGEST}", "out of range"),
        (f"pbkdf2-sha256:600000:{_SALT}", "pbkdf2-sha256 hash must be"),
        (f"pbkdf2-sha256:99999:{_SALT}:{_DIGEST}", "iterations must be"),
        (f"pbkdf2-sha256:10000001:{_SALT}:{_DIGEST}", "iterations must be"),
        (f"pbkdf2-sha256:lots:{_SALT}:{_DIGEST}", "must be integers"),
        (f"scrypt:15:8:1:not*base64:{_DIGEST}", "must be base64"),
        (f"scrypt:15:8:1:{_SALT}:{_DIGEST[:-1]}", "must be base64"),
        (f"scrypt:15:8:1::{_DIGEST}", "too short"),
        (f"scrypt:15:8:1:{base64.b64encode(b's' * 7).decode()}:{_DIGEST}", "too short"),
        (f"pbkdf2-sha256:600000:{_SALT}:{base64.b64encode(b'd' * 15).decode()}", "too short"),
    ],
)
def test_check_password_hash_rejects(stored: str, message: str) -> None:
    """Malformed hashes are refused, naming the problem without echoing the value."""
    with pytest.raises(ValueError, match=message) as info:
        check_password_hash(stored)
    if _SALT in stored:
        assert stored not in str(info.value)
    assert _SALT not in str(info.value)
    with pytest.raises(ValueError, match=message):
        verify_password("pw", stored)


@pytest.mark.parametrize(
    "stored",
    [
        f"scrypt:10:1:1:{_SALT}:{_DIGEST}",
        f"scrypt:17:16:4:{_SALT}:{_DIGEST}",
        f"pbkdf2-sha256:100000:{_SALT}:{_DIGEST}",
        f"pbkdf2-sha256:10000000:{_SALT}:{_DIGEST}",
        f"scrypt:15:8:1:{base64.b64encode(b's' * 8).decode()}:{_DIGEST}",
    ],
)
def test_check_password_hash_accepts_range_edges(stored: str) -> None:
    check_password_hash(stored)
