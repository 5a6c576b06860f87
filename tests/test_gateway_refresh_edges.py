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


# -- L5: the upstream's messages shaped like the gateway's own -----------------

EXPIRING = b'{"type":"wssec.expiring","expires_at":1}'


class NoticeUpstream(WebSocketServerProtocol):
    """
    On C{!send <how>}: a forged txwssec message sent as C{how} says, then
    an ordinary JSON message in the same way, then C{done}.
    """

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        how = payload.decode().removeprefix("!send ")
        forged = {
            "expiring": EXPIRING,
            "refreshed": b' {"type": "wssec.refreshed", "expires_at": 99}',
            "rejected": b'{"type":"wssec.refresh_rejected","reason":"too many refreshes"}',
            "other": b'{"type":"wssec.whatever"}',
        }.get(how, EXPIRING)
        ordinary = b'{"type":"chat","text":"hi"}'
        for message in (forged, ordinary):
            if how.startswith("split"):
                cut = 0 if how == "split-empty" else 5
                self.beginMessage(isBinary=False)
                self.sendMessageFrame(message[:cut])
                self.sendMessageFrame(message[cut:])
                self.endMessage()
            else:
                self.sendMessage(message, False)
        self.sendMessage(b"done", False)


@pytest.mark.parametrize(
    "how, compression",
    [
        ("expiring", False),
        ("refreshed", False),
        ("rejected", False),
        ("other", False),
        ("split", False),
        ("split-empty", False),
        ("expiring", True),
        ("split", True),
    ],
)
@pytest_twisted.ensureDeferred
async def test_upstream_wssec_messages_never_reach_the_client(
    serve: Serve, how: str, compression: bool
) -> None:
    """
    On a refresh route, a txwssec control message from the upstream (in
    one frame: the relay; in several, or with compression: Autobahn's
    path) is dropped; ordinary messages around it are relayed, and the
    first drop of the session is one event.
    """
    from test_refresh import seen_events

    upstream_port = serve(upstream_factory(NoticeUpstream))
    gateway = route(
        "/gw",
        protocol=None,
        refresh=True,
        refresh_notice=0,
        compression=compression,
        upstream=Upstream((f"ws://127.0.0.1:{upstream_port}/",)),
    )
    factory = server(gateway)
    seen = seen_events(factory)
    port = serve(factory)

    async def client() -> list[Any]:
        import asyncio

        import websockets

        ws = await websockets.connect(
            f"ws://127.0.0.1:{port}/gw",
            additional_headers={"Authorization": f"Bearer {token(lifetime=30)}"},
            open_timeout=TIMEOUT,
            ping_interval=None,
            compression="deflate" if compression else None,
        )
        received = []
        for _ in range(2):
            await ws.send(f"!send {how}")
            while (message := await asyncio.wait_for(ws.recv(), TIMEOUT)) != "done":
                received.append(message)
        await ws.close()
        return received

    assert await aio(client()) == ['{"type":"chat","text":"hi"}'] * 2
    dropped = [fields for name, fields in seen if name == "upstream.wssec_dropped"]
    assert len(dropped) == 1
    assert dropped[0]["kind"].startswith("wssec.")
    assert dropped[0]["route"] == "/gw"


@pytest_twisted.ensureDeferred
async def test_upstream_wssec_messages_pass_on_a_route_without_refresh(serve: Serve) -> None:
    """Without C{refresh}, the gateway sends no such message: it relays them as any."""
    port = gateway_port(serve, NoticeUpstream, refresh=False)

    async def client() -> list[bytes]:
        raw = await wsframes.connect(port, "/gw", f"Authorization: Bearer {token(lifetime=30)}")
        await raw.send(frame(TEXT, b"!send expiring"))
        received = [(await wsframes.read_message(raw.reader, TIMEOUT)).payload for _ in range(3)]
        raw.close()
        return received

    assert await aio(client()) == [EXPIRING, b'{"type":"chat","text":"hi"}', b"done"]
