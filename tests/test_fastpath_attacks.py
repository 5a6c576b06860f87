"""
Attacks on the two fast paths in front of Autobahn (issue 19): the lean
upgrade reader (txwssec/server/upgrade.py) and the frame reader
(txwssec/_wire.py).

Differential, as tests/test_upgrade_reader.py: each hostile input is sent
to the same server with the fast path on and off (Autobahn's reader for
everything); the bytes the client gets must be the same both ways, whole
and cut into pieces at every byte.
"""

from __future__ import annotations

import asyncio
import random
import struct
from typing import Any

import pytest
import pytest_twisted
from autobahn.nvx._utf8validator import Utf8Validator as AutobahnUtf8Validator
from autobahn.websocket.protocol import WebSocketProtocol
from conftest import aio
from test_upgrade_reader import BYE, KEY, SEEN, comparable, exchange, factory, request
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from wsframes import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, apply_mask
from zope.interface import implementer

import txwssec._wire
from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec._wire import FrameReader, Utf8Validator
from txwssec.apps.echo import EchoProtocol
from txwssec.interfaces import IAuthenticator
from txwssec.server.upgrade import UpgradeReader
from txwssec.types import Accept, HandshakeRequest, Principal, Verdict

# -- the upgrade reader --------------------------------------------------------

LONG = "a" * 6000

