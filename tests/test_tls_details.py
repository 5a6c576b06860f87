"""
The transport details of a wss connection (Autobahn's C{TransportDetails}:
the peer, the TLS channel binding, the peer certificate) are Autobahn's: at
open, and after the connection is gone (issue 19, round 5, bench/RESULTS.md
"Round 5: wss handshake"; making them first at open was reverted: on a
refused handshake they would be made after the TLS connection is gone).
The TLS transport answers what a wss connection asks of it without
C{ProtocolWrapper.__getattr__} misses.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import test_tls_wire
from autobahn.twisted.util import create_transport_details, peer2str
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.wamp.types import TransportDetails
from conftest import aio, upgrade_request
from wsframes import close_frame

import txwssec._hooks
import txwssec._wire
from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec._tlswire import ServerTLSFactory
from txwssec.apps.echo import EchoProtocol

TIMEOUT = 10.0

folder = test_tls_wire.folder


class Seen(EchoProtocol):
    """Notes its transport details at open and once the connection is gone."""

    seen: list[dict[str, Any]]

    def onOpen(self) -> None:
        made = create_transport_details(self.transport, True)
        made.channel_framing = TransportDetails.CHANNEL_FRAMING_WEBSOCKET
        self.seen.append(
            {
                "peer": self.peer,
                "peer2str": peer2str(self.transport),
                "at open": self.transport_details.marshal(),
                "made at open": made.marshal(),
            }
        )
        super().onOpen()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        from twisted.internet import reactor

        record = self.seen[-1]
        # after connectionLost: Twisted has let the TLS connection go
        reactor.callLater(0, lambda: record.update(after=self.transport_details.marshal()))


def read_to_end(tls: ssl.SSLSocket) -> bytes:
    """What C{tls} receives until the server's close (or an error ends it)."""
    received = b""
    while True:
        try:
            chunk = tls.recv(65536)
        except (ssl.SSLError, OSError):
            return received
        if not chunk:
            return received
        received += chunk


def _client(port: int, folder: Path, cert: str | None) -> bytes:
    context = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    if cert is not None:
        context.load_cert_chain(folder / f"{cert}.pem", folder / f"{cert}.key")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(upgrade_request("/echo"))
            head = b""
            while b"\r\n\r\n" not in head:
                head += tls.recv(1)
            tls.sendall(close_frame(1000))
            rest = read_to_end(tls)
            return head.split(b"\r\n", 1)[0] + b"|" + rest[:4]


async def _connect(serve: Any, folder: Path, protocol: type, cert: str | None) -> bytes:
    factory = SecureServerFactory(
        ServerPolicy.single(RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=protocol))
    )
    tls = test_tls_wire.context(folder, client_ca=folder / "client-ca.pem", client_cert="optional")
    port = serve(ServerTLSFactory(tls, False, factory))
    answer: bytes = await aio(asyncio.to_thread(_client, port, folder, cert))

    async def gone() -> None:
        async with asyncio.timeout(TIMEOUT):
            while factory.sessions or (protocol is Seen and "after" not in Seen.seen[-1]):
                await asyncio.sleep(0.01)

    await aio(gone())
    return answer


@pytest.fixture
def autobahns(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Autobahn's connectionMade: details made there, TLS noted again at open."""

    def use() -> None:
        monkeypatch.setattr(
            txwssec._wire.FrameReader, "connectionMade", WebSocketServerProtocol.connectionMade
        )

    return use


@pytest.mark.parametrize("cert", ["alice", None], ids=["client certificate", "none"])
@pytest_twisted.ensureDeferred
async def test_details_as_autobahns(serve: Any, folder: Path, autobahns: Any, cert: str) -> None:
    Seen.seen = []
    ours = await _connect(serve, folder, Seen, cert)
    autobahns()
    theirs = await _connect(serve, folder, Seen, cert)
    assert ours == theirs == b"HTTP/1.1 101 Switching Protocols|\x88\x02\x03\xe8"
    assert len(Seen.seen) == 2
    for seen in Seen.seen:
        assert seen["peer"] == seen["peer2str"] == seen["at open"]["peer"]
        assert seen["at open"] == seen["made at open"] == seen["after"]
        assert seen["at open"]["is_secure"] is True
        assert seen["at open"]["channel_type"] == "tls"
        assert seen["at open"]["channel_id"]["tls-unique"] != b"\x00" * 32
        assert (seen["at open"]["peer_cert"] is not None) is (cert is not None)
    mine, autobahn = Seen.seen
    for name in ("at open", "after"):
        # (another port, another handshake)
        assert {**mine[name], "peer": "", "channel_id": {}} == {
            **autobahn[name],
            "peer": "",
            "channel_id": {},
        }
    assert mine["at open"]["peer_cert"] == autobahn["at open"]["peer_cert"]


@pytest_twisted.ensureDeferred
async def test_tls_transport_attributes_found_without_a_miss(
    serve: Any, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    What a wss connection asks of its TLS transport that Twisted's TLS
    protocol does not have itself (C{setTcpNoDelay}, C{resumeProducing},
    zope.interface's C{__conform__} at the client's FIN, L{read_ahead}'s
    C{doRead}) is found without ProtocolWrapper's C{__getattr__} (an
    AttributeError and a Python call each time).
    """
    from twisted.protocols import policies

    missed: list[str] = []
    original = policies.ProtocolWrapper.__getattr__

    def recorded(self: Any, name: str) -> Any:
        missed.append(name)
        return original(self, name)

    monkeypatch.setattr(policies.ProtocolWrapper, "__getattr__", recorded)
    answer = await _connect(serve, folder, EchoProtocol, None)
    assert answer == b"HTTP/1.1 101 Switching Protocols|\x88\x02\x03\xe8"
    assert missed == []


def test_tls_transport_forwards_to_tcp(folder: Path) -> None:
    """The forwarded calls reach the TCP transport, as Twisted's __getattr__ did."""
    from unittest import mock

    from twisted.internet.interfaces import IHalfCloseableProtocol

    tcp = mock.Mock(spec=["setTcpNoDelay", "pauseProducing", "resumeProducing"])
    factory = ServerTLSFactory(test_tls_wire.context(folder), False, mock.Mock())
    protocol = factory.protocol(factory, mock.Mock(), False)
    protocol.transport = tcp
    protocol.setTcpNoDelay(True)
    protocol.pauseProducing()
    protocol.resumeProducing()
    assert tcp.mock_calls == [
        mock.call.setTcpNoDelay(True),
        mock.call.pauseProducing(),
        mock.call.resumeProducing(),
    ]
    assert protocol.__conform__ is None
    assert IHalfCloseableProtocol(protocol, None) is None
