"""
The plain TCP transport of a WebSocket connection keeps its attributes in
CPython 3.11's inline values (issue 19, round 7, bench/RESULTS.md "Round 7:
instance dicts"): neither the lean accept (txwssec._tcpport.server_transport)
nor the read ahead and the close at the end of a read (txwssec._wire) read
its C{__dict__}, which would make a dict where every later attribute lookup
of the transport's read and write paths is slower.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import aio
from inline_values import OBSERVABLE, dict_materialised
from test_upgrade_reader import BYE, request
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from wsframes import TEXT, frame

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec._tcpport import LeanPort
from txwssec.apps.echo import EchoProtocol
from txwssec.listen import server_endpoint

pytestmark = pytest.mark.skipif(not OBSERVABLE, reason="CPython 3.11/3.12 inline values only")

#: Whether each connection's transport had a dict: at open, at each message.
SEEN: list[tuple[str, bool]] = []
LOST: list[Deferred[Any]] = []


class Watched(EchoProtocol):
    def onOpen(self) -> None:
        SEEN.append(("open", dict_materialised(self.transport, "client")))
        super().onOpen()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        SEEN.append(("message", dict_materialised(self.transport, "client")))
        super().onMessage(payload, isBinary)

    def connectionLost(self, reason: Any) -> None:
        transport = self.transport
        super().connectionLost(reason)
        SEEN.append(("lost", dict_materialised(transport, "client")))
        own = getattr(transport.doRead, "__func__", None) is type(transport).doRead
        SEEN.append(("read ahead gone", own))
        LOST.pop().callback(None)


async def _exchange(port: int) -> bytes:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    # the request, a message, and the close in one read: the close is done
    # at the end of that read (lose_connection's flags on the transport)
    await loop.sock_sendall(sock, request() + frame(TEXT, b"hello") + BYE)
    received = b""
    while True:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
        if not chunk:
            break
        received += chunk
    sock.close()
    return received


#: Set in the fresh interpreter that runs the test below.
FRESH = "TXWSSEC_INLINE_VALUES_FRESH_PROCESS"


def test_in_a_fresh_process() -> None:
    """
    L{test_websocket_transport_keeps_inline_values}, in an interpreter of
    its own: CPython shares one table of attribute names among a class's
    instances and stops keeping values inline once it is full, so the
    transports of other tests run before it in this process (attributes of
    their own) could make every transport here dict-backed, whatever
    txwssec does.
    """
    if os.environ.get(FRESH):
        pytest.skip("already in the fresh process")
    test = f"{__file__}::test_websocket_transport_keeps_inline_values"
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        env={**os.environ, FRESH: "1"},
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "1 passed" in ran.stdout


@pytest_twisted.ensureDeferred
async def test_websocket_transport_keeps_inline_values() -> None:
    if not os.environ.get(FRESH):
        pytest.skip("run in a fresh process by test_in_a_fresh_process")
    made = SecureServerFactory(
        ServerPolicy(routes=(RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=Watched),))
    )
    endpoint = server_endpoint(reactor, "tcp:0:interface=127.0.0.1", None)
    port = await endpoint.listen(made)
    assert type(port) is LeanPort
    try:
        SEEN.clear()
        lost: Deferred[Any] = Deferred()
        LOST.append(lost)
        received = await aio(_exchange(port.getHost().port))
        await lost
    finally:
        await port.stopListening()
    assert received.startswith(b"HTTP/1.1 101 ")
    assert b"hello" in received
    assert SEEN == [
        ("open", False),
        ("message", False),
        ("lost", False),
        ("read ahead gone", True),
    ]
