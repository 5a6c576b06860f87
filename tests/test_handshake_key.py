"""
API key authentication and the handshake contract, end to end: a
L{SecureServerFactory} serving L{EchoProtocol} behind a L{KeyAuthenticator},
driven by real clients (websockets, raw sockets) on 127.0.0.1.

Where the key may be carried, in the order the server reads it (the first
place that has one decides, see L{txwssec.auth._extract.first_found}):

    1. the C{apikey} header (name configurable);
    2. C{Sec-WebSocket-Protocol: token, <key>} (the reply names C{token} or an
       application subprotocol, never the key);
    3. the query string, only when enabled (off by default).

Every refusal is followed, on the same server, by a client that succeeds.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
import websockets
from conftest import aio, raw_exchange, upgrade_request
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin, Subprotocol

from txwssec import (
    Consumer,
    ConsumerDirectory,
    KeyAuthenticator,
    OriginPolicy,
    RoutePolicy,
    SecureServerFactory,
    ServerPolicy,
)
from txwssec.apps.echo import EchoProtocol
from txwssec.consumers import key_digest, parse_stored_key
from txwssec.errors import FIXED_BODIES
from txwssec.origin import parse_origin

ALICE_KEY = "alice-key-7f3c9a"
BOB_KEY = "bob-key-21d0e4"
#: Stored only as "sha256:<hex>" in the directory.
CAROL_KEY = "carol-key-hashed-5b8e"
#: Registered for a consumer, but longer than MAX_KEY_LENGTH (512): never looked up.
LONG_KEY = "L" * 513

AUTH_BODY = b"authentication required\n"
CHALLENGE = 'ApiKey header="apikey"'


def directory() -> ConsumerDirectory:
    return ConsumerDirectory(
        [
            Consumer("alice", (key_digest(ALICE_KEY),)),
            Consumer("bob", (key_digest(BOB_KEY),)),
            Consumer(
                "carol",
                (parse_stored_key("sha256:" + hashlib.sha256(CAROL_KEY.encode()).hexdigest()),),
            ),
            Consumer("long", (key_digest(LONG_KEY),)),
        ]
    )


class WhoAmIProtocol(EchoProtocol):
    """Echo, except that C{whoami} is answered with the consumer's name."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if payload == b"whoami" and self.session is not None:
            self.sendMessage(self.session.principal.consumer.encode(), False)
        else:
            super().onMessage(payload, isBinary)


def route(path: str = "/echo", **options: Any) -> RoutePolicy:
    """An echo route protected by the key authenticator."""
    authenticator = options.pop("authenticator", None) or KeyAuthenticator(directory())
    options.setdefault("protocol", WhoAmIProtocol)
    return RoutePolicy(path, [authenticator], **options)


def start(serve: Any, *routes: RoutePolicy) -> int:
    policy = ServerPolicy(routes=routes or (route(),))
    return int(serve(SecureServerFactory(policy)))


# -- clients ----------------------------------------------------------------


@dataclass(frozen=True)
class Conversation:
    """What a client saw on a successful connection."""

    subprotocol: str | None
    text: str
    binary: bytes
    consumer: str


async def converse(
    port: int,
    path: str = "/echo",
    headers: dict[str, str] | None = None,
    subprotocols: Sequence[str] | None = None,
    origin: str | None = None,
) -> Conversation:
    """Connect, echo one text and one binary message, ask who we are."""
    async with websockets.connect(
        f"ws://127.0.0.1:{port}{path}",
        additional_headers=headers,
        subprotocols=[Subprotocol(s) for s in subprotocols] if subprotocols else None,
        origin=Origin(origin) if origin is not None else None,
        proxy=None,
        open_timeout=5,
    ) as ws:
        await ws.send("hello, é")
        text = await ws.recv()
        await ws.send(b"\x00\x01\xfe\xff")
        binary = await ws.recv()
        await ws.send("whoami")
        consumer = await ws.recv()
        assert isinstance(text, str) and isinstance(binary, bytes)
        assert isinstance(consumer, str)
        return Conversation(ws.subprotocol, text, binary, consumer)


async def assert_serves(port: int, path: str = "/echo") -> None:
    """A good client still gets a full echo session."""
    session = await converse(port, path, headers={"apikey": ALICE_KEY})
    assert session == Conversation(None, "hello, é", b"\x00\x01\xfe\xff", "alice")


