"""
How connections end: every close the server starts (3000 expiry, 3003
revocation, 3008 idle, 1008 rate, 1009 size, 1013 slow consumer, 1002 and
1007 protocol errors) and every invalid close frame a client sends end with
the server's close frame and then an orderly TCP close (FIN), never a reset,
on app routes and gateway routes alike (RFC 6455 section 7.1.1: the server
closes the TCP connection once it has sent and received a close frame).

Clients are raw sockets (L{wsframes}): after the server's close frame they
send what a browser would (the rest of a message it was sending, then its
close reply) and read to the end: C{b""} is a FIN, a reset raises
C{ConnectionResetError}, the reason a browser reports C{wasClean=false}.
A headless Chromium (skipped where it is not installed) checks that last
point itself, and C{twistd wssec} is checked once. The orderly close stays
bounded: a peer that answers the close but stops reading is reset after the
close timeout.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import wsframes
from conftest import aio
from processes import free_port, twistd
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from txwssec import (
    AnonymousAuthenticator,
    OriginPolicy,
    RoutePolicy,
    SecureServerFactory,
    ServerPolicy,
)
from txwssec.apps.echo import EchoProtocol
from txwssec.policy import RouteLimits
from txwssec.proxy import Upstream
from txwssec.server import SecureServerProtocol

Serve = Callable[[Any], int]

TIMEOUT = 10.0
#: The routes' max_message_size (small: an oversized message is cheap).
LIMIT = 64
MIB = 1024 * 1024


def routes(port_of_upstream: int, **options: Any) -> ServerPolicy:
    """An echo app route at /echo and a gateway route at /gateway."""
    anonymous = [AnonymousAuthenticator()]
    return ServerPolicy(
        (
            RoutePolicy(
                "/echo", anonymous, protocol=EchoProtocol, max_message_size=LIMIT, **options
            ),
            RoutePolicy(
                "/gateway",
                anonymous,
                max_message_size=LIMIT,
                upstream=Upstream((f"ws://127.0.0.1:{port_of_upstream}/echo",)),
                **options,
            ),
        )
    )


def start(serve: Serve, **options: Any) -> tuple[SecureServerFactory, int]:
    """The server under test, with an echo upstream for its gateway route."""
    upstream = SecureServerFactory(
        RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=EchoProtocol)
    )
    factory = SecureServerFactory(routes(serve(upstream), **options))
    return factory, serve(factory)


def the_session(factory: SecureServerFactory) -> SecureServerProtocol:
    """The one open session."""
    (protocol,) = factory.sessions["anonymous"]
    return protocol


async def ends_cleanly(
    client: wsframes.RawClient, code: int, *before_reply: bytes, reply: bool = True
) -> None:
    """
    Read the server's close frame (asserting C{code}), send C{before_reply}
    and the close reply as a browser would, and assert an orderly FIN.
    """
    try:
        _, close = await wsframes.read_until_close(client.reader, TIMEOUT)
        assert close.close_code == code, close
        for data in before_reply:
            await client.send(data)
        if reply:
            await client.send(wsframes.close_frame(code))
        # b"" is a FIN; a reset raises ConnectionResetError here.
        assert await asyncio.wait_for(client.reader.read(), TIMEOUT) == b""
    finally:
        client.close()


async def opened(port: int, path: str) -> wsframes.RawClient:
    """A raw connection whose session echoes (the gateway's upstream is open)."""
    client = await wsframes.connect(port, path)
    await client.send(wsframes.frame(wsframes.TEXT, b"ready"))
    echoed = await wsframes.read_message(client.reader, TIMEOUT)
    assert echoed.payload == b"ready", echoed
    return client


PATHS = pytest.mark.parametrize("path", ["/echo", "/gateway"])


async def wait(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.01)


def run(coroutine: Awaitable[Any]) -> Any:
    return aio(coroutine)


# -- A. closes the server starts -----------------------------------------------


@PATHS
@pytest_twisted.ensureDeferred
async def test_expiry_3000_ends_with_fin(serve: Serve, path: str) -> None:
    factory, port = start(serve)
    client = await run(opened(port, path))
    the_session(factory)._credentialsExpired()
    await run(ends_cleanly(client, 3000))


@PATHS
@pytest_twisted.ensureDeferred
async def test_revocation_3003_ends_with_fin(serve: Serve, path: str) -> None:
    factory, port = start(serve)
    client = await run(opened(port, path))
    assert factory.revoke("anonymous") == 1
    await run(ends_cleanly(client, 3003))


@PATHS
@pytest_twisted.ensureDeferred
async def test_idle_3008_ends_with_fin(serve: Serve, path: str) -> None:
    _, port = start(serve, idle_timeout=0.05)
    client = await run(wsframes.connect(port, path))
    await run(ends_cleanly(client, 3008))


@PATHS
@pytest_twisted.ensureDeferred
async def test_message_rate_1008_ends_with_fin(serve: Serve, path: str) -> None:
    _, port = start(serve, limits=RouteLimits(messages_per_second=0.001, burst=1))
    client = await run(wsframes.connect(port, path))
    flood = wsframes.frame(wsframes.TEXT, b"one") + wsframes.frame(wsframes.TEXT, b"two")
    await run(client.send(flood))
    await run(ends_cleanly(client, 1008))


@PATHS
@pytest_twisted.ensureDeferred
async def test_message_too_big_1009_ends_with_fin_after_the_rest(serve: Serve, path: str) -> None:
    """
    The server closes 1009 on the oversized frame's header; the client
    finishes sending that frame (as a browser does) and then replies.
    """
    _, port = start(serve)
    client = await run(opened(port, path))
    mask = b"\x01\x02\x03\x04"
    payload = wsframes.apply_mask(b"x" * 10 * LIMIT, mask)
    head = wsframes.frame_header(wsframes.BINARY, 10 * LIMIT, mask=mask)
    await run(client.send(head + payload[:LIMIT]))
    await run(ends_cleanly(client, 1009, payload[LIMIT:]))


@PATHS
@pytest_twisted.ensureDeferred
async def test_slow_consumer_1013_ends_with_fin(serve: Serve, path: str) -> None:
    factory, port = start(serve)
    client = await run(opened(port, path))
    # What sendData does when the peer's unread bytes pass max_buffered_bytes.
    the_session(factory)._slowConsumer()
    await run(ends_cleanly(client, 1013))


@PATHS
@pytest_twisted.ensureDeferred
async def test_protocol_error_1002_ends_with_fin(serve: Serve, path: str) -> None:
    _, port = start(serve)
    client = await run(opened(port, path))
    await run(client.send(b"\x81\x02hi"))  # an unmasked client frame
    await run(ends_cleanly(client, 1002))


@PATHS
@pytest_twisted.ensureDeferred
async def test_invalid_utf8_1007_ends_with_fin(serve: Serve, path: str) -> None:
    _, port = start(serve)
    client = await run(opened(port, path))
    await run(client.send(wsframes.frame(wsframes.TEXT, b"\xff\xfe")))
    await run(ends_cleanly(client, 1007))


@PATHS
@pytest_twisted.ensureDeferred
async def test_client_close_is_answered_and_ends_with_fin(serve: Serve, path: str) -> None:
    """The peer-initiated close, for comparison: 1000 back, then a FIN."""
    _, port = start(serve)
    client = await run(opened(port, path))
    await run(client.send(wsframes.close_frame(1000)))
    await run(ends_cleanly(client, 1000, reply=False))


@pytest_twisted.ensureDeferred
async def test_peer_that_answers_but_stops_reading_is_reset_after_the_close_timeout(
    serve: Serve,
) -> None:
    """
    The orderly close waits for the peer to read what was written before
    the close frame; a peer that sends its close reply without reading
    cannot hold the connection open: it is reset after the close timeout.
    """
    route = RoutePolicy(
        "/echo",
        [AnonymousAuthenticator()],
        protocol=EchoProtocol,
        max_message_size=MIB,
        limits=RouteLimits(max_buffered_bytes=0),
    )
    factory = SecureServerFactory(ServerPolicy((route,), close_timeout=0.2))
    port = serve(factory)

    async def stop_reading() -> None:
        client = await wsframes.connect(port, "/echo", rcvbuf=4096)
        try:
            for _ in range(16):  # 16 MiB echoed into buffers nobody reads
                await client.send(wsframes.frame(wsframes.BINARY, bytes(MIB)))
            await wait(lambda: the_session(factory).trafficStats.incomingWebSocketMessages == 16)
            assert factory.revoke("anonymous") == 1
            # The reply, without reading the server's close frame.
            await client.send(wsframes.close_frame(3003))
            await wait(lambda: factory.connections.total == 0)
        finally:
            client.close()

    await aio(stop_reading())
    assert factory.counters["limit.close_linger"] == 1


# -- B. invalid close frames -----------------------------------------------------


def close_payload(code: int) -> bytes:
    return struct.pack("!H", code)


INVALID_CLOSES = pytest.mark.parametrize(
    ("payload", "code"),
    [
        (close_payload(1005), 1002),
        (close_payload(999), 1002),
        (close_payload(1004), 1002),
        (close_payload(1006), 1002),
        (close_payload(1015), 1002),
        (close_payload(5000), 1002),
        (b"\x03", 1002),  # a 1-byte body
        (close_payload(1000) + b"\xff\xfe", 1007),  # a reason that is not UTF-8
    ],
    ids=["1005", "999", "1004", "1006", "1015", "5000", "one-byte", "non-utf8-reason"],
)


@PATHS
@INVALID_CLOSES
@pytest_twisted.ensureDeferred
async def test_invalid_close_frame_is_answered_then_fin(
    serve: Serve, path: str, payload: bytes, code: int
) -> None:
    factory, port = start(serve)
    client = await run(opened(port, path))
    await run(client.send(wsframes.frame(wsframes.CLOSE, payload)))
    await run(ends_cleanly(client, code, reply=False))
    await run(wait(lambda: not factory.sessions))
    # The server still serves.
    (await run(opened(port, path))).close()


# -- a real browser ---------------------------------------------------------------------


def chromium(folder: Path) -> Any:
    """The browser suite's headless Chromium (see tests/browser), or skip."""
    from browser import harness

    reason = harness.missing()
    if reason is not None:
        pytest.skip(reason)
    return harness.chromium(harness.trusting_home(folder / "home", None), folder / "profile")


class ExpiresOnMessage(SecureServerProtocol):
    """Its credentials expire when the client says so."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self._credentialsExpired()


class Page(Resource):
    """An empty page, for an http://127.0.0.1 origin."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/html")
        return b"<!doctype html><title>closes</title>"


@pytest_twisted.ensureDeferred
async def test_browser_sees_clean_closes(serve: Serve, tmp_path: Path) -> None:
    """
    Chromium reports C{wasClean: true} with the server's code for a 3000
    expiry, a 1009 and a 3008 idle timeout (it reported C{false} when the
    server reset the connection after the close handshake). The page comes
    from 127.0.0.1, as browsers refuse a loopback WebSocket from elsewhere.
    """
    anyone = OriginPolicy.from_list(["*"])
    anonymous = [AnonymousAuthenticator()]
    policy = ServerPolicy(
        (
            RoutePolicy("/expire", anonymous, protocol=ExpiresOnMessage, origins=anyone),
            RoutePolicy("/small", anonymous, max_message_size=16, origins=anyone),
            RoutePolicy("/idle", anonymous, idle_timeout=0.2, origins=anyone),
        )
    )
    port = serve(SecureServerFactory(policy))
    page = serve(Site(Page()))
    scripts = {"/expire": "ws.send('expire')", "/small": "ws.send('x'.repeat(1000))", "/idle": ""}

    def browse() -> dict[str, Any]:
        driver = chromium(tmp_path)
        try:
            driver.set_script_timeout(TIMEOUT)
            driver.get(f"http://127.0.0.1:{page}/")
            return {
                path: driver.execute_async_script(
                    "const done = arguments[arguments.length - 1];"
                    f"const ws = new WebSocket('ws://127.0.0.1:{port}{path}');"
                    f"ws.onopen = () => {{ {script} }};"
                    "ws.onclose = (e) => done([e.code, e.wasClean]);"
                )
                for path, script in scripts.items()
            }
        finally:
            driver.quit()

    seen = await deferToThread(browse)
    assert seen == {"/expire": [3000, True], "/small": [1009, True], "/idle": [3008, True]}


# -- through twistd wssec ------------------------------------------------------------

CONFIG = """
[server]
listen = ["tcp:{port}:interface=127.0.0.1"]

[[route]]
path = "/echo"
app = "echo"
auth = ["anonymous"]
max_message_size = 64
"""


@pytest_twisted.ensureDeferred
async def test_twistd_closes_1009_with_fin(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "wssec.toml"
    config.write_text(CONFIG.format(port=port))
    running = twistd(config, tmp_path)
    try:
        running.wait_for("wssec listening on")

        async def oversized() -> None:
            client = await wsframes.connect(port, "/echo")
            payload = b"x" * 1000
            await client.send(wsframes.frame(wsframes.BINARY, payload))
            await ends_cleanly(client, 1009)

        await aio(oversized())
    finally:
        assert running.stop() == 0
