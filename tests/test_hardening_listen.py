"""
Listeners made from C{[server] listen} get a backlog of DEFAULT_BACKLOG
pending connections (Twisted's default is 50) unless the description sets
C{backlog=} itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory, Protocol

from txwssec.devcert import write_dev_certificates
from txwssec.listen import DEFAULT_BACKLOG, server_endpoint
from txwssec.tls import ReloadingContextFactory, TLSSettings


def tls_context(folder: Path) -> ReloadingContextFactory:
    write_dev_certificates(folder)
    return ReloadingContextFactory(TLSSettings(folder / "server.pem", folder / "server.key"))


async def backlog_of(description: str, tls: ReloadingContextFactory | None = None) -> int:
    """Listen on C{description} as txwssec would; the port's backlog."""
    from twisted.internet import reactor

    port: Any = await server_endpoint(reactor, description, tls).listen(
        Factory.forProtocol(Protocol)
    )
    try:
        return int(port.backlog)
    finally:
        await port.stopListening()


def test_default_backlog_is_large() -> None:
    assert DEFAULT_BACKLOG == 1024


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:0:interface=127.0.0.1", DEFAULT_BACKLOG),
        ("tcp:0:interface=127.0.0.1:backlog=10", 10),
        ("tcp:port=0:backlog=10:interface=127.0.0.1", 10),
        ("tcp6:0:interface=\\:\\:1", DEFAULT_BACKLOG),
    ],
)
@pytest_twisted.ensureDeferred
async def test_tcp_backlog(description: str, expected: int) -> None:
    assert await backlog_of(description) == expected


@pytest.mark.parametrize(("extra", "expected"), [("", DEFAULT_BACKLOG), (":backlog=10", 10)])
@pytest_twisted.ensureDeferred
async def test_tls_backlog(tmp_path: Path, extra: str, expected: int) -> None:
    context = tls_context(tmp_path)
    assert await backlog_of(f"tls:0:interface=127.0.0.1{extra}", context) == expected


@pytest.mark.parametrize(("extra", "expected"), [("", DEFAULT_BACKLOG), (":backlog=10", 10)])
@pytest_twisted.ensureDeferred
async def test_wss_backlog(tmp_path: Path, extra: str, expected: int) -> None:
    tls_context(tmp_path)
    cert = str(tmp_path / "server.pem").replace(":", "\\:")
    key = str(tmp_path / "server.key").replace(":", "\\:")
    description = f"wss:0:interface=127.0.0.1:cert={cert}:key={key}{extra}"
    assert await backlog_of(description) == expected


@pytest_twisted.ensureDeferred
async def test_unix_backlog(tmp_path: Path) -> None:
    path = str(tmp_path / "wssec.sock")
    assert await backlog_of(f"unix:{path}") == DEFAULT_BACKLOG
    assert await backlog_of(f"unix:{path}:backlog=10") == 10
