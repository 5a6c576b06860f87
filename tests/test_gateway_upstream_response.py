"""
The gateway's upstream leg reads the upstream's 101 itself
(L{UpstreamProtocol.processHandshake}): a plain 101 that passes every check
of Autobahn's client opens the session without going through Autobahn's
code; any other response goes through Autobahn's, which fails it with its
own reason (the gateway answers 502 and emits C{upstream.failed}).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
import websockets
from autobahn.websocket.protocol import WebSocketClientProtocol
from conftest import aio
from test_gateway import KEY, RawFactory, connect, gateway, raw_servers, refused, ws_url
from twisted.internet.protocol import Protocol

Serve = Callable[[Any], int]

__all__ = ["raw_servers"]  # the fixture

MAGIC = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: A text frame "hi" from the upstream, right behind its 101.
HI = b"\x81\x02hi"


class Keyed(Protocol):
    """Answers the upgrade request with C{factory.reply(accept)}."""

    factory: KeyedFactory

    def __init__(self) -> None:
        self.buffer = b""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer and not self.factory.answered:
            self.factory.answered = True
            head = self.buffer.split(b"\r\n\r\n")[0].decode()
            self.factory.request = head
            key = next(
                line.split(":", 1)[1].strip()
                for line in head.split("\r\n")
                if line.lower().startswith("sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1(key.encode() + MAGIC).digest()).decode()
            transport: Any = self.transport
            transport.write(self.factory.reply(accept).encode() + self.factory.after)


class KeyedFactory(RawFactory):
    protocol = Keyed  # type: ignore[assignment]

    def __init__(self, reply: Callable[[str], str], after: bytes = b"") -> None:
        super().__init__()
        self.reply = reply  # type: ignore[assignment]
        self.after = after
        self.answered = False
        self.request = ""


def switching(
    *headers: str, status: str = "HTTP/1.1 101 Switching Protocols"
) -> Callable[[str], str]:
    """A response head: C{{accept}} in a header is replaced by the right value."""
    return lambda accept: (
        "\r\n".join([status, *(h.format(accept=accept) for h in headers)]) + "\r\n\r\n"
    )


UPGRADE = ("Upgrade: websocket", "Connection: Upgrade")
GOOD = (*UPGRADE, "Sec-WebSocket-Accept: {accept}")


@pytest.fixture
def autobahn_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times Autobahn's own client processHandshake ran."""
    calls: list[int] = []
    original = WebSocketClientProtocol.processHandshake

    def counted(self: Any) -> Any:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(WebSocketClientProtocol, "processHandshake", counted)
    return calls


@pytest.mark.parametrize(
    "headers",
    [
        GOOD,
        (
            "UPGRADE:  WebSocket ",
            "connection: keep-alive, upgrade",
            "sec-websocket-accept: {accept}",
        ),
        (*GOOD, "Sec-WebSocket-Protocol: "),
    ],
    ids=["plain", "case-and-spaces", "empty-protocol"],
)
@pytest_twisted.ensureDeferred
async def test_a_plain_101_opens_without_autobahns_code(
    serve: Serve, raw_servers: Any, autobahn_calls: list[int], headers: tuple[str, ...]
) -> None:
    upstream = raw_servers(KeyedFactory(switching(*headers), after=HI))
    port = serve(gateway(ws_url(serve(upstream))))

    async def run() -> tuple[str | bytes, str | None]:
        ws = await connect(port)
        try:
            return await ws.recv(), ws.subprotocol
        finally:
            ws.transport.abort()

    assert await aio(run()) == ("hi", None)
    assert autobahn_calls == []


@pytest_twisted.ensureDeferred
async def test_the_upstreams_subprotocol_reaches_the_client(
    serve: Serve, raw_servers: Any, autobahn_calls: list[int]
) -> None:
    upstream = raw_servers(
        KeyedFactory(switching(*GOOD, "Sec-WebSocket-Protocol: chat.v2"), after=HI)
    )
    port = serve(gateway(ws_url(serve(upstream))))

    async def run() -> tuple[str | bytes, str | None]:
        ws = await connect(port, subprotocols=["chat.v1", "chat.v2"])
        try:
            return await ws.recv(), ws.subprotocol
        finally:
            ws.transport.abort()

    assert await aio(run()) == ("hi", "chat.v2")
    assert "Sec-WebSocket-Protocol: chat.v1,chat.v2" in upstream.request
    assert autobahn_calls == []