HOSTILE_REQUESTS = [
    ("two upgrades", request("Upgrade: h2c")),
    ("two connections", request("Connection: close")),
    (
        "two protocols lines same",
        request("Sec-WebSocket-Protocol: chat", "Sec-WebSocket-Protocol: chat"),
    ),
    ("empty protocol", request("Sec-WebSocket-Protocol: ")),
    ("protocol empty entries", request("Sec-WebSocket-Protocol: chat,,x")),
    ("two apikeys", request(f"apikey: {KEY}", "apikey: wrong", line="GET /keyed HTTP/1.1")),
    (
        "two apikeys swapped",
        request("apikey: wrong", f"apikey: {KEY}", line="GET /keyed HTTP/1.1"),
    ),
    ("apikey twice same", request(f"apikey: {KEY}", f"apikey: {KEY}", line="GET /keyed HTTP/1.1")),
    ("no apikey", request(line="GET /keyed HTTP/1.1")),
    ("apikey nbsp", request(f"apikey: \xa0{KEY}\xa0", line="GET /keyed HTTP/1.1")),
    ("apikey tab", request(f"apikey:\t{KEY}\t", line="GET /keyed HTTP/1.1")),
    ("apikey fold", request("apikey: x", f" {KEY}", line="GET /keyed HTTP/1.1")),
    ("apikey bare lf", request(f"X-A: 1\napikey: {KEY}", line="GET /keyed HTTP/1.1")),
    ("apikey bare cr", request(f"X-A: 1\rapikey: {KEY}", line="GET /keyed HTTP/1.1")),
    ("apikey nel", request(f"X-A: 1\x85apikey: {KEY}", line="GET /keyed HTTP/1.1")),
    ("apikey vt", request(f"X-A: 1\x0bapikey: {KEY}", line="GET /keyed HTTP/1.1")),
    ("apikey space name", request(f"apikey : {KEY}", line="GET /keyed HTTP/1.1")),
    ("apikey tab name", request(f"apikey\t: {KEY}", line="GET /keyed HTTP/1.1")),
    ("nul value", request("X-Thing: a\x00b")),
    ("nul name", request("X-Th\x00ing: a")),
    ("high name", request("X-Th\xe9ing: a")),
    ("del value", request("X-Thing: a\x7fb")),
    ("high bytes value", request("X-Thing: \x80\xff\x9f")),
    ("leading space line", request(" Host: x")),
    ("empty name", request(": x")),
    ("key nbsp", request(key="Sec-WebSocket-Key: \xa0dGhlIHNhbXBsZSBub25jZQ==\xa0")),
    ("key tab inside", request(key="Sec-WebSocket-Key: dGhl\tIHNhbXBsZSBub25jZQ==")),
    ("key base64 pad inside", request(key="Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j====")),
    ("host empty", request(host="Host:")),
    ("host empty port", request(host="Host: 127.0.0.1:")),
    ("host space port", request(host="Host: 127.0.0.1: 80")),
    ("host plus port", request(host="Host: 127.0.0.1:+80")),
    ("host underscore port", request(host="Host: 127.0.0.1:8_0")),
    ("host nbsp", request(host="Host: \xa0127.0.0.1\xa0")),
    ("host two ports", request(host="Host: a:1:2")),
    ("host at", request(host="Host: evil@127.0.0.1")),
    ("host tab", request(host="Host:\t127.0.0.1\t")),
    ("version tab", request(version="Sec-WebSocket-Version:\t13\t")),
    ("version nbsp", request(version="Sec-WebSocket-Version: \xa013")),
    ("version zero", request(version="Sec-WebSocket-Version: 013")),
    ("version underscore", request(version="Sec-WebSocket-Version: 1_3")),
    ("version empty", request(version="Sec-WebSocket-Version:")),
    ("upgrade tab", request(upgrade="Upgrade:\twebsocket\t")),
    ("upgrade nbsp", request(upgrade="Upgrade: websocket\xa0")),
    ("upgrade kelvin", request(upgrade="Upgrade: WEB\u017fOCKET".encode().decode("latin-1"))),
    ("connection nbsp", request(connection="Connection: \xa0upgrade")),
    ("origin case", request("Origin: HTTPS://APP.EXAMPLE", line="GET /web HTTP/1.1")),
    ("origin port", request("Origin: https://app.example:443", line="GET /web HTTP/1.1")),
    ("origin path", request("Origin: https://app.example/x", line="GET /web HTTP/1.1")),
    ("origin nbsp", request("Origin: \xa0https://app.example", line="GET /web HTTP/1.1")),
    ("origin empty", request("Origin:", line="GET /web HTTP/1.1")),
    ("origin userinfo", request("Origin: https://a@app.example", line="GET /web HTTP/1.1")),
    ("origin NULL", request("Origin: NULL", line="GET /web HTTP/1.1")),
    ("xff", request("X-Forwarded-For: 10.0.0.1")),
    ("nul request line", request(line="GET /echo\x00 HTTP/1.1")),
    ("tab request line", request(line="GET\t/echo HTTP/1.1")),
    ("trailing space request line", request(line="GET /echo HTTP/1.1 ")),
    ("leading space request line", request(line=" GET /echo HTTP/1.1")),
    ("high byte query", request(line="GET /echo?a=\xe9 HTTP/1.1")),
    ("del path", request(line="GET /echo\x7f HTTP/1.1")),
    ("backslash path", request(line="GET /echo\\..\\x HTTP/1.1")),
    ("dot segments", request(line="GET /x/../echo HTTP/1.1")),
    ("encoded slash", request(line="GET /%2Fecho HTTP/1.1")),
    ("semicolon query", request(line="GET /echo?a=1;b=2 HTTP/1.1")),
    ("fragment in query", request(line="GET /echo?a#b HTTP/1.1")),
    ("asterisk", request(line="GET * HTTP/1.1")),
    ("authority form", request(line="GET 127.0.0.1:80 HTTP/1.1")),
    ("absolute https", request(line="GET https://127.0.0.1/echo HTTP/1.1")),
    ("absolute ws", request(line="GET ws://127.0.0.1/echo HTTP/1.1")),
    ("head", request(line="HEAD /echo HTTP/1.1")),
    ("connect", request(line="CONNECT /echo HTTP/1.1")),
    ("options", request(line="OPTIONS /echo HTTP/1.1")),
    ("http 1.0 lower", request(line="GET /echo http/1.1")),
    ("http 1.10", request(line="GET /echo HTTP/1.10")),
    ("http 01.1", request(line="GET /echo HTTP/01.1")),
    ("four words", request(line="GET /echo HTTP/1.1 x")),
    ("long value", request(f"X-Long: {LONG}")),
    ("long name", request(f"X-{LONG}: 1")),
    ("many headers", request(*(f"X-{i}: {i}" for i in range(90)))),
    ("content-length 0", request("Content-Length: 0")),
    ("content-length twice 0", request("Content-Length: 0", "Content-Length: 0")),
    ("transfer-encoding", request("Transfer-Encoding: chunked")),
    ("te space", request("Transfer-Encoding : chunked")),
    ("pipelined request", request() + request(f"apikey: {KEY}", line="GET /keyed HTTP/1.1")),
    ("pipelined after refusal", request(line="GET /keyed HTTP/1.1") + request()),
    ("pipelined bad frame", request() + b"\x81\x01x"),
    ("pipelined frames", request() + b"\x81\x81\0\0\0\0x\x89\x81\0\0\0\0y"),
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name,data", HOSTILE_REQUESTS, ids=[n for n, _ in HOSTILE_REQUESTS])
async def test_hostile_request_same_answer_both_ways(
    serve: Any, monkeypatch: pytest.MonkeyPatch, name: str, data: bytes
) -> None:
    SEEN.clear()
    port = serve(factory())
    lean = await aio(exchange(port, data))
    lean_seen = comparable(SEEN)
    SEEN.clear()
    monkeypatch.setattr(UpgradeReader, "readUpgrade", lambda self, end: False)
    autobahn = await aio(exchange(port, data))
    assert lean == autobahn
    assert lean_seen == comparable(SEEN)


async def send_bytewise(port: int, data: bytes, step: int = 1, timeout: float = 5) -> bytes:
    """Send C{data} C{step} bytes per write; all the server sent (and how it ended)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = b""
    try:
        for index in range(0, len(data), step):
            writer.write(data[index : index + step])
            await writer.drain()
            await asyncio.sleep(0)
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                return got + b"<EOF>"
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        return got + b"<RESET>"
    finally:
        writer.close()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "data",
    [
        request(),
        request(f"apikey: {KEY}", line="GET /keyed HTTP/1.1"),
        request("apikey: x", f" {KEY}", line="GET /keyed HTTP/1.1"),
        request("Sec-WebSocket-Protocol: chat", "Sec-WebSocket-Protocol: chat"),
    ],
    ids=["plain", "keyed", "folded key", "repeated protocol"],
)
async def test_request_split_at_every_byte_same_answer(
    serve: Any, monkeypatch: pytest.MonkeyPatch, data: bytes
) -> None:
    port = serve(factory())
    lean = await aio(send_bytewise(port, data + BYE))
    monkeypatch.setattr(UpgradeReader, "readUpgrade", lambda self, end: False)
    autobahn = await aio(send_bytewise(port, data + BYE))
    assert lean == autobahn


# -- the frame reader ------------------------------------------------------------

MAX = 1000
MASK = b"\x11\x22\x33\x44"


def frame_factory() -> SecureServerFactory:
    route = RoutePolicy(
        "/echo", [AnonymousAuthenticator()], protocol=EchoProtocol, max_message_size=MAX
    )
    made = SecureServerFactory(ServerPolicy.single(route))
    # A frame that announces more than is sent leaves the client's close
    # unread: the server ends the connection after this (not 1 s).
    made.setProtocolOptions(closeHandshakeTimeout=0.05)
    return made


def raw(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
    encoding: int | None = None,
) -> bytes:
    """A client frame with every header field chosen (length lies allowed)."""
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    bit = 0x80 if masked else 0
    if encoding is None:
        encoding = 0 if size < 126 else 1 if size < 1 << 16 else 2
    if encoding == 0:
        head = struct.pack("!BB", first, bit | size)
    elif encoding == 1:
        head = struct.pack("!BBH", first, bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, bit | 127, size)
    if not masked:
        return head + payload
    return head + MASK + apply_mask(payload, MASK)


ECHO = "GET /echo HTTP/1.1"
T = "é€😀".encode()  # 2-, 3- and 4-byte sequences

HOSTILE_FRAMES = [
    ("unmasked text", raw(TEXT, b"hi", masked=False)),
    ("unmasked close", raw(CLOSE, b"\x03\xe8", masked=False)),
    ("rsv1 text", raw(TEXT, b"hi", rsv=4)),
    ("rsv2 text", raw(TEXT, b"hi", rsv=2)),
    ("rsv3 ping", raw(PING, b"hi", rsv=1)),
    *[(f"opcode {op}", raw(op, b"hi")) for op in (3, 4, 5, 6, 7, 11, 12, 13, 14, 15)],
    ("ping 125", raw(PING, b"p" * 125)),
    ("ping 126", raw(PING, b"p" * 126)),
    ("ping 16-bit 5", raw(PING, b"p" * 5, encoding=1)),
    ("fragmented ping", raw(PING, b"p", fin=False)),
    ("pong", raw(PONG, b"x")),
    ("close 1 byte", raw(CLOSE, b"\x03")),
    ("close empty", raw(CLOSE)),
    *[
        (f"close code {code}", raw(CLOSE, struct.pack("!H", code)))
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 3000, 4999, 5000, 65535)
    ],
    ("close bad utf8 reason", raw(CLOSE, b"\x03\xe8\xff")),
    ("close surrogate reason", raw(CLOSE, b"\x03\xe8\xed\xa0\x80")),
    ("close truncated reason", raw(CLOSE, b"\x03\xe8\xe2\x82")),
    ("close good reason", raw(CLOSE, b"\x03\xe8" + T)),
    ("64-bit top bit", raw(BINARY, length=1 << 63, encoding=2)),
    ("64-bit all ones", raw(BINARY, length=(1 << 64) - 1, encoding=2)),
    ("64-bit non-minimal", raw(BINARY, b"x" * 5, encoding=2)),
    ("64-bit non-minimal 65535", raw(BINARY, length=65535, encoding=2)),
    ("16-bit non-minimal", raw(BINARY, b"x" * 5, encoding=1)),
    ("16-bit non-minimal 125", raw(BINARY, b"x" * 125, encoding=1)),
    ("continuation first", raw(CONTINUATION, b"x")),
    ("text inside text", raw(TEXT, b"a", fin=False) + raw(TEXT, b"b")),
    ("binary inside text", raw(TEXT, b"a", fin=False) + raw(BINARY, b"b")),
    ("ping between fragments", raw(TEXT, b"a", fin=False) + raw(PING, b"p") + raw(0, b"b")),
    (
        "close between fragments",
        raw(TEXT, b"a", fin=False) + raw(CLOSE, b"\x03\xe8\xff") + raw(0, b"b"),
    ),
    ("utf8 split in sequence", raw(TEXT, T[:1], fin=False) + raw(0, T[1:])),
    ("utf8 split 4-byte", raw(TEXT, T[:7], fin=False) + raw(0, T[7:])),
    (
        "surrogate split",
        raw(TEXT, b"a\xed", fin=False) + raw(0, b"\xa0", fin=False) + raw(0, b"\x80"),
    ),
    ("surrogate split 2", raw(TEXT, b"a\xed\xa0", fin=False) + raw(0, b"\x80")),
    ("surrogate whole", raw(TEXT, b"\xed\xa0\x80")),
    ("overlong", raw(TEXT, b"\xc0\xaf")),
    ("above max", raw(TEXT, b"\xf4\x90\x80\x80")),
    ("invalid in last fragment", raw(TEXT, b"ab", fin=False) + raw(0, b"c\xff")),
    ("truncated at end", raw(TEXT, b"ab", fin=False) + raw(0, b"c\xe2\x82")),
    ("truncated single", raw(TEXT, b"\xf0\x9f\x98")),
    ("exactly max", raw(BINARY, b"x" * MAX)),
    ("one over max", raw(BINARY, b"x" * (MAX + 1))),
    ("text exactly max", raw(TEXT, b"x" * MAX)),
    ("text one over max", raw(TEXT, b"x" * (MAX + 1))),
    (
        "fragments exactly max",
        raw(BINARY, b"x" * (MAX - 10), fin=False) + raw(0, b"y" * 10),
    ),
    (
        "fragments one over max",
        raw(BINARY, b"x" * (MAX - 10), fin=False) + raw(0, b"y" * 11),
    ),
    (
        "many fragments one over max",
        raw(TEXT, b"x", fin=False)
        + b"".join(raw(0, b"x" * 100, fin=False) for _ in range(9))
        + raw(0, b"x" * 100),
    ),
    ("huge announced", raw(BINARY, length=1 << 40, encoding=2)),
    ("huge announced 16", raw(BINARY, length=65535, encoding=1)),
    ("empty fragments", raw(TEXT, b"", fin=False) + raw(0, b"", fin=False) + raw(0, b"ok")),
]


async def frame_exchange(port: int, frames: bytes, bytewise: bool) -> bytes:
    data = request(line=ECHO) + frames + BYE
    return await send_bytewise(port, data, 1 if bytewise else len(data))


def autobahn_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FrameReader, "processData", WebSocketProtocol.processData)
    monkeypatch.setattr(FrameReader, "_dataReceived", WebSocketProtocol._dataReceived)
    monkeypatch.setattr(txwssec._wire, "Utf8Validator", AutobahnUtf8Validator)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("name,frames", HOSTILE_FRAMES, ids=[n for n, _ in HOSTILE_FRAMES])
async def test_hostile_frames_same_answer_both_ways(
    serve: Any, monkeypatch: pytest.MonkeyPatch, name: str, frames: bytes, bytewise: bool
) -> None:
    port = serve(frame_factory())
    fast = await aio(frame_exchange(port, frames, bytewise))
    autobahn_frames(monkeypatch)
    slow = await aio(frame_exchange(port, frames, bytewise))
    assert fast == slow


#: Bytes that make up UTF-8 sequences, valid and not.
_UTF8_PIECES = [
    b"a", b"(", b"\xc3", b"\xa9", b"\xe2", b"\x82", b"\xac", b"\xed", b"\xa0", b"\x9f",
    b"\xf0", b"\x98", b"\x80", b"\xf4", b"\x90", b"\x8f", b"\xc0", b"\xff", b"\xe0", b"\xbf",
]  # fmt: skip


def test_utf8_validator_names_the_same_octet_as_autobahn() -> None:
    """
    The whole verdict, octet indexes included (a 1007 close reason names
    the index), agrees with Autobahn's validator on every chunk up to the
    first failure, for random messages cut at random places.
    """
    rng = random.Random(19)
    for _ in range(20000):
        message = b"".join(rng.choice(_UTF8_PIECES) for _ in range(rng.randrange(1, 9)))
        cuts = sorted(rng.sample(range(len(message) + 1), min(len(message), rng.randrange(0, 4))))
        chunks = [message[a:b] for a, b in zip([0, *cuts], [*cuts, len(message)], strict=True)]
        theirs, ours = AutobahnUtf8Validator(), Utf8Validator()
        for chunk in chunks:
            expected = theirs.validate(chunk)
            assert ours.validate(chunk) == expected, (message, chunks, chunk)
            if not expected[0]:
                break


# -- authentication that answers later, frames sent before the 101 -----------


@implementer(IAuthenticator)
class LaterAuthenticator:
    """Accepts C{apikey: yes} and refuses anything else, a moment later."""

    name = "later"
    challenge = ""

    def authenticate(self, request: HandshakeRequest) -> Deferred[Verdict]:
        keys = [value for name, value in request.headers if name == "apikey"]
        verdict: Verdict = Accept(Principal("p", self.name)) if keys == ["yes"] else None
        return deferLater(reactor, 0.02, lambda: verdict)


PIPELINED = raw(TEXT, b"before the 101") + raw(PING, b"p")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "extra",
    [("apikey: yes",), ("apikey: no",), (), ("apikey: yes", "apikey: yes"), ("apikey:  yes\t",)],
    ids=["accepted", "refused", "missing", "twice", "padded"],
)
async def test_frames_before_a_late_verdict_same_answer(
    serve: Any, monkeypatch: pytest.MonkeyPatch, extra: tuple[str, ...]
) -> None:
    route = RoutePolicy("/later", [LaterAuthenticator()], protocol=EchoProtocol)
    made = SecureServerFactory(ServerPolicy(routes=(route,), auth_failures_per_minute=0))
    port = serve(made)
    data = request(*extra, line="GET /later HTTP/1.1") + PIPELINED + BYE
    lean = await aio(send_bytewise(port, data, len(data)))
    monkeypatch.setattr(UpgradeReader, "readUpgrade", lambda self, end: False)
    autobahn = await aio(send_bytewise(port, data, len(data)))
    assert lean == autobahn
    if extra in (("apikey: yes",), ("apikey:  yes\t",)):
        assert lean.startswith(b"HTTP/1.1 101 ")
        assert b"before the 101" in lean
    else:
        assert lean.startswith((b"HTTP/1.1 401 ", b"HTTP/1.1 400 ")), lean[:40]
        assert b"before the 101" not in lean


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "padding, status", [(" ", b"101"), ("\t", b"101"), ("\xa0", b"401"), ("\x85", b"400")]
)
async def test_only_spaces_and_tabs_pad_a_header_value(
    serve: Any, monkeypatch: pytest.MonkeyPatch, padding: str, status: bytes
) -> None:
    """
    A header value loses only spaces and tabs around it (RFC 9110 OWS), as
    in Autobahn and in proxies matching the value exactly: a key padded
    with a no-break space is another key; with the fast path and without.
    """
    port = serve(factory())
    data = request(f"apikey: {padding}{KEY}{padding}", line="GET /keyed HTTP/1.1")
    lean = await aio(exchange(port, data))
    monkeypatch.setattr(UpgradeReader, "readUpgrade", lambda self, end: False)
    autobahn = await aio(exchange(port, data))
    assert lean.startswith(b"HTTP/1.1 " + status), lean[:40]
    assert autobahn.startswith(b"HTTP/1.1 " + status), autobahn[:40]
