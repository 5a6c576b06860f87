"""
Shared test fixtures: servers on 127.0.0.1 with the asyncio reactor, so that
Twisted servers and asyncio clients (websockets) share one event loop.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from txwssec.devcert import write_dev_certificates

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent

# A shell without job control starts a background job (`pytest ... &`) with
# SIGINT ignored, and every process it starts inherits that: twistd would
# then ignore the SIGINT of tests/test_lifecycle.py's graceful stop. The
# servers the tests start get SIGINT as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def example_dev_certificates() -> None:
    """
    examples/quickstart.toml serves wss:// with certificates made by the
    README's set-up command (python -m txwssec make-dev-cert
    examples/dev-certs); make them when a checkout has none yet.
    """
    folder = REPO / "examples" / "dev-certs"
    if not (folder / "server.pem").exists():
        write_dev_certificates(folder)


def aio(awaitable: Awaitable[T]) -> Deferred[T]:
    """Await an asyncio coroutine from a Twisted test."""
    return Deferred.fromFuture(asyncio.ensure_future(awaitable))


@pytest.fixture
def serve() -> Iterator[Callable[[Any], int]]:
    """
    Start a factory on an ephemeral 127.0.0.1 port; returns the port. Every
    port and every connection it accepted is closed after the test.
    """
    from twisted.internet import reactor

    ports = []
    factories = []

    def start(factory: Any) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        factories.append(factory)
        return int(port.getHost().port)

    yield start
    for port in ports:
        pytest_twisted.blockon(Deferred.fromCoroutine(_stop(port)))


async def _stop(port: Any) -> None:
    await port.stopListening()


class CapturedLog:
    """Every log event emitted during a test, with its formatted text."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def text(self) -> str:
        """All events formatted, plus the repr of every field value."""
        lines = []
        for event in self.events:
            lines.append(formatEvent(event) or "")
            lines.append(repr({k: v for k, v in event.items() if not k.startswith("log_")}))
        return "\n".join(lines)

    def matching(self, **fields: Any) -> list[LogEvent]:
        """Events whose fields equal C{fields}."""
        return [e for e in self.events if all(e.get(k) == v for k, v in fields.items())]


@pytest.fixture
def captured_log() -> Iterator[CapturedLog]:
    """Capture the global Twisted log for the test."""
    log = CapturedLog()
    globalLogPublisher.addObserver(log)
    yield log
    globalLogPublisher.removeObserver(log)


async def raw_exchange(port: int, request: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes, return everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()


def upgrade_request(path: str = "/echo", *extra_headers: str, host: str = "127.0.0.1") -> bytes:
    """A valid WebSocket upgrade request with C{extra_headers} lines added."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *extra_headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
