"""
The lean 101 (txwssec/server/handshake.py, HandshakeIO._openLean; issue
19, round 3): for the common answer, the same bytes and the same state as
Autobahn's succeedHandshake; anything else still goes to Autobahn's.

Differential, as tests/test_upgrade_reader.py: each request is sent to the
same server with the lean 101 on and off (LEAN_OPEN).
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from conftest import aio
from test_upgrade_reader import KEY, REQUESTS, exchange, factory, request
from wsframes import PING, TEXT, frame

import txwssec.server.handshake
from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec.apps.echo import EchoProtocol

#: What each connection's state was at onOpen.
OPENED: list[dict[str, Any]] = []

_STATE = (
    "websocket_protocol_in_use",
    "websocket_extensions_in_use",
    "http_response_data",
    "state",
    "openHandshakeTimeoutCall",
    "inside_message",
    "current_frame",
    "data",
)


class Seen(EchoProtocol):
    def onOpen(self) -> None:
        state = {name: getattr(self, name) for name in _STATE}
        state["autoPing"] = self.autoPingPendingCall is not None
        state["is_open"] = self.is_open.called
        state["extensions"] = [type(e).__name__ for e in state.pop("websocket_extensions_in_use")]
        OPENED.append(state)
        super().onOpen()


def seen_factory(server: str | None = "txwssec") -> SecureServerFactory:
    made = SecureServerFactory(
        ServerPolicy(
            routes=(
                RoutePolicy(
                    "/echo",
                    [AnonymousAuthenticator()],
                    protocol=Seen,
                    subprotocols=("chat", "other"),
                ),
                RoutePolicy(
                    "/deflate", [AnonymousAuthenticator()], protocol=Seen, compression=True
                ),
            ),
        ),
    )
    made.server = server
    return made


@pytest.fixture
def lean_off(monkeypatch: pytest.MonkeyPatch) -> Any:
    def off() -> None:
        monkeypatch.setattr(txwssec.server.handshake, "LEAN_OPEN", False)

    return off


async def both(port: int, data: bytes, off: Any) -> tuple[bytes, bytes]:
    lean = await aio(exchange(port, data))
    off()
    autobahn = await aio(exchange(port, data))
    txwssec.server.handshake.LEAN_OPEN = True  # (monkeypatch restores it too)
    return lean, autobahn


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name,data", REQUESTS, ids=[name for name, _ in REQUESTS])
async def test_same_answer_as_autobahns(serve: Any, lean_off: Any, name: str, data: bytes) -> None:
    port = serve(factory())
    lean, autobahn = await both(port, data, lean_off)
    assert lean == autobahn


OPENS = [
    ("plain", request(), {}),
    ("subprotocol", request("Sec-WebSocket-Protocol: x, chat"), {}),
    ("subprotocols", request("Sec-WebSocket-Protocol: other, chat"), {}),
    ("no server header", request(), {"server": None}),
    ("empty server header", request(), {"server": ""}),
    (
        "deflate",
        request("Sec-WebSocket-Extensions: permessage-deflate", line="GET /deflate HTTP/1.1"),
        {},
    ),
    ("unknown extension", request("Sec-WebSocket-Extensions: x-foo"), {}),
    # Frames that came with the request: read after the 101.
    ("early frames", request() + frame(TEXT, b"early") + frame(PING, b"p"), {}),
    ("apikey header kept", request(f"apikey: {KEY}"), {}),
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name,data,options", OPENS, ids=[name for name, _, _ in OPENS])
@pytest.mark.parametrize("auto_ping", [0, 30])
async def test_same_101_and_state_as_autobahns(
    serve: Any, lean_off: Any, name: str, data: bytes, options: dict[str, Any], auto_ping: int
) -> None:
    made = seen_factory(**options)
    made.setProtocolOptions(autoPingInterval=auto_ping)
    port = serve(made)
    OPENED.clear()
    lean, autobahn = await both(port, data, lean_off)
    assert lean == autobahn
    assert lean.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert len(OPENED) == 2
    assert OPENED[0] == OPENED[1]
    assert OPENED[0]["autoPing"] is bool(auto_ping)
    assert OPENED[0]["openHandshakeTimeoutCall"] is None


@pytest_twisted.ensureDeferred
async def test_factory_headers_go_to_autobahn(serve: Any, lean_off: Any) -> None:
    made = seen_factory()
    made.headers = {"X-One": "1", "X-Two": ["a", "b"]}
    port = serve(made)
    lean, autobahn = await both(port, request(), lean_off)
    assert lean == autobahn
    assert b"\r\nX-One: 1\r\nX-Two: a\r\nX-Two: b\r\n" in lean
