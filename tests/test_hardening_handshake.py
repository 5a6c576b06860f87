"""
Hardening of the opening handshake, over raw sockets.

- C{Sec-WebSocket-Extensions} is parsed per RFC 6455 section 9.1 (quoted
  strings included, all its lines as one list): a malformed value is refused
  with exactly 400, and a quoted parameter can no longer smuggle in an offer.
- An upgrade request that announces a body (C{Content-Length} other than one
  C{0}, any C{Transfer-Encoding}) is refused with 400 before routing or
  authentication.
- Client-supplied values reach the log bounded, with a visible marker, and
  with their control characters escaped.
- Refusals that Autobahn detects itself are logged with the route the path
  matches (C{-} when none does, with the path).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from conftest import CapturedLog, aio, raw_exchange, upgrade_request
from twisted.logger import formatEvent
from wsframes import TEXT, frame_header

from txwssec import (
    AnonymousAuthenticator,
    Consumer,
    ConsumerDirectory,
    KeyAuthenticator,
    RoutePolicy,
    SecureServerFactory,
    ServerPolicy,
)
from txwssec.apps.echo import EchoProtocol
from txwssec.consumers import key_digest
from txwssec.errors import FIXED_BODIES
from txwssec.logs import MAX_LOGGED_VALUE, bounded
from txwssec.origin import OriginPolicy

Serve = Callable[[Any], int]
KEY = "hardening-handshake-key-5e1f"
BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 12\r\n"
    b"Connection: close\r\n"
    b"Cache-Control: no-store\r\n"
    b"\r\n" + FIXED_BODIES[400].encode() + b"\n"
)


def factory(trust_forwarded_for: int = 0) -> SecureServerFactory:
    """C{/deflate} (compression on), C{/plain} (off), C{/keyed} (API key)."""
    anonymous = [AnonymousAuthenticator()]
    keyed = [KeyAuthenticator(ConsumerDirectory([Consumer("alice", (key_digest(KEY),))]))]
    return SecureServerFactory(
        ServerPolicy(
            routes=(
                RoutePolicy("/deflate", anonymous, protocol=EchoProtocol, compression=True),
                RoutePolicy("/plain", anonymous, protocol=EchoProtocol),
                RoutePolicy(
                    "/keyed",
                    keyed,
                    protocol=EchoProtocol,
                    origins=OriginPolicy.from_list(["https://app.example"]),
                ),
            ),
            trust_forwarded_for=trust_forwarded_for,
            trusted_proxies=("127.0.0.1/32",) if trust_forwarded_for else (),
            auth_failures_per_minute=0,
        )
    )


async def opened(port: int, request: bytes) -> dict[str, list[str]]:
    """
    Send C{request}, expect a 101, check that a text frame is echoed.

    @return: the 101's headers, lower-cased names to values.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status, *lines = head.decode("latin-1").split("\r\n")[:-2]
        assert status == "HTTP/1.1 101 Switching Protocols", head
        headers: dict[str, list[str]] = {}
        for line in lines:
            name, _, value = line.partition(": ")
            headers.setdefault(name.lower(), []).append(value)
        if "sec-websocket-extensions" not in headers:
            # An uncompressed text frame, echoed as sent (unmasked).
            writer.write(frame_header(TEXT, 2) + b"hi")
            echoed = await asyncio.wait_for(reader.readexactly(4), 5)
            assert echoed == b"\x81\x02hi"
        return headers
    finally:
        writer.close()


def negotiated(headers: dict[str, list[str]]) -> list[str]:
    return headers.get("sec-websocket-extensions", [])


def refusal_events(log: CapturedLog) -> list[Any]:
    return [e for e in log.events if "status" in e and "reason" in e]


# -- 1. Sec-WebSocket-Extensions -------------------------------------------

MALFORMED_EXTENSIONS: dict[str, tuple[str, ...]] = {
    # The attack: Autobahn split inside the quotes and saw an offer.
    "comma-in-quotes": ('x; y=",permessage-deflate; client_max_window_bits,"',),
    "semicolon-in-quotes": ('x; y="a;permessage-deflate"',),
    "quoted-not-a-token": ('permessage-deflate; client_max_window_bits="1 0"',),
    "unterminated-quote": ('x; y="permessage-deflate',),
    "quote-split-over-two-lines": ('x; y="a', 'permessage-deflate"'),
    "space-in-name": ("permessage deflate",),
    "empty": ("",),
    "only-commas": (", ,",),
    "param-without-extension": ("; client_max_window_bits",),
    "empty-param": ("permessage-deflate;;client_max_window_bits",),
    "no-param-name": ("x; =y",),
    "no-value-after-equals": ("x; y=",),
    "two-equals": ("x; y==z",),
    "token-then-quote": ('x; y=a"b"',),
    "second-line-malformed": ("permessage-deflate", "x; y=@"),
}

