"""
The lean upgrade reader (txwssec/server/upgrade.py): a well-formed upgrade
request is read once and answered without Autobahn's C{processHandshake};
anything else goes to Autobahn's reader as before.

Differential: each request below is sent to the same server with the lean
reader on and off (C{readUpgrade} answering L{False}, Autobahn's reader for
everything). The bytes the client gets, the state Autobahn's reader leaves
on the protocol and the L{HandshakeRequest} the pipeline sees must be the
same both ways, for well-formed requests and malformed ones alike.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from conftest import aio, raw_exchange
from wsframes import CLOSE, frame

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
from txwssec.origin import OriginPolicy
from txwssec.server import SecureServerProtocol
from txwssec.server.upgrade import UpgradeReader
from txwssec.types import HandshakeRequest

KEY = "upgrade-reader-key-0c41"
#: A close frame sent right after the request: a 101 is followed by the
#: server's close frame and the end of the connection (deterministic bytes).
BYE = frame(CLOSE, b"\x03\xe8")

#: What each protocol saw: Autobahn's reader state and the pipeline's request.
SEEN: list[dict[str, Any]] = []

_STATE = (
    "http_request_data",
    "http_status_line",
    "http_headers",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "websocket_version",
    "websocket_protocols",
    "websocket_origin",
    "websocket_extensions",
    "_wskey",
)


class Recording(SecureServerProtocol):
    """
    The factory's protocol: records the reader's state and the pipeline's
    request (before a route's class takes the connection over).
    """

    def handshakeRequest(self, request: Any) -> HandshakeRequest:
        found = super().handshakeRequest(request)
        state = {name: getattr(self, name, None) for name in _STATE}
        state["request"] = found
        state["connect"] = request.__dict__ if hasattr(request, "__dict__") else repr(request)
        state["rest"] = self.data
        SEEN.append(state)
        return found


def factory() -> SecureServerFactory:
    anonymous = [AnonymousAuthenticator()]
    keyed = [KeyAuthenticator(ConsumerDirectory([Consumer("alice", (key_digest(KEY),))]))]
    made = SecureServerFactory(
        ServerPolicy(
            routes=(
                RoutePolicy("/echo", anonymous, protocol=EchoProtocol, subprotocols=("chat",)),
                RoutePolicy("/deflate", anonymous, protocol=EchoProtocol, compression=True),
                RoutePolicy("/keyed", keyed, protocol=EchoProtocol),
                RoutePolicy(
                    "/web",
                    anonymous,
                    protocol=EchoProtocol,
                    origins=OriginPolicy.from_list(["https://app.example", "null"]),
                ),
            ),
            auth_failures_per_minute=0,
        )
    )
    made.protocol = Recording
    return made


def request(
    *extra: str,
    line: str = "GET /echo HTTP/1.1",
    host: str | None = "Host: 127.0.0.1",
    upgrade: str | None = "Upgrade: websocket",
    connection: str | None = "Connection: Upgrade",
    key: str | None = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    version: str | None = "Sec-WebSocket-Version: 13",
) -> bytes:
    lines = [line, *(h for h in (host, upgrade, connection, key, version) if h is not None)]
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode("latin-1")


#: (name, request): well-formed ones (the lean reader answers) and
#: malformed or unusual ones (Autobahn's reader answers).
REQUESTS = [
    ("plain", request()),
    ("query", request(line="GET /echo?a=1&b=2&a=3&c HTTP/1.1")),
    ("empty query", request(line="GET /echo? HTTP/1.1")),
    ("question mark in query", request(line="GET /echo?a=?b HTTP/1.1")),
    ("percent path", request(line="GET /ec%68o HTTP/1.1")),
    ("subprotocols", request("Sec-WebSocket-Protocol: x, chat")),
    ("subprotocol lines", request("Sec-WebSocket-Protocol: x", "Sec-WebSocket-Protocol: chat")),
    ("repeated subprotocol", request("Sec-WebSocket-Protocol: chat, chat")),
    ("origin", request("Origin: https://app.example")),
    ("origin null", request("Origin: null")),
    ("origin allowed", request("Origin: https://app.example", line="GET /web HTTP/1.1")),
    ("origin null allowed", request("Origin: null", line="GET /web HTTP/1.1")),
    ("origin other", request("Origin: https://other.example", line="GET /web HTTP/1.1")),
    ("two origins", request("Origin: https://a.example", "Origin: https://b.example")),
    ("bad origin", request("Origin: ::")),
    (
        "deflate",
        request("Sec-WebSocket-Extensions: permessage-deflate", line="GET /deflate HTTP/1.1"),
    ),
    (
        "deflate lines",
        request(
            "Sec-WebSocket-Extensions: x-foo",
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
            line="GET /deflate HTTP/1.1",
        ),
    ),
    ("repeated header", request("X-Thing: 1", "x-thing:2", "X-THING:  3\t ")),
    ("no space", request(host="Host:127.0.0.1")),
    ("nbsp value", request("X-Thing: \xa0a\xa0")),
    ("obs-text value", request("X-Thing: caf\xe9")),
    ("host port", request(host="Host: 127.0.0.1:80")),
    ("host bad port", request(host="Host: 127.0.0.1:x")),
    ("host ipv6", request(host="Host: [::1]")),
    ("host ipv6 port", request(host="Host: [::1]:8080")),
    ("two hosts", request("Host: 127.0.0.2")),
    ("no host", request(host=None)),
    ("upgrade list", request(upgrade="Upgrade: foo, WebSocket")),
    ("upgrade h2c", request(upgrade="Upgrade: h2c")),
    ("no upgrade", request(upgrade=None)),
    ("connection list", request(connection="Connection: keep-alive, upgrade")),
    ("connection close", request(connection="Connection: close")),
    ("no connection", request(connection=None)),
    ("version 8", request(version="Sec-WebSocket-Version: 8")),
    ("version plus", request(version="Sec-WebSocket-Version: +13")),
    ("version spaces", request(version="Sec-WebSocket-Version:   13  ")),
    ("version x", request(version="Sec-WebSocket-Version: x")),
    ("two versions", request("Sec-WebSocket-Version: 13")),
    ("no version", request(version=None)),
    ("no key", request(key=None)),
    ("short key", request(key="Sec-WebSocket-Key: abc==")),
    ("bad key", request(key="Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZ!==")),
    ("two keys", request("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")),
    ("post", request(line="POST /echo HTTP/1.1")),
    ("lower get", request(line="get /echo HTTP/1.1")),
    ("http 1.0", request(line="GET /echo HTTP/1.0")),
    ("http 2", request(line="GET /echo HTTP/2")),
    ("fragment", request(line="GET /echo#x HTTP/1.1")),
    ("params", request(line="GET /echo;p=1 HTTP/1.1")),
    ("network path", request(line="GET //echo HTTP/1.1")),
    ("absolute", request(line="GET http://127.0.0.1/echo HTTP/1.1")),
    ("double space", request(line="GET  /echo HTTP/1.1")),
    ("non-ascii path", request(line="GET /\xe9cho HTTP/1.1")),
    ("unknown route", request(line="GET /nowhere HTTP/1.1")),
    ("control in value", request("X-Thing: a\x01b")),
    ("obs-fold", request("X-Thing: a", " folded")),
    ("no colon", request("X-Thing")),
    ("space before colon", request("X-Thing : a")),
    ("key auth", request(f"apikey: {KEY}", line="GET /keyed HTTP/1.1")),
    ("key auth wrong", request("apikey: wrong", line="GET /keyed HTTP/1.1")),
    ("content-length", request("Content-Length: 5")),
]


@pytest.fixture
def lean_off(monkeypatch: pytest.MonkeyPatch) -> Any:
    def off() -> None:
        monkeypatch.setattr(UpgradeReader, "readUpgrade", lambda self, end: False)

    return off


async def exchange(port: int, data: bytes) -> bytes:
    return await raw_exchange(port, data + BYE)


def comparable(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for state in seen:
        state = dict(state)
        found: HandshakeRequest = state.pop("request")
        # The client's port differs between two connections.
        state["request"] = (found.host, found.path, found.query, found.headers, found.subprotocols)
        state.pop("connect")
        out.append(state)
    return out


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name,data", REQUESTS, ids=[name for name, _ in REQUESTS])
async def test_same_answer_and_state_as_autobahns_reader(
    serve: Any, lean_off: Any, name: str, data: bytes
) -> None:
    SEEN.clear()
    port = serve(factory())
    lean = await aio(exchange(port, data))
    lean_seen = comparable(SEEN)
    SEEN.clear()
    lean_off()
    autobahn = await aio(exchange(port, data))
    assert lean == autobahn
    assert lean_seen == comparable(SEEN)
    if lean.startswith(b"HTTP/1.1 101 "):
        assert len(lean_seen) == 1
    assert lean.startswith(b"HTTP/1.1 ")


@pytest_twisted.ensureDeferred
async def test_well_formed_request_read_once(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A well-formed request never reaches Autobahn's processHandshake, and
    its pipeline runs without a Deferred (onConnect answered at once).
    """
    from autobahn.websocket.protocol import WebSocketServerProtocol

    def autobahn_reader(self: Any) -> None:
        raise AssertionError("Autobahn's reader was used")

    monkeypatch.setattr(WebSocketServerProtocol, "processHandshake", autobahn_reader)
    SEEN.clear()
    port = serve(factory())
    answer = await aio(exchange(port, request("X-Thing: y", line="GET /echo?x=1 HTTP/1.1")))
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
    assert len(SEEN) == 1
    assert SEEN[0]["request"].query == {"x": ("1",)}


@pytest_twisted.ensureDeferred
async def test_unusual_request_goes_to_autobahns_reader(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request the lean reader does not take is read by Autobahn's."""
    from autobahn.websocket.protocol import WebSocketServerProtocol

    used = []
    original = WebSocketServerProtocol.processHandshake

    def autobahn_reader(self: Any) -> None:
        used.append(True)
        original(self)

    monkeypatch.setattr(WebSocketServerProtocol, "processHandshake", autobahn_reader)
    port = serve(factory())
    answer = await aio(exchange(port, request(version="Sec-WebSocket-Version: +13")))
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert used == [True]


@pytest_twisted.ensureDeferred
async def test_listener_read_only_for_the_default_origin_rule(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A route with an Origin list decides without the listener (its address
    and certificate); the default rule (no list) still reads it.
    """
    import txwssec.server.protocol as protocol

    calls: list[Any] = []
    original = protocol.listener_for

    def counting(transport: Any, public_origins: Any = ()) -> Any:
        calls.append(transport)
        return original(transport, public_origins)

    monkeypatch.setattr(protocol, "listener_for", counting)
    port = serve(factory())
    listed = request("Origin: https://app.example", line="GET /web HTTP/1.1")
    assert (await aio(exchange(port, listed))).startswith(b"HTTP/1.1 101 ")
    assert calls == []
    default = request("Origin: http://127.0.0.1:1", line="GET /echo HTTP/1.1")
    assert (await aio(exchange(port, default))).startswith(b"HTTP/1.1 403 ")
    assert len(calls) == 1


def test_origins_remembered_are_bounded() -> None:
    from txwssec.server import upgrade

    upgrade._origins.clear()
    for n in range(upgrade._ORIGINS_KEPT * 2 + 1):
        assert upgrade._origin_of(f"https://h{n}.example") == (
            "https",
            f"h{n}.example",
            443,
        )
    assert len(upgrade._origins) <= upgrade._ORIGINS_KEPT
    assert upgrade._origin_of("https://") is None  # no host: Autobahn's 400
    assert upgrade._origin_of("null") == "null"
