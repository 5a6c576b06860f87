"""
A server (or a gateway's upstream) that sends an endless handshake response
head: the secure client stops at C{max_header_bytes} and fails with
L{ResponseHeadTooLarge}; the gateway answers its client 502 and emits
C{upstream.failed} with kind C{bad_response}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from conftest import aio
from test_gateway import KEY, RawFactory, eventually, gateway, raw_servers, refused, ws_url

from txwssec.client import ResponseHeadTooLarge, SecureClientFactory

Serve = Callable[[Any], int]

__all__ = ["raw_servers"]  # the fixture

#: A 101 whose header never ends: 64 KiB of one header line, no CRLFCRLF.
ENDLESS = b"HTTP/1.1 101 Switching Protocols\r\nX-Endless: " + b"a" * 65536


@pytest_twisted.ensureDeferred
async def test_client_fails_on_a_response_head_over_max_header_bytes(
    serve: Serve, raw_servers: Any
) -> None:
    server = raw_servers(RawFactory(ENDLESS))
    factory = SecureClientFactory(
        ws_url(serve(server)), max_header_bytes=4096, handshake_timeout=5
    )
    protocol = await factory.connect()
    with pytest.raises(ResponseHeadTooLarge) as caught:
        await protocol.opened
    assert str(caught.value) == "response head over 4096 bytes (max_header_bytes)"


@pytest_twisted.ensureDeferred
async def test_gateway_answers_502_to_an_endless_upstream_response_head(
    serve: Serve, raw_servers: Any
) -> None:
    upstream = raw_servers(RawFactory(ENDLESS))
    url = ws_url(serve(upstream))
    factory = gateway(url, timeout=5)
    failed: list[dict[str, Any]] = []
    factory.events.add(
        lambda name, fields: failed.append(dict(fields)) if name == "upstream.failed" else None
    )
    port = serve(factory)
    assert await aio(refused(port, {"apikey": KEY})) == (502, b"bad gateway\n")
    assert failed == [
        {
            "url": url,
            "kind": "bad_response",
            "reason": f"{url}echo: response head over 16384 bytes (max_header_bytes)",
            "route": "/echo",
        }
    ]
    assert factory.counters["handshake.refused.502"] == 1
    (connection,) = upstream.connections
    await eventually(
        lambda: not getattr(connection.transport, "connected", True), "the upstream to be closed"
    )