VALID_EXTENSIONS: dict[str, tuple[tuple[str, ...], bool]] = {
    "plain": (("permessage-deflate",), True),
    "client-window-bits": (("permessage-deflate; client_max_window_bits",), True),
    "client-window-bits-value": (("permessage-deflate; client_max_window_bits=10",), True),
    "quoted-token": (('permessage-deflate; client_max_window_bits="10"',), True),
    "quoted-pair": (('permessage-deflate; client_max_window_bits="1\\5"',), True),
    "whitespace": (
        ("  permessage-deflate ;  client_no_context_takeover\t; client_max_window_bits = 9 ",),
        True,
    ),
    "upper-case": (("Permessage-Deflate; Client_Max_Window_Bits",), True),
    "server-window-bits": (("permessage-deflate; server_max_window_bits=15",), True),
    "two-offers": (
        (
            "permessage-deflate; client_max_window_bits=10; server_max_window_bits=12, "
            "permessage-deflate",
        ),
        True,
    ),
    "empty-elements": ((", permessage-deflate ,, ",), True),
    "unknown-first": (('x-unknown; a="b"; c, permessage-deflate',), True),
    "two-lines": (("x-unknown; a=b", "permessage-deflate"), True),
    "unknown-only": (('x-unknown; a="quoted", x-other',), False),
    "unknown-quoted-deflate-name": (('x-unknown; a="permessage-deflate"',), False),
}


@pytest.mark.parametrize("name", list(MALFORMED_EXTENSIONS))
@pytest_twisted.ensureDeferred
async def test_malformed_extensions_refused(
    serve: Serve, captured_log: CapturedLog, name: str
) -> None:
    """Exactly 400 with the fixed body; the log names the header."""
    port = serve(factory())
    lines = [f"Sec-WebSocket-Extensions: {value}" for value in MALFORMED_EXTENSIONS[name]]
    raw = await aio(raw_exchange(port, upgrade_request("/deflate", *lines)))
    assert raw == BAD_REQUEST
    (event,) = refusal_events(captured_log)
    assert event["status"] == 400
    assert event["route"] == "/deflate"
    assert "Sec-WebSocket-Extensions" in event["reason"]


@pytest.mark.parametrize("name", ["comma-in-quotes", "unterminated-quote"])
@pytest_twisted.ensureDeferred
async def test_malformed_extensions_refused_without_compression(serve: Serve, name: str) -> None:
    """A malformed header is refused on every route."""
    port = serve(factory())
    lines = [f"Sec-WebSocket-Extensions: {value}" for value in MALFORMED_EXTENSIONS[name]]
    raw = await aio(raw_exchange(port, upgrade_request("/plain", *lines)))
    assert raw == BAD_REQUEST


@pytest.mark.parametrize("name", list(VALID_EXTENSIONS))
@pytest_twisted.ensureDeferred
async def test_valid_extensions_negotiate(serve: Serve, name: str) -> None:
    port = serve(factory())
    values, deflate = VALID_EXTENSIONS[name]
    lines = [f"Sec-WebSocket-Extensions: {value}" for value in values]
    headers = await aio(opened(port, upgrade_request("/deflate", *lines)))
    if deflate:
        (answer,) = negotiated(headers)
        assert answer.startswith("permessage-deflate")
    else:
        assert negotiated(headers) == []
    # Never on a route without compression.
    assert negotiated(await aio(opened(port, upgrade_request("/plain", *lines)))) == []


# -- 2. upgrade requests that announce a body ------------------------------

