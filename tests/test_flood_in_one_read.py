"""
A session that writes a lot while it handles one read (an application
answering one message with 12.5 MiB, all in onMessage) to a peer that does
not read: the route's max_buffered_bytes still closes it with 1013 and
drops the rest, on plain TCP and over TLS. (The writes made while a read is
handled are held and sent at its end, txwssec.server.flow's cork and
txwssec._tlswire's: held bytes pile up for the peer as much as buffered
ones.)
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytest_twisted
import test_tls_wire
from conftest import aio, upgrade_request
from wsframes import TEXT, frame

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec._tlswire import ServerTLSFactory
from txwssec.policy import RouteLimits
from txwssec.server import SecureServerProtocol

TIMEOUT = 10.0
CHUNK = b"\x00" * 64 * 1024
FLOOD_MESSAGES = 200  # 12.5 MiB
LIMIT = 256 * 1024

folder = test_tls_wire.folder


class FloodAtOnce(SecureServerProtocol):
    """Answers "flood" with FLOOD_MESSAGES binary messages of 64 KiB, in one go."""

    seen: ClassVar[dict[int, dict[str, Any]]] = {}

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        record = self.seen.setdefault(id(self.factory), {"sent": 0})
        record["protocol"] = self
        for _ in range(FLOOD_MESSAGES):
            if self.state != self.STATE_OPEN:
                break
            self.sendMessage(CHUNK, isBinary=True)
            record["sent"] += 1


def _stop_reading(port: int, tls: ssl.SSLContext | None, factory: Any) -> None:
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(TIMEOUT)
    raw.connect(("127.0.0.1", port))
    conn: Any = tls.wrap_socket(raw, server_hostname="localhost") if tls else raw
    with conn:
        conn.sendall(upgrade_request("/flood"))
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(1)
        assert head.startswith(b"HTTP/1.1 101 ")
        conn.sendall(frame(TEXT, b"flood"))
        deadline = time.monotonic() + TIMEOUT
        while factory.sessions and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
@pytest_twisted.ensureDeferred
async def test_flood_in_one_read_is_closed_1013(serve: Any, folder: Path, tls: bool) -> None:
    route = RoutePolicy(
        "/flood",
        [AnonymousAuthenticator()],
        protocol=FloodAtOnce,
        limits=RouteLimits(max_buffered_bytes=LIMIT),
    )
    factory = SecureServerFactory(ServerPolicy.single(route))
    client = None
    if tls:
        port = serve(ServerTLSFactory(test_tls_wire.context(folder), False, factory))
        client = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    else:
        port = serve(factory)
    await aio(asyncio.to_thread(_stop_reading, port, client, factory))
    record = FloodAtOnce.seen.pop(id(factory))
    protocol = record["protocol"]
    assert factory.counters["limit.max_buffered_bytes"] == 1
    assert (protocol.localCloseCode, protocol.localCloseReason) == (1013, b"slow consumer")
    assert record["sent"] < FLOOD_MESSAGES  # the flood stopped at the close
