"""
Malformed upgrade requests over raw sockets.

Each is refused with an exact status line, a correct C{Content-Length}, one
of txwssec's fixed bodies (never Autobahn's reason text), and nothing the
client sent reflected back. The log gets the reason with quoted values
redacted. After every refusal the same server still serves a good client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
import websockets
from conftest import aio, raw_exchange, upgrade_request

from txwssec import Consumer, ConsumerDirectory, KeyAuthenticator, RoutePolicy, SecureServerFactory
from txwssec.apps.echo import EchoProtocol
from txwssec.consumers import key_digest
from txwssec.errors import FIXED_BODIES

KEY = "malformed-suite-key-93c1"
#: The Sec-WebSocket-Key of L{upgrade_request}.
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
SECRET = "SECRET-XYZ"


def request(*lines: str) -> bytes:
    """An HTTP request head made of C{lines}, exactly."""
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def without(raw: bytes, header: bytes) -> bytes:
    """C{raw} minus the header line that starts with C{header}."""
    lines = raw.split(b"\r\n")
    kept = [line for line in lines if not line.lower().startswith(header.lower() + b":")]
    assert len(kept) == len(lines) - 1, header
    return b"\r\n".join(kept)


GOOD = upgrade_request("/echo", f"apikey: {KEY}")


@dataclass(frozen=True)
class Case:
    """A malformed request and the refusal it must get."""

    request: bytes
    status_line: str
    #: values the client sent that must not come back (nor reach the log)
    sent: tuple[str, ...] = ()
    #: extra response headers expected, exactly
    headers: tuple[tuple[str, str], ...] = ()


CASES: dict[str, Case] = {
    "post": Case(
        GOOD.replace(b"GET ", b"POST ", 1), "HTTP/1.1 405 Method Not Allowed", (KEY, WS_KEY)
    ),
    "lowercase-method": Case(
        GOOD.replace(b"GET ", b"get ", 1), "HTTP/1.1 405 Method Not Allowed", (KEY,)
    ),
    "http-1.0": Case(
        GOOD.replace(b"HTTP/1.1", b"HTTP/1.0", 1),
        "HTTP/1.1 505 HTTP Version Not Supported",
        (KEY, WS_KEY),
    ),
    "http-2.0": Case(
        GOOD.replace(b"HTTP/1.1", b"HTTP/2.0", 1), "HTTP/1.1 505 HTTP Version Not Supported"
    ),
    # Autobahn answers 426 when webStatus is off (txwssec's policy); the
    # response names the protocol to upgrade to (RFC 9110, 15.5.22).
    "missing-upgrade": Case(
        without(GOOD, b"Upgrade"),
        "HTTP/1.1 426 Upgrade Required",
        (KEY, WS_KEY),
        (("Upgrade", "websocket"),),
    ),
    "upgrade-not-websocket": Case(
        GOOD.replace(b"Upgrade: websocket", b"Upgrade: h2c-SECRET-XYZ"),
        "HTTP/1.1 400 Bad Request",
        (KEY, "h2c-SECRET-XYZ"),
    ),
    "missing-connection": Case(
        without(GOOD, b"Connection"), "HTTP/1.1 400 Bad Request", (KEY, WS_KEY)
    ),
    "missing-host": Case(without(GOOD, b"Host"), "HTTP/1.1 400 Bad Request", (KEY,)),
    "two-hosts": Case(
        upgrade_request("/echo", f"apikey: {KEY}", "Host: other.example"),
        "HTTP/1.1 400 Bad Request",
        (KEY, "other.example"),
    ),
    "bad-host-port": Case(
        upgrade_request("/echo", f"apikey: {KEY}", host=f"127.0.0.1:{SECRET}"),
        "HTTP/1.1 400 Bad Request",
        (KEY, SECRET),
    ),
    "missing-sec-websocket-key": Case(
        without(GOOD, b"Sec-WebSocket-Key"), "HTTP/1.1 400 Bad Request", (KEY,)
    ),
    "sec-websocket-key-bad-length": Case(
        GOOD.replace(WS_KEY.encode(), b"U0VDUkVULVhZWi1rZXktdmFsdWU="),
        "HTTP/1.1 400 Bad Request",
        (KEY, "U0VDUkVULVhZWi1rZXktdmFsdWU="),
    ),
    "sec-websocket-key-bad-base64": Case(
        GOOD.replace(WS_KEY.encode(), b"SECRET-XYZ!bad*base64a=="),
        "HTTP/1.1 400 Bad Request",
        (KEY, "SECRET-XYZ!bad*base64a=="),
    ),
    "two-sec-websocket-keys": Case(
        upgrade_request("/echo", f"apikey: {KEY}", "Sec-WebSocket-Key: U0VDUkVULVhZWi0xMjM0NQ=="),
        "HTTP/1.1 400 Bad Request",
        (KEY, WS_KEY, "U0VDUkVULVhZWi0xMjM0NQ=="),
    ),
    "missing-sec-websocket-version": Case(
        without(GOOD, b"Sec-WebSocket-Version"), "HTTP/1.1 400 Bad Request", (KEY, WS_KEY)
    ),
    "unsupported-version-12": Case(
        GOOD.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 12"),
        "HTTP/1.1 400 Bad Request",
        (KEY, WS_KEY),
        (("Sec-WebSocket-Version", "13"),),  # RFC 6455 only
    ),
    "version-not-a-number": Case(
        GOOD.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: SECRET-XYZ"),
        "HTTP/1.1 400 Bad Request",
        (KEY, SECRET),
    ),
    "duplicate-subprotocol-entries": Case(
        upgrade_request("/echo", f"Sec-WebSocket-Protocol: token, {SECRET}, {SECRET}"),
        "HTTP/1.1 400 Bad Request",
        (SECRET, WS_KEY),
    ),
    # A secret holding a quote must not end the log redaction early.
    "duplicate-subprotocol-entries-with-quotes": Case(
        upgrade_request("/echo", f'Sec-WebSocket-Protocol: token, a"{SECRET}, a"{SECRET}'),
        "HTTP/1.1 400 Bad Request",
        (SECRET,),
    ),
    "duplicate-subprotocol-entries-with-apostrophes": Case(
        upgrade_request("/echo", f"Sec-WebSocket-Protocol: token, a'{SECRET}'b, a'{SECRET}'b"),
        "HTTP/1.1 400 Bad Request",
        (SECRET,),
    ),
    "fragment-in-uri": Case(
        upgrade_request(f"/echo#{SECRET}", f"apikey: {KEY}"),
        "HTTP/1.1 400 Bad Request",
        (KEY, SECRET),
    ),
    "invalid-origin": Case(
        upgrade_request("/echo", f"apikey: {KEY}", f"Origin: {SECRET}"),
        "HTTP/1.1 400 Bad Request",
        (KEY, SECRET),
    ),
    "garbage": Case(
        b"\x16\x03\x01SECRET-XYZ\xff\xfe\x00\x01\x02" + b"\r\n\r\n",
        "HTTP/1.1 400 Bad Request",
        (SECRET,),
    ),
    "request-line-with-four-parts": Case(
        request(f'GET /echo?apikey=x"{SECRET}"y HTTP/1.1 extra', "Host: 127.0.0.1"),
        "HTTP/1.1 400 Bad Request",
        (SECRET,),
    ),
    "header-line-without-colon": Case(
        upgrade_request("/echo", f"apikey: {KEY}", f"X-Broken-{SECRET}"),
        "HTTP/1.1 400 Bad Request",
        (KEY, SECRET),
    ),
    "header-line-with-empty-name": Case(
        upgrade_request("/echo", f"apikey: {KEY}", f": {SECRET}"),
        "HTTP/1.1 400 Bad Request",
        (KEY, SECRET),
    ),
    "space-before-colon": Case(
        upgrade_request("/echo", f"apikey : {KEY}"), "HTTP/1.1 400 Bad Request", (KEY,)
    ),
    "folded-header-line": Case(
        upgrade_request("/echo", f"apikey: {KEY}", f" {SECRET}"),
        "HTTP/1.1 400 Bad Request",
        (KEY, SECRET),
    ),
}


def directory() -> ConsumerDirectory:
    return ConsumerDirectory([Consumer("alice", (key_digest(KEY),))])


def start(serve: Callable[[Any], int]) -> int:
    route = RoutePolicy("/echo", [KeyAuthenticator(directory())], protocol=EchoProtocol)
    return serve(SecureServerFactory(route))


@dataclass(frozen=True)
class Response:
    status_line: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def parse_response(raw: bytes) -> Response:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no end of headers in {raw!r}"
    status_line, *lines = head.decode("ascii").split("\r\n")
    headers = []
    for line in lines:
        name, colon, value = line.partition(": ")
        assert colon, f"bad header line {line!r}"
        headers.append((name, value))
    return Response(status_line, tuple(headers), body)


async def assert_serves(port: int) -> None:
    """A good client gets a full echo round trip."""
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/echo", additional_headers={"apikey": KEY}, proxy=None
    ) as ws:
        await ws.send("still here")
        assert await ws.recv() == "still here"
        await ws.send(b"\x00\xff")
        assert await ws.recv() == b"\x00\xff"


def assert_refusal(raw: bytes, case: Case) -> None:
    response = parse_response(raw)
    status = int(case.status_line.split()[1])
    assert response.status_line == case.status_line
    expected_body = (FIXED_BODIES[status] + "\n").encode()
    assert response.body == expected_body
    assert response.values("Content-Length") == [str(len(response.body))]
    assert response.values("Content-Type") == ["text/plain; charset=utf-8"]
    assert response.values("Connection") == ["close"]
    fixed = {
        "Content-Type",
        "Content-Length",
        "Connection",
        "Cache-Control",
    }
    extra = tuple((k, v) for k, v in response.headers if k not in fixed)
    assert extra == case.headers
    for value in case.sent:
        assert value.encode() not in raw, value
    # Only fixed texts: nothing that Autobahn would have said.
    for word in (b"Autobahn", b"autobahn", b"HTTP Upgrade", b"Hixie", b"fragment", b"header"):
        assert word not in raw


@pytest.mark.parametrize("name", list(CASES))
@pytest_twisted.ensureDeferred
async def test_malformed_request_refused(serve, captured_log, name):
    """
    The exact refusal, nothing reflected, nothing secret logged; the
    refusal is logged with its status; the server keeps serving.
    """
    case = CASES[name]
    port = start(serve)
    raw = await aio(raw_exchange(port, case.request))
    assert_refusal(raw, case)

    status = int(case.status_line.split()[1])
    assert len(captured_log.matching(status=status)) == 1
    log = captured_log.text()
    for value in case.sent:
        assert value not in log, value
    await aio(assert_serves(port))


@pytest_twisted.ensureDeferred
async def test_secret_in_subprotocol_never_logged(serve, captured_log):
    """
    C{token, SECRET-XYZ, SECRET-XYZ} is refused by Autobahn's duplicate
    check, whose reason quotes the entry: the log keeps the words only.
    """
    port = start(serve)
    raw = await aio(
        raw_exchange(
            port, upgrade_request("/echo", "Sec-WebSocket-Protocol: token, SECRET-XYZ, SECRET-XYZ")
        )
    )
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"SECRET" not in raw
    (event,) = captured_log.matching(status=400)
    assert "duplicate protocol" in event["reason"]
    assert "SECRET" not in captured_log.text()
    await aio(assert_serves(port))
    assert "SECRET" not in captured_log.text()


@pytest_twisted.ensureDeferred
async def test_server_serves_after_every_malformed_request(serve, captured_log):
    """One server gets every malformed request in turn, then a good client."""
    port = start(serve)
    for name, case in CASES.items():
        raw = await aio(raw_exchange(port, case.request))
        assert raw.startswith(case.status_line.encode() + b"\r\n"), name
    await aio(assert_serves(port))
    log = captured_log.text()
    for case in CASES.values():
        for value in case.sent:
            assert value not in log, value
    assert captured_log.matching(route="/echo", consumer="alice", method="key")