BODIES: dict[str, tuple[tuple[str, ...], bytes]] = {
    "content-length": (("Content-Length: 5",), b"hello"),
    "content-length-lower-case": (("content-length: 5",), b"hello"),
    "content-length-plus": (("Content-Length: +5",), b"hello"),
    "content-length-plus-zero": (("Content-Length: +0",), b""),
    "content-length-zero-zero": (("Content-Length: 00",), b""),
    "content-length-list": (("Content-Length: 0, 0",), b""),
    "two-content-lengths-zero": (("Content-Length: 0", "Content-Length: 0"), b""),
    "two-content-lengths": (("Content-Length: 5", "Content-Length: 0"), b"hello"),
    "content-length-not-a-number": (("Content-Length: five",), b""),
    "chunked": (("Transfer-Encoding: chunked",), b"5\r\nhello\r\n0\r\n\r\n"),
    "chunked-upper-case": (("TRANSFER-ENCODING: CHUNKED",), b"0\r\n\r\n"),
    "identity": (("Transfer-Encoding: identity",), b""),
    "gzip-chunked": (("Transfer-Encoding: gzip, chunked",), b"0\r\n\r\n"),
    "empty-transfer-encoding": (("Transfer-Encoding:",), b""),
    "both": (("Content-Length: 5", "Transfer-Encoding: chunked"), b"0\r\n\r\n"),
}


@pytest.mark.parametrize("name", list(BODIES))
@pytest.mark.parametrize("path", ["/plain", "/keyed", "/nowhere"])
@pytest_twisted.ensureDeferred
async def test_upgrade_with_body_refused(
    serve: Serve, captured_log: CapturedLog, name: str, path: str
) -> None:
    """
    Exactly 400, before anything else: not 404 for an unknown path, not 401
    without credentials.
    """
    port = serve(factory())
    lines, body = BODIES[name]
    raw = await aio(raw_exchange(port, upgrade_request(path, *lines) + body))
    assert raw == BAD_REQUEST
    (event,) = refusal_events(captured_log)
    assert event["status"] == 400
    header = "Transfer-Encoding" if "transfer" in "".join(lines).lower() else "Content-Length"
    assert header in event["reason"]


@pytest_twisted.ensureDeferred
async def test_content_length_zero_accepted(serve: Serve) -> None:
    """One C{Content-Length: 0} announces no body: the upgrade goes on."""
    port = serve(factory())
    await aio(opened(port, upgrade_request("/plain", "Content-Length: 0")))
    await aio(opened(port, upgrade_request("/plain", "Content-Length:  0 ")))


# -- 4. bounded logging ----------------------------------------------------

LONG = 15 * 1024
#: The longest formatted refusal line: the reason and each value bounded.
MAX_LINE = 3000


def refusal_lines(log: CapturedLog) -> list[str]:
    return [formatEvent(e) for e in refusal_events(log)]


def assert_bounded(line: str) -> None:
    assert len(line) < MAX_LINE, len(line)
    assert "more chars]" in line
    assert "\n" not in line and "\r" not in line


def test_bounded_helper() -> None:
    assert bounded("/echo") == "/echo"
    assert bounded(12) == "12"
    assert bounded("a\r\nb\x00\x1b\x7f\x85\u2028é") == "a\\x0d\\x0ab\\x00\\x1b\\x7f\\x85\\u2028é"
    text = "x" * (MAX_LOGGED_VALUE + 10)
    assert bounded(text) == "x" * MAX_LOGGED_VALUE + "\u2026[10 more chars]"
    assert bounded("x" * MAX_LOGGED_VALUE) == "x" * MAX_LOGGED_VALUE
    assert bounded("abcdef", 3) == "abc\u2026[3 more chars]"
    assert len(bounded("\n" * LONG)) < 6 * MAX_LOGGED_VALUE + 30


@pytest_twisted.ensureDeferred
async def test_long_path_logged_bounded(serve: Serve, captured_log: CapturedLog) -> None:
    port = serve(factory())
    path = "/" + "p" * LONG
    raw = await aio(raw_exchange(port, upgrade_request(path)))
    assert raw.startswith(b"HTTP/1.1 404 Not Found\r\n")
    (line,) = refusal_lines(captured_log)
    assert_bounded(line)
    (event,) = refusal_events(captured_log)
    assert event["route"] == "-"
    assert len(event["path"]) < MAX_LOGGED_VALUE + 30
    assert event["path"].startswith("/ppp")


@pytest_twisted.ensureDeferred
async def test_long_origin_logged_bounded(serve: Serve, captured_log: CapturedLog) -> None:
    port = serve(factory())
    origin = "https://" + "o" * LONG + ".example"
    request = upgrade_request("/keyed", f"apikey: {KEY}", f"Origin: {origin}")
    raw = await aio(raw_exchange(port, request))
    assert raw.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    (line,) = refusal_lines(captured_log)
    assert_bounded(line)
    assert KEY not in line


