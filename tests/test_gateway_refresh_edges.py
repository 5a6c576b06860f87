"""
Gateway routes with C{refresh = true}, at the edges of the frame relay:
a refresh message whose first frame is empty or blank (it must not slip
through to the upstream), and the upstream's messages shaped like the
gateway's own (C{wssec.*}: never relayed to the client). Real sockets:
a raw client (tests/wsframes.py) or C{websockets}, and an Autobahn
upstream that records what it receives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
import wsframes
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from conftest import aio
from test_refresh import TIMEOUT, exp_of, route, server, token
from wsframes import CONTINUATION, TEXT, frame

from txwssec.policy import Upstream

Serve = Callable[[Any], int]


class RecordingUpstream(WebSocketServerProtocol):
    """Records what it receives and echoes it."""

    received: list[bytes] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        RecordingUpstream.received.append(payload)
        self.sendMessage(payload, isBinary)


def upstream_factory(protocol: type[WebSocketServerProtocol]) -> WebSocketServerFactory:
    factory = WebSocketServerFactory()
    factory.protocol = protocol
    factory.setProtocolOptions(autoPingInterval=0)
    return factory


def gateway_port(serve: Serve, upstream: type[WebSocketServerProtocol], **options: Any) -> int:
    upstream_port = serve(upstream_factory(upstream))
    options.setdefault("refresh", True)
    gateway = route(
        "/gw",
        protocol=None,
        refresh_notice=0,
        upstream=Upstream((f"ws://127.0.0.1:{upstream_port}/",)),
        **options,
    )
    return serve(server(gateway))


# -- M3: a refresh message whose first frame does not show what it is ----------


@pytest.mark.parametrize(
    "first, rest",
    [
        (b"", b""),
        (b" \t\r\n", b""),
        (b"  ", b"\n"),  # blank, blank, then the message
    ],
    ids=["empty", "blank", "blank-twice"],
)
@pytest_twisted.ensureDeferred
async def test_refresh_after_a_blank_first_frame_is_consumed(
    serve: Serve, first: bytes, rest: bytes
) -> None:
    RecordingUpstream.received = []
    port = gateway_port(serve, RecordingUpstream)
    fresh = token(lifetime=60)
    message = json.dumps({"type": "wssec.refresh", "token": fresh}).encode()

    async def client() -> list[bytes]:
        raw = await wsframes.connect(port, "/gw", f"Authorization: Bearer {token(lifetime=30)}")
        frames = [frame(TEXT, first, fin=False)]
        if rest:
            frames.append(frame(CONTINUATION, rest, fin=False))
        frames.append(frame(CONTINUATION, message))
        for piece in frames:
            await raw.send(piece)
        answers = [(await wsframes.read_message(raw.reader, TIMEOUT)).payload]
        await raw.send(frame(TEXT, b"after"))
        answers.append((await wsframes.read_message(raw.reader, TIMEOUT)).payload)
        raw.close()
        return answers

    refreshed, after = await aio(client())
    assert json.loads(refreshed) == {"type": "wssec.refreshed", "expires_at": exp_of(fresh)}
    assert after == b"after"
    assert RecordingUpstream.received == [b"after"]