@dataclass(frozen=True)
class Refusal:
    """A refused handshake as the client saw it, in bytes."""

    status_line: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def parse_response(raw: bytes) -> Refusal:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no end of headers in {raw!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        assert colon, f"bad header line {line!r}"
        headers.append((name, value.strip()))
    return Refusal(status_line, tuple(headers), body)


async def raw_refusal(port: int, request: bytes) -> Refusal:
    """Send C{request} on a raw socket; the server answers and closes."""
    return parse_response(await raw_exchange(port, request))


async def raw_head(port: int, request: bytes) -> bytes:
    """Send C{request}, return the response head (for a 101 that stays open)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()


async def ws_refusal(
    port: int,
    path: str = "/echo",
    headers: dict[str, str] | None = None,
    subprotocols: Sequence[str] | None = None,
    origin: str | None = None,
) -> Refusal:
    """The refusal a websockets client gets."""
    with pytest.raises(InvalidStatus) as info:
        await converse(port, path, headers, subprotocols, origin)
    response = info.value.response
    return Refusal(
        f"HTTP/1.1 {response.status_code} {response.reason_phrase}",
        tuple(response.headers.raw_items()),
        bytes(response.body or b""),
    )


def assert_401(refusal: Refusal, challenge: str = CHALLENGE) -> None:
    assert refusal.status_line == "HTTP/1.1 401 Unauthorized"
    assert refusal.body == AUTH_BODY
    assert refusal.values("WWW-Authenticate") == [challenge]
    assert refusal.values("Content-Type") == ["text/plain; charset=utf-8"]
    assert refusal.values("Content-Length") == [str(len(AUTH_BODY))]


def assert_403(refusal: Refusal) -> None:
    assert refusal.status_line == "HTTP/1.1 403 Forbidden"
    assert refusal.body == b"forbidden\n"
    assert refusal.values("WWW-Authenticate") == []
    assert refusal.values("Content-Type") == ["text/plain; charset=utf-8"]


# -- the key in a header ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_apikey_header_text_and_binary_echo(serve):
    port = start(serve)
    session = await aio(converse(port, headers={"apikey": ALICE_KEY}))
    assert session == Conversation(None, "hello, é", b"\x00\x01\xfe\xff", "alice")


@pytest_twisted.ensureDeferred
async def test_apikey_header_name_is_case_insensitive(serve):
    port = start(serve)
    head = await aio(raw_head(port, upgrade_request("/echo", f"APIKEY: {BOB_KEY}")))
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")


@pytest_twisted.ensureDeferred
async def test_custom_header_name(serve):
    """
    With C{header="X-Api-Key"} that header carries the key, the challenge
    names it, and C{apikey} is no longer read.
    """
    authenticator = KeyAuthenticator(directory(), header="X-Api-Key")
    port = start(serve, route(authenticator=authenticator))
    session = await aio(converse(port, headers={"X-Api-Key": BOB_KEY}))
    assert session.consumer == "bob"
    assert session.text == "hello, é"

    refusal = await aio(ws_refusal(port, headers={"apikey": BOB_KEY}))
    assert_401(refusal, 'ApiKey header="X-Api-Key"')

    session = await aio(converse(port, headers={"x-api-key": ALICE_KEY}))
    assert session.consumer == "alice"


@pytest_twisted.ensureDeferred
async def test_key_stored_as_sha256_digest(serve):
    """
    A key configured as C{sha256:<hex>} is accepted; sending the stored
    C{sha256:<hex>} text itself is not a key.
    """
    port = start(serve)
    session = await aio(converse(port, headers={"apikey": CAROL_KEY}))
    assert session == Conversation(None, "hello, é", b"\x00\x01\xfe\xff", "carol")

    stored = "sha256:" + hashlib.sha256(CAROL_KEY.encode()).hexdigest()
    assert_401(await aio(ws_refusal(port, headers={"apikey": stored})))
    await aio(assert_serves(port))


# -- the key in Sec-WebSocket-Protocol ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_token_subprotocol_answers_token(serve):
    port = start(serve)
    session = await aio(converse(port, subprotocols=["token", ALICE_KEY]))
    assert session.subprotocol == "token"
    assert session.consumer == "alice"
    assert session.binary == b"\x00\x01\xfe\xff"


@pytest_twisted.ensureDeferred
async def test_token_subprotocol_key_never_in_101_response(serve):
    port = start(serve)
    head = await aio(
        raw_head(port, upgrade_request("/echo", f"Sec-WebSocket-Protocol: token, {ALICE_KEY}"))
    )
    response = parse_response(head)
    assert response.status_line == "HTTP/1.1 101 Switching Protocols"
    assert response.values("Sec-WebSocket-Protocol") == ["token"]
    assert ALICE_KEY.encode() not in head
    assert b"alice" not in head


@pytest_twisted.ensureDeferred
async def test_app_subprotocol_with_token_answers_app_subprotocol(serve):
    port = start(serve, route(subprotocols=("chat.v1",)))
    session = await aio(converse(port, subprotocols=["chat.v1", "token", BOB_KEY]))
    assert session.subprotocol == "chat.v1"
    assert session.consumer == "bob"

    head = await aio(
        raw_head(
            port,
            upgrade_request("/echo", f"Sec-WebSocket-Protocol: chat.v1, token, {BOB_KEY}"),
        )
    )
    response = parse_response(head)
    assert response.status_line == "HTTP/1.1 101 Switching Protocols"
    assert response.values("Sec-WebSocket-Protocol") == ["chat.v1"]
    assert BOB_KEY.encode() not in head


@pytest_twisted.ensureDeferred
async def test_server_preference_order_among_app_subprotocols(serve):
    """The route's order wins over the client's."""
    port = start(serve, route(subprotocols=("chat.v2", "chat.v1")))
    session = await aio(converse(port, subprotocols=["chat.v1", "chat.v2", "token", ALICE_KEY]))
    assert session.subprotocol == "chat.v2"
    session = await aio(converse(port, subprotocols=["chat.v1", "token", ALICE_KEY]))
    assert session.subprotocol == "chat.v1"
    session = await aio(converse(port, headers={"apikey": ALICE_KEY}, subprotocols=["chat.v1"]))
    assert session.subprotocol == "chat.v1"


@pytest_twisted.ensureDeferred
async def test_unsupported_app_subprotocol_is_not_echoed(serve):
    """
    An application subprotocol the route does not serve is never answered:
    with a token credential the answer is C{token}; with a header key there
    is no answer at all.
    """
    port = start(serve, route(subprotocols=("chat.v1",)))
    session = await aio(converse(port, subprotocols=["other.v9", "token", ALICE_KEY]))
    assert session.subprotocol == "token"

    head = await aio(
        raw_head(
            port,
            upgrade_request("/echo", f"apikey: {ALICE_KEY}", "Sec-WebSocket-Protocol: other.v9"),
        )
    )
    response = parse_response(head)
    assert response.status_line == "HTTP/1.1 101 Switching Protocols"
    assert response.values("Sec-WebSocket-Protocol") == []
    assert b"other.v9" not in head


# -- the key in the query string ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_query_key_refused_by_default(serve):
    port = start(serve)
    refusal = await aio(ws_refusal(port, path=f"/echo?apikey={ALICE_KEY}"))
    assert_401(refusal)
    await aio(assert_serves(port))


@pytest_twisted.ensureDeferred
async def test_query_key_accepted_when_enabled(serve):
    authenticator = KeyAuthenticator(directory(), query="apikey")
    port = start(serve, route(authenticator=authenticator))
    session = await aio(converse(port, path=f"/echo?apikey={BOB_KEY}"))
    assert session == Conversation(None, "hello, é", b"\x00\x01\xfe\xff", "bob")
    assert_401(await aio(ws_refusal(port, path="/echo?apikey=wrong-key")))
    await aio(assert_serves(port))


# -- precedence: header, then subprotocol, then query ------------------------


@pytest_twisted.ensureDeferred
async def test_precedence_header_wins_over_subprotocol(serve):
    port = start(serve)
    session = await aio(
        converse(port, headers={"apikey": ALICE_KEY}, subprotocols=["token", BOB_KEY])
    )
    assert session.consumer == "alice"
    # The token entries were not the credential: nothing to answer with.
    assert session.subprotocol is None


@pytest_twisted.ensureDeferred
async def test_precedence_subprotocol_wins_over_query(serve):
    authenticator = KeyAuthenticator(directory(), query="apikey")
    port = start(serve, route(authenticator=authenticator))
    session = await aio(
        converse(port, path=f"/echo?apikey={ALICE_KEY}", subprotocols=["token", BOB_KEY])
    )
    assert session.consumer == "bob"
    assert session.subprotocol == "token"


@pytest_twisted.ensureDeferred
async def test_precedence_header_wins_over_query(serve):
    authenticator = KeyAuthenticator(directory(), query="apikey")
    port = start(serve, route(authenticator=authenticator))
    session = await aio(
        converse(port, path=f"/echo?apikey={BOB_KEY}", headers={"apikey": ALICE_KEY})
    )
    assert session.consumer == "alice"


@pytest_twisted.ensureDeferred
async def test_precedence_first_found_decides_wrong_header_not_rescued(serve):
    """A wrong header key is refused even with a right key elsewhere."""
    authenticator = KeyAuthenticator(directory(), query="apikey")
    port = start(serve, route(authenticator=authenticator))
    refusal = await aio(
        ws_refusal(port, headers={"apikey": "wrong-key"}, subprotocols=["token", ALICE_KEY])
    )
    assert_401(refusal)
    refusal = await aio(
        ws_refusal(port, path=f"/echo?apikey={ALICE_KEY}", subprotocols=["token", "wrong-key"])
    )
    assert_401(refusal)
    await aio(assert_serves(port))


# -- 401: exact response ------------------------------------------------------

UNAUTHORIZED_REQUESTS = {
    "missing": upgrade_request("/echo"),
    "wrong": upgrade_request("/echo", "apikey: not-a-known-key"),
    "empty": upgrade_request("/echo", "apikey: "),
    "empty-no-space": upgrade_request("/echo", "apikey:"),
    "too-long": upgrade_request("/echo", f"apikey: {LONG_KEY}"),
    "non-ascii": upgrade_request("/echo").replace(b"\r\n\r\n", b"\r\napikey: \xff\xfe\r\n\r\n"),
    "inner-space": upgrade_request("/echo", f"apikey: {ALICE_KEY[:5]} {ALICE_KEY[5:]}"),
    "token-nothing-after": upgrade_request("/echo", "Sec-WebSocket-Protocol: token"),
    "token-wrong": upgrade_request("/echo", "Sec-WebSocket-Protocol: token, not-a-known-key"),
    "token-key-before-marker": upgrade_request(
        "/echo", f"Sec-WebSocket-Protocol: {ALICE_KEY}, token"
    ),
    "query-when-off": upgrade_request(f"/echo?apikey={ALICE_KEY}"),
}


@pytest.mark.parametrize("case", sorted(UNAUTHORIZED_REQUESTS))
@pytest_twisted.ensureDeferred
async def test_401_exact_response(serve, case):
    """
    Every missing or invalid key gets the same 401, byte for byte, and the
    server goes on serving.
    """
    port = start(serve)
    raw = await aio(raw_exchange(port, UNAUTHORIZED_REQUESTS[case]))
    refusal = parse_response(raw)
    assert_401(refusal)
    assert refusal.values("Connection") == ["close"]
    assert refusal.body.decode().rstrip("\n") == FIXED_BODIES[401]
    assert ALICE_KEY.encode() not in raw
    assert b"not-a-known-key" not in raw
    await aio(assert_serves(port))


@pytest.mark.parametrize(
    "value",
    [b"ab\x01cd", b"ab\ncd", b"ab\rcd", b"ab\x85cd", b"ab\x0bcd", b"ab\x1ecd", b"ab\x7fcd"],
    ids=["x01", "LF", "CR", "NEL", "VT", "RS", "DEL"],
)
@pytest_twisted.ensureDeferred
async def test_control_character_in_a_header_is_400(serve, value):
    """
    A bare CR, LF, NEL or other control character in a header line is a
    malformed request (400): other parsers would split the line there, and
    a gateway would pass the second half on as a header of its own.
    """
    port = start(serve)
    request = upgrade_request("/echo").replace(
        b"\r\n\r\n", b"\r\nX-Note: " + value + b"\r\napikey: " + ALICE_KEY.encode() + b"\r\n\r\n"
    )
    raw = await aio(raw_exchange(port, request))
    assert parse_response(raw).status_line == "HTTP/1.1 400 Bad Request"
    await aio(assert_serves(port))


@pytest_twisted.ensureDeferred
async def test_401_seen_by_websockets_client(serve):
    port = start(serve)
    assert_401(await aio(ws_refusal(port)))
    assert_401(await aio(ws_refusal(port, headers={"apikey": LONG_KEY})))
    await aio(assert_serves(port))


@pytest_twisted.ensureDeferred
async def test_duplicate_apikey_header_is_400(serve):
    """Two C{apikey} lines are ambiguous, even when both are valid."""
    port = start(serve)
    raw = await aio(
        raw_exchange(port, upgrade_request("/echo", f"apikey: {ALICE_KEY}", f"apikey: {BOB_KEY}"))
    )
    refusal = parse_response(raw)
    assert refusal.status_line == "HTTP/1.1 400 Bad Request"
    assert refusal.body == b"bad request\n"
    assert refusal.values("Content-Length") == [str(len(b"bad request\n"))]
    assert refusal.values("WWW-Authenticate") == []
    assert ALICE_KEY.encode() not in raw and BOB_KEY.encode() not in raw

    raw = await aio(
        raw_exchange(
            port, upgrade_request("/echo", f"apikey: {ALICE_KEY}", f"APIKEY: {ALICE_KEY}")
        )
    )
    assert parse_response(raw).status_line == "HTTP/1.1 400 Bad Request"
    await aio(assert_serves(port))


# -- routes --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_path_is_404(serve):
    port = start(serve)
    for path in ("/nope", "/echo/", "/ECHO", "/"):
        raw = await aio(raw_exchange(port, upgrade_request(path, f"apikey: {ALICE_KEY}")))
        refusal = parse_response(raw)
        assert refusal.status_line == "HTTP/1.1 404 Not Found", path
        assert refusal.body == b"not found\n"
        assert refusal.values("WWW-Authenticate") == []
    await aio(assert_serves(port))


@pytest_twisted.ensureDeferred
async def test_two_routes_each_path_serves_its_own_route(serve):
    """
    C{/a} speaks C{a.v1} to anyone with a key; C{/b} speaks C{b.v1} to bob
    only. Each path applies its own route, never the other's.
    """
    port = start(
        serve,
        route("/a", subprotocols=("a.v1",)),
        route("/b", subprotocols=("b.v1",), consumers=frozenset({"bob"})),
    )
    offered = ["a.v1", "b.v1"]
    session = await aio(converse(port, "/a", headers={"apikey": ALICE_KEY}, subprotocols=offered))
    assert (session.subprotocol, session.consumer) == ("a.v1", "alice")
    session = await aio(converse(port, "/b", headers={"apikey": BOB_KEY}, subprotocols=offered))
    assert (session.subprotocol, session.consumer) == ("b.v1", "bob")
    assert_403(await aio(ws_refusal(port, "/b", headers={"apikey": ALICE_KEY})))
    session = await aio(converse(port, "/a", headers={"apikey": BOB_KEY}))
    assert (session.subprotocol, session.consumer) == (None, "bob")
    refusal = await aio(raw_refusal(port, upgrade_request("/echo")))
    assert refusal.status_line == "HTTP/1.1 404 Not Found"
    await aio(assert_serves(port, "/a"))


# -- Origin ----------------------------------------------------------------------

APP_ORIGIN = "https://app.example.com"


@pytest_twisted.ensureDeferred
async def test_origin_exact_match_accepted(serve):
    port = start(serve, route(origins=OriginPolicy.from_list([APP_ORIGIN])))
    for origin in (APP_ORIGIN, "https://app.example.com:443", "HTTPS://APP.EXAMPLE.COM"):
        session = await aio(converse(port, headers={"apikey": ALICE_KEY}, origin=origin))
        assert session.consumer == "alice", origin
    session = await aio(converse(port, headers={"apikey": ALICE_KEY}))
    assert session.consumer == "alice"


def test_origin_fast_path_texts_are_the_allowed_origins():
    """
    Origins compared as written (no parsing) are exactly the browser forms
    of the configured ones, whatever case and default ports they were
    written with; a form that is not listed still goes through parsing.
    """
    policy = OriginPolicy.from_list(
        ["HTTPS://App.Example.com:443", "http://x.example:8080", "https://[::1]", "null"]
    )
    assert policy.allowed_texts == {
        "https://app.example.com",
        "http://x.example:8080",
        "https://[::1]",
    }
    assert all(parse_origin(text) in policy.allowed for text in policy.allowed_texts)
    assert policy.allows("https://app.example.com:443")
    assert policy.allows("null")
    assert not policy.allows("http://x.example")


@pytest.mark.parametrize(
    "origin",
    [
        "http://app.example.com",
        "https://evil.example.com",
        "https://app.example.com.evil.net",
        "https://app.example.com:8443",
        "https://app.example.com/path",
        "wss://app.example.com",
        "null",
    ],
)
@pytest_twisted.ensureDeferred
async def test_origin_not_listed_is_403(serve, origin):
    port = start(serve, route(origins=OriginPolicy.from_list([APP_ORIGIN])))
    refusal = await aio(ws_refusal(port, headers={"apikey": ALICE_KEY}, origin=origin))
    assert_403(refusal)
    await aio(assert_serves(port))


@pytest_twisted.ensureDeferred
async def test_origin_null_allowed_when_listed(serve):
    port = start(serve, route(origins=OriginPolicy.from_list([APP_ORIGIN, "null"])))
    session = await aio(converse(port, headers={"apikey": ALICE_KEY}, origin="null"))
    assert session.consumer == "alice"
    assert_403(
        await aio(ws_refusal(port, headers={"apikey": ALICE_KEY}, origin="https://evil.example"))
    )


@pytest_twisted.ensureDeferred
async def test_origin_star_allows_any(serve):
    port = start(serve, route(origins=OriginPolicy.from_list(["*"])))
    for origin in ("https://evil.example.com", "null", "http://127.0.0.1:1"):
        session = await aio(converse(port, headers={"apikey": ALICE_KEY}, origin=origin))
        assert session.consumer == "alice", origin


@pytest_twisted.ensureDeferred
async def test_default_origin_policy_same_origin_only(serve):
    """
    With C{OriginPolicy()} (no list) on a loopback listener, only an Origin
    naming a loopback host with the listener's own scheme and port is
    allowed (see tests/test_hardening_trust.py for the whole rule).
    """
    port = start(serve, route(origins=OriginPolicy()))
    for own in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
        session = await aio(converse(port, headers={"apikey": ALICE_KEY}, origin=own))
        assert session.consumer == "alice"
    for foreign in (
        "https://app.example.com",
        f"https://127.0.0.1:{port}",
        f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}",
        f"http://evil.example:{port}",
        "null",
    ):
        refusal = await aio(ws_refusal(port, headers={"apikey": ALICE_KEY}, origin=foreign))
        assert_403(refusal)
    await aio(assert_serves(port))


@pytest_twisted.ensureDeferred
async def test_origin_checked_before_auth(serve):
    """
    A foreign origin is 403 whatever the credential: valid, wrong or none.
    The 403 carries no C{WWW-Authenticate}, so it does not tell whether the
    key was good.
    """
    port = start(serve, route(origins=OriginPolicy.from_list([APP_ORIGIN])))
    evil = "https://evil.example.com"
    assert_403(await aio(ws_refusal(port, headers={"apikey": ALICE_KEY}, origin=evil)))
    assert_403(await aio(ws_refusal(port, headers={"apikey": "wrong-key"}, origin=evil)))
    assert_403(await aio(ws_refusal(port, origin=evil)))
    assert_401(await aio(ws_refusal(port, origin=APP_ORIGIN)))
    await aio(assert_serves(port))


# -- consumers allowed on a route -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_route_consumers_allow_list(serve):
    port = start(serve, route(consumers=frozenset({"alice"})))
    raw = await aio(raw_exchange(port, upgrade_request("/echo", f"apikey: {BOB_KEY}")))
    assert_403(parse_response(raw))
    assert BOB_KEY.encode() not in raw
    assert_403(await aio(ws_refusal(port, subprotocols=["token", BOB_KEY])))
    # an invalid key is still 401, not 403
    assert_401(await aio(ws_refusal(port, headers={"apikey": "wrong-key"})))
    await aio(assert_serves(port))


# -- the server keeps serving ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_server_keeps_serving_after_every_kind_of_refusal(serve):
    """One server, every refusal in turn, then concurrent good clients."""
    port = start(
        serve,
        route(origins=OriginPolicy.from_list([APP_ORIGIN]), consumers=frozenset({"alice"})),
    )
    requests = [
        (upgrade_request("/echo"), 401),
        (upgrade_request("/echo", "apikey: wrong"), 401),
        (upgrade_request("/echo", f"apikey: {LONG_KEY}"), 401),
        (upgrade_request("/echo", "apikey: a", "apikey: b"), 400),
        (upgrade_request("/missing", f"apikey: {ALICE_KEY}"), 404),
        (upgrade_request("/echo", f"apikey: {ALICE_KEY}", "Origin: https://evil.example"), 403),
        (upgrade_request("/echo", f"apikey: {BOB_KEY}"), 403),
    ]
    for request, status in requests:
        refusal = await aio(raw_refusal(port, request))
        assert refusal.status == status, request
    sessions = await aio(
        asyncio.gather(*(converse(port, headers={"apikey": ALICE_KEY}) for _ in range(5)))
    )
    assert [s.consumer for s in sessions] == ["alice"] * 5