@pytest_twisted.ensureDeferred
async def test_long_forwarded_for_logged_bounded(serve: Serve, captured_log: CapturedLog) -> None:
    """
    A long X-Forwarded-For from a trusted proxy is not an IP address: the
    client is the peer, and no log line carries the header's value.
    """
    port = serve(factory(trust_forwarded_for=1))
    forwarded = "f" * LONG
    raw = await aio(raw_exchange(port, upgrade_request("/keyed", f"X-Forwarded-For: {forwarded}")))
    assert raw.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    (line,) = refusal_lines(captured_log)
    assert line.startswith("refused tcp4:127.0.0.1:")
    assert "ffffffff" not in line
    await aio(opened(port, upgrade_request("/plain", f"X-Forwarded-For: 10.0.0.1, {forwarded}")))
    (accepted,) = [e for e in captured_log.events if e.get("consumer") == "anonymous"]
    assert len(formatEvent(accepted)) < MAX_LINE
    assert "ffffffff" not in formatEvent(accepted)


@pytest_twisted.ensureDeferred
async def test_long_header_in_autobahn_refusal_bounded(
    serve: Serve, captured_log: CapturedLog
) -> None:
    """A refusal Autobahn words itself (a long subprotocol list)."""
    port = serve(factory())
    protocols = ", ".join(["p" * 100] * 2 + [f"q{i}" for i in range(LONG // 8)])
    raw = await aio(
        raw_exchange(port, upgrade_request("/plain", f"Sec-WebSocket-Protocol: {protocols}"))
    )
    assert raw == BAD_REQUEST
    (line,) = refusal_lines(captured_log)
    assert len(line) < MAX_LINE


@pytest.mark.parametrize("character", [b"\x0b", b"\x1b", b"\x85", b"\x7f"])
@pytest_twisted.ensureDeferred
async def test_control_characters_escaped(
    serve: Serve, captured_log: CapturedLog, character: bytes
) -> None:
    """A control character in the request line does not reach the log raw."""
    port = serve(factory())
    request = upgrade_request("/plain").replace(b"/plain", b"/pl" + character + b"ain\n", 1)
    raw = await aio(raw_exchange(port, request))
    assert raw == BAD_REQUEST
    (event,) = refusal_events(captured_log)
    text = formatEvent(event) + repr(event["path"])
    assert character.decode("latin-1") not in text
    assert "\n" not in formatEvent(event)
    assert event["path"] == "/pl" + bounded(character.decode("latin-1")) + "ain\\x0a"


# -- 5. refusals detected inside Autobahn: the route -----------------------

AUTOBAHN_REFUSALS: dict[str, tuple[bytes, bytes]] = {
    "bad-key": (b"dGhlIHNhbXBsZSBub25jZQ==", b"not-a-websocket-key-at-all"),
    "bad-version": (b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 12"),
    "no-upgrade": (b"Upgrade: websocket", b"Upgrade: h2c"),
}


@pytest.mark.parametrize("name", list(AUTOBAHN_REFUSALS))
@pytest.mark.parametrize(("path", "route"), [("/plain", "/plain"), ("/nowhere", "-")])
@pytest_twisted.ensureDeferred
async def test_autobahn_refusal_logged_with_route(
    serve: Serve, captured_log: CapturedLog, name: str, path: str, route: str
) -> None:
    port = serve(factory())
    old, new = AUTOBAHN_REFUSALS[name]
    request = upgrade_request(path + "?apikey=SECRET-IN-QUERY").replace(old, new)
    raw = await aio(raw_exchange(port, request))
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    (event,) = refusal_events(captured_log)
    assert event["route"] == route
    assert event["path"] == path
    assert "SECRET-IN-QUERY" not in captured_log.text()


@pytest_twisted.ensureDeferred
async def test_unparsable_request_line_logged_unmatched(
    serve: Serve, captured_log: CapturedLog
) -> None:
    port = serve(factory())
    raw = await aio(raw_exchange(port, b"GARBAGE\r\nHost: x\r\n\r\n"))
    assert raw == BAD_REQUEST
    (event,) = refusal_events(captured_log)
    assert (event["route"], event["path"]) == ("-", "")