#: Responses Autobahn's client refuses, and the reason it gives.
BAD = {
    "status-403": (
        switching(*GOOD, status="HTTP/1.1 403 Forbidden"),
        "WebSocket connection upgrade failed [403]: Forbidden",
    ),
    "http-1.0": (
        switching(*GOOD, status="HTTP/1.0 101 Switching Protocols"),
        'Unsupported HTTP version "HTTP/1.0"',
    ),
    "no-upgrade": (
        switching("Connection: Upgrade", "Sec-WebSocket-Accept: {accept}"),
        "HTTP Upgrade header missing",
    ),
    "upgrade-h2c": (
        switching("Upgrade: h2c", "Connection: Upgrade", "Sec-WebSocket-Accept: {accept}"),
        'HTTP Upgrade header different from "websocket"',
    ),
    "no-connection": (
        switching("Upgrade: websocket", "Sec-WebSocket-Accept: {accept}"),
        "HTTP Connection header missing",
    ),
    "connection-close": (
        switching("Upgrade: websocket", "Connection: close", "Sec-WebSocket-Accept: {accept}"),
        'HTTP Connection header does not include "upgrade"',
    ),
    "no-accept": (switching(*UPGRADE), "HTTP Sec-WebSocket-Accept header missing"),
    "wrong-accept": (
        switching(*UPGRADE, "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "HTTP Sec-WebSocket-Accept bogus value",
    ),
    "two-accepts": (
        switching(*GOOD, "Sec-WebSocket-Accept: {accept}"),
        "HTTP Sec-WebSocket-Accept header appears more than once",
    ),
    "protocol-not-offered": (
        switching(*GOOD, "Sec-WebSocket-Protocol: admin"),
        'subprotocol selected by server "admin" not in subprotocol list',
    ),
    "two-protocols": (
        switching(*GOOD, "Sec-WebSocket-Protocol: chat.v1", "Sec-WebSocket-Protocol: chat.v1"),
        "HTTP Sec-WebSocket-Protocol header appears more than once",
    ),
    "extension-not-offered": (
        switching(*GOOD, "Sec-WebSocket-Extensions: permessage-deflate"),
        "permessage-compress extension response from server denied by client",
    ),
    "unknown-extension": (
        switching(*GOOD, "Sec-WebSocket-Extensions: x-unknown"),
        'server wants to use extension "x-unknown" we did not request',
    ),
    "obs-fold": (
        switching(*GOOD, "X-Folded: a", " b"),
        "obsolete line folding in HTTP header",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest_twisted.ensureDeferred
async def test_any_other_response_fails_with_autobahns_reason(
    serve: Serve, raw_servers: Any, autobahn_calls: list[int], case: str
) -> None:
    reply, reason = BAD[case]
    upstream = raw_servers(KeyedFactory(reply, after=HI))
    url = ws_url(serve(upstream))
    factory = gateway(url, timeout=5)
    failed: list[dict[str, Any]] = []
    factory.events.add(
        lambda name, fields: failed.append(dict(fields)) if name == "upstream.failed" else None
    )
    port = serve(factory)

    async def run() -> tuple[int, bytes]:
        if case.startswith("protocol") or case.startswith("two-protocols"):
            try:
                ws = await connect(port, subprotocols=["chat.v1"])
            except websockets.InvalidStatus as error:
                return error.response.status_code, bytes(error.response.body or b"")
            await ws.close()
            raise AssertionError("the handshake succeeded")
        return await refused(port, {"apikey": KEY})

    assert await aio(run()) == (502, b"bad gateway\n")
    assert len(failed) == 1
    assert failed[0]["kind"] == "refused"
    assert reason in failed[0]["reason"]
    assert autobahn_calls == [1]
