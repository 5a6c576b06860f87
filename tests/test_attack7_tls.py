"""
Attacks on the wss transport details (attack7, against branch perf5-tls's
"made once, at open"): a wss connection that never opens (its handshake
refused) and whose transport details an application reads once the
connection is gone (Twisted has let the TLS connection go by then).

Passes on main 38ceb18 (details made at connectionMade); fails with
perf5-tls 128a20a (run from outside the worktree with
PYTHONPATH=/work/wt-perf5-tls): Autobahn's transport_channel_id asserts on
the TLS connection Twisted set to None in connectionLost.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest_twisted
import test_tls_wire
from conftest import aio, upgrade_request
from test_tls_details import read_to_end

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec._tlswire import ServerTLSFactory

TIMEOUT = 10.0

folder = test_tls_wire.folder


def _refused(port: int, folder: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(upgrade_request("/nowhere"))
            return read_to_end(tls).split(b"\r\n", 1)[0]


@pytest_twisted.ensureDeferred
async def test_details_of_a_refused_wss_handshake_read_after_the_loss(
    serve: Any, folder: Path
) -> None:
    """
    The handshake refused (404: no such route), the application reads
    its transport details after the connection is gone: Autobahn's (made
    at connectionMade), no AttributeError from a TLS connection let go.
    """
    factory = SecureServerFactory(
        ServerPolicy.single(RoutePolicy("/echo", [AnonymousAuthenticator()]))
    )
    built: list[Any] = []
    build = factory.buildProtocol

    def recorded(address: Any) -> Any:
        protocol = build(address)
        built.append(protocol)
        return protocol

    factory.buildProtocol = recorded  # type: ignore[method-assign]
    port = serve(ServerTLSFactory(test_tls_wire.context(folder), False, factory))
    status = await aio(asyncio.to_thread(_refused, port, folder))
    assert status.startswith(b"HTTP/1.1 404")
    [protocol] = built

    async def gone() -> None:
        async with asyncio.timeout(TIMEOUT):
            while protocol.transport.connected or protocol.transport._tlsConnection is not None:
                await asyncio.sleep(0.01)

    await aio(gone())
    details = protocol.transport_details.marshal()
    assert details["is_secure"] is True
    assert details["channel_type"] == "tls"
