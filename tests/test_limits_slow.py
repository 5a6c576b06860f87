"""
Slow and oversized peers (issue 5, "Slow peers"): the opening handshake
timeout, oversized header blocks (431), automatic pings (3008), and a peer
that stops reading (1013, bounded memory). Plus the counters that record them.

Every test runs a real L{SecureServerFactory} on 127.0.0.1 with a real client:
C{websockets} for well-behaved peers, raw non-blocking sockets (driven by the
asyncio loop the reactor runs on) for peers that misbehave on purpose. Waits
are sanity bounds ("the server drops us before SANITY_TIMEOUT") and timing
checks are lower bounds ("not before the timeout"), never speed thresholds.
Counters are checked by exact name through C{factory.counters}, a
C{collections.Counter}.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import pytest_twisted
import websockets
from conftest import aio, raw_exchange, upgrade_request
from wsframes import CLOSE, PING, PONG, TEXT, frame

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec.apps.echo import EchoProtocol
from txwssec.policy import RouteLimits
from txwssec.server import SecureServerProtocol

Serve = Callable[[Any], int]

#: A missing close or answer fails the test after this long instead of hanging.
SANITY_TIMEOUT = 8.0

#: The fixed 431 body of the contract.
BODY_431 = b"request header fields too large\n"


# -- helpers ----------------------------------------------------------------


def echo_route(path: str = "/echo", **options: Any) -> RoutePolicy:
    return RoutePolicy(path, [AnonymousAuthenticator()], protocol=EchoProtocol, **options)


def echo_factory(**server_options: Any) -> SecureServerFactory:
    return SecureServerFactory(ServerPolicy.single(echo_route(), **server_options))


def close_payload(code: int, reason: str) -> bytes:
    return struct.pack("!H", code) + reason.encode()


def vm_rss() -> int:
    """This process's resident set size in bytes (the server runs in it)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class RawClient:
    """
    A non-blocking TCP client on the reactor's asyncio loop: it reads only
    when asked to, so it can play a peer that stops reading.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, port: int, rcvbuf: int | None = None) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect, so that the advertised window stays small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def recv(self, timeout: float = SANITY_TIMEOUT) -> bytes:
        """Some bytes, or b"" once the peer closed (FIN or reset)."""
        try:
            data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), timeout)
        except ConnectionResetError:
            return b""
        self.buffer += data
        return data

    async def read_until_closed(self) -> bytes:
        """Everything until the server closes; fails after SANITY_TIMEOUT."""
        async with asyncio.timeout(SANITY_TIMEOUT):
            while await self.recv():
                pass
        data, self.buffer = self.buffer, b""
        return data

    async def _fill(self, size: int) -> None:
        while len(self.buffer) < size:
            if not await self.recv():
                raise EOFError(f"closed after {self.buffer!r}")

    async def read_head(self) -> bytes:
        """An HTTP response head, up to and including the blank line."""
        while b"\r\n\r\n" not in self.buffer:
            if not await self.recv():
                raise EOFError(f"closed after {self.buffer!r}")
        end = self.buffer.index(b"\r\n\r\n") + 4
        head, self.buffer = self.buffer[:end], self.buffer[end:]
        return head

    async def read_frame(self) -> tuple[int, bytes]:
        """One unmasked server frame: (opcode, payload); asserts FIN."""
        await self._fill(2)
        first, second = self.buffer[0], self.buffer[1]
        assert first & 0x80, "fragmented server frame"
        assert not second & 0x80, "masked server frame"
        length, offset = second & 0x7F, 2
        if length == 126:
            await self._fill(4)
            (length,) = struct.unpack("!H", self.buffer[2:4])
            offset = 4
        elif length == 127:
            await self._fill(10)
            (length,) = struct.unpack("!Q", self.buffer[2:10])
            offset = 10
        await self._fill(offset + length)
        payload = self.buffer[offset : offset + length]
        self.buffer = self.buffer[offset + length :]
        return first & 0x0F, payload

    async def upgrade(self, request: bytes | None = None) -> None:
        """Complete the opening handshake (asserts 101)."""
        await self.send(request if request is not None else upgrade_request("/echo"))
        head = await self.read_head()
        assert head.startswith(b"HTTP/1.1 101 "), head


async def echo_once(port: int, text: str = "still here") -> str | bytes:
    async with websockets.connect(f"ws://127.0.0.1:{port}/echo") as ws:
        await ws.send(text)
        return await ws.recv()


async def raw_echo(client: RawClient, text: bytes = b"hi") -> None:
    """Send a text frame on an open raw connection and expect it back."""
    await client.send(frame(TEXT, text))
    assert await client.read_frame() == (TEXT, text)


def padded_request(block_size: int, path: str = "/echo") -> bytes:
    """
    A valid upgrade request whose header block (everything before the final
    CRLFCRLF) is exactly C{block_size} bytes.
    """
    base = upgrade_request(path, "X-Pad: ")
    pad = block_size - (len(base) - 4)
    assert pad >= 0
    request = upgrade_request(path, "X-Pad: " + "a" * pad)
    assert request.index(b"\r\n\r\n") == block_size
    return request


def with_headers(count: int, path: str = "/echo") -> bytes:
    """A valid upgrade request with exactly C{count} header lines."""
    base_count = upgrade_request(path).count(b"\r\n") - 2
    extra = [f"X-H{i}: v" for i in range(count - base_count)]
    request = upgrade_request(path, *extra)
    assert request.count(b"\r\n") - 2 == count
    return request


def assert_431(response: bytes) -> None:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), head
    assert body == BODY_431
    assert b"Content-Length: 32" in head.split(b"\r\n")


# -- handshake timeout ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_trickled_handshake_is_dropped_at_the_timeout(serve: Serve) -> None:
    """
    A client that sends its upgrade request one byte every 0.2 s (it would
    need ~30 s to finish) is dropped by the server once handshake_timeout
    (1 s) passes, without a 101.
    """
    factory = echo_factory(handshake_timeout=1)
    port = serve(factory)
    request = upgrade_request("/echo")
    assert len(request) * 0.2 > SANITY_TIMEOUT  # it cannot finish in time

    async def trickle() -> tuple[int, bytes]:
        client = await RawClient.connect(port)
        sent = 0
        try:
            async with asyncio.timeout(SANITY_TIMEOUT):
                while True:
                    try:
                        await client.send(request[sent : sent + 1])
                    except (BrokenPipeError, ConnectionResetError):
                        break
                    sent += 1
                    try:
                        # The 0.2 s pause between bytes doubles as the wait
                        # for the server's answer or close.
                        if not await client.recv(timeout=0.2):
                            break
                    except TimeoutError:
                        continue
            return sent, client.buffer
        finally:
            client.close()

    sent, answer = await aio(trickle())
    assert sent < len(request)
    assert not answer.startswith(b"HTTP/1.1 101"), answer
    assert factory.counters["session.opened"] == 0
    # The server still serves well-behaved clients.
    assert await aio(echo_once(port)) == "still here"
    assert factory.counters["session.opened"] == 1
    assert factory.connections.total == 0


@pytest_twisted.ensureDeferred
async def test_silent_client_is_dropped_at_the_timeout(serve: Serve) -> None:
    """
    A client that connects and sends nothing is dropped once
    handshake_timeout (1 s) has passed, and not before: the elapsed time is
    a lower bound (the client's clock starts before the server's timer).
    Autobahn's default timers rounded deadlines down to a whole second, so
    such a client used to be dropped anywhere between 0 and 1 s.
    """
    factory = echo_factory(handshake_timeout=1)
    port = serve(factory)

    async def silent() -> tuple[bytes, float]:
        started = time.monotonic()
        client = await RawClient.connect(port)
        try:
            answer = await client.read_until_closed()
            return answer, time.monotonic() - started
        finally:
            client.close()

    for _ in range(2):
        answer, elapsed = await aio(silent())
        assert not answer.startswith(b"HTTP/1.1 101"), answer
        assert elapsed >= 0.99
    assert await aio(echo_once(port)) == "still here"
    assert factory.counters["session.opened"] == 1
    assert factory.connections.total == 0


# -- oversized header blocks ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_huge_header_value_gives_431(serve: Serve) -> None:
    factory = echo_factory()
    port = serve(factory)
    request = upgrade_request("/echo", "X-Big: " + "a" * 20 * 1024)
    assert_431(await aio(raw_exchange(port, request)))
    assert isinstance(factory.counters, Counter)
    assert factory.counters == Counter({"handshake.refused.431": 1})


@pytest_twisted.ensureDeferred
async def test_too_many_headers_gives_431(serve: Serve) -> None:
    factory = echo_factory()
    port = serve(factory)
    request = with_headers(150)
    assert len(request) < 16384  # refused for the count, not the size
    assert_431(await aio(raw_exchange(port, request)))
    assert factory.counters == Counter({"handshake.refused.431": 1})


@pytest.mark.parametrize(
    ("options", "max_bytes", "max_headers"),
    [({}, 16384, 100), ({"max_header_bytes": 2048, "max_headers": 12}, 2048, 12)],
    ids=["defaults", "custom"],
)
@pytest_twisted.ensureDeferred
async def test_header_limits_are_exact(
    serve: Serve, options: dict[str, int], max_bytes: int, max_headers: int
) -> None:
    """
    A header block of exactly max_header_bytes, and exactly max_headers
    header lines, are served; one byte or one line more gives 431.
    """
    factory = echo_factory(**options)
    port = serve(factory)

    async def upgrade_and_echo(request: bytes) -> None:
        client = await RawClient.connect(port)
        try:
            await client.upgrade(request)
            await raw_echo(client)
        finally:
            client.close()

    await aio(upgrade_and_echo(padded_request(max_bytes)))
    await aio(upgrade_and_echo(with_headers(max_headers)))
    assert_431(await aio(raw_exchange(port, padded_request(max_bytes + 1))))
    assert_431(await aio(raw_exchange(port, with_headers(max_headers + 1))))
    assert factory.counters == Counter({"handshake.refused.431": 2, "session.opened": 2})


@pytest_twisted.ensureDeferred
async def test_block_at_the_limit_split_before_its_blank_line(serve: Serve) -> None:
    """
    A header block of exactly the limit is served even when its final CRLF
    arrives separately: the buffered bytes then exceed the limit by the
    first half of the terminator, but the block itself does not.
    """
    factory = echo_factory()
    port = serve(factory)
    request = padded_request(16384)

    async def split() -> None:
        client = await RawClient.connect(port)
        try:
            await client.send(request[:-2])
            # Let the server read the first part on its own.
            with pytest.raises(TimeoutError):
                await client.recv(timeout=0.3)
            await client.upgrade(request[-2:])
            await raw_echo(client)
        finally:
            client.close()

    await aio(split())
    assert factory.counters["handshake.refused.431"] == 0


@pytest_twisted.ensureDeferred
async def test_trickled_oversized_header_refused_when_buffer_passes_limit(
    serve: Serve,
) -> None:
    """
    A header that trickles in and never ends is refused with 431 as soon as
    the buffered bytes pass the limit, not at the handshake timeout (30 s
    here, far beyond the test's sanity bound).
    """
    factory = echo_factory(handshake_timeout=30)
    port = serve(factory)
    start = b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    limit = 16384

    async def trickle() -> bytes:
        client = await RawClient.connect(port)
        try:
            sent = 0
            chunk = start
            while sent < limit:
                chunk = chunk[: limit - sent]
                await client.send(chunk)
                sent += len(chunk)
                chunk = b"a" * 1024
                await asyncio.sleep(0.01)
            # Exactly at the limit, not yet over it: no answer.
            with pytest.raises(TimeoutError):
                await client.recv(timeout=0.3)
            # One byte more, and the 431 comes at once (30 s timeout).
            await client.send(b"a")
            response = await client.read_until_closed()
            return response
        finally:
            client.close()

    assert_431(await aio(trickle()))
    assert factory.counters["handshake.refused.431"] == 1
    assert await aio(echo_once(port)) == "still here"


# -- automatic pings ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_peer_that_never_pongs_is_closed_3008(serve: Serve) -> None:
    """
    A raw client that completes the handshake but never answers pings gets
    a ping, then a close frame 3008 "ping timeout", then the connection
    ends (the close timeout aborts it: the client does not answer the close
    either).
    """
    factory = echo_factory(ping_interval=0.5, ping_timeout=0.5)
    port = serve(factory)

    async def deaf() -> list[tuple[int, bytes]]:
        client = await RawClient.connect(port)
        try:
            await client.upgrade()
            frames = [await client.read_frame(), await client.read_frame()]
            assert await client.read_until_closed() == b""
            return frames
        finally:
            client.close()

    (ping_op, ping_payload), close = await aio(deaf())
    assert ping_op == PING
    assert len(ping_payload) >= 12  # Autobahn's timestamp + sequence number
    assert close == (CLOSE, close_payload(3008, "ping timeout"))
    assert factory.counters == Counter({"session.opened": 1, "limit.ping_timeout": 1})
    assert factory.sessions == {}
    assert factory.connections.total == 0


@pytest_twisted.ensureDeferred
async def test_late_pong_does_not_count_a_second_timeout(serve: Serve) -> None:
    """
    A pong that arrives after the ping timeout (once the 3008 close is on
    its way) neither re-arms auto-ping nor leads to a second timeout: the
    timeout is counted once, and the close timeout (3 s here, long enough
    for another ping round of 1 s) ends the connection.
    """
    factory = echo_factory(ping_interval=0.5, ping_timeout=0.5, close_timeout=3)
    port = serve(factory)

    async def late() -> list[tuple[int, bytes]]:
        client = await RawClient.connect(port)
        try:
            await client.upgrade()
            ping_op, ping_payload = await client.read_frame()
            assert ping_op == PING
            close = await client.read_frame()
            await client.send(frame(PONG, ping_payload))
            after: list[tuple[int, bytes]] = []
            with contextlib.suppress(EOFError):
                while True:
                    after.append(await client.read_frame())
            return [close, *after]
        finally:
            client.close()

    close, *after = await aio(late())
    assert close == (CLOSE, close_payload(3008, "ping timeout"))
    assert after == []
    assert factory.counters["limit.ping_timeout"] == 1
    assert factory.connections.total == 0


@pytest_twisted.ensureDeferred
async def test_peer_that_pongs_stays_connected(serve: Serve) -> None:
    """websockets answers pings by itself: 2 s (4 ping rounds) later it still echoes."""
    factory = echo_factory(ping_interval=0.5, ping_timeout=0.5)
    port = serve(factory)

    async def patient() -> str | bytes:
        async with websockets.connect(f"ws://127.0.0.1:{port}/echo") as ws:
            await asyncio.sleep(2)
            await ws.send("alive")
            return await ws.recv()

    assert await aio(patient()) == "alive"
    assert factory.counters["limit.ping_timeout"] == 0


# -- a peer that stops reading --------------------------------------------------

CHUNK = b"\x00" * 64 * 1024
FLOOD_MESSAGES = 200  # 12.5 MiB in all


class FloodProtocol(SecureServerProtocol):
    """
    Echoes, except that "flood" starts sending FLOOD_MESSAGES binary
    messages of 64 KiB, one per reactor turn, while the session is open.
    Records what happened in C{events}, keyed per test by the factory.
    """

    events: ClassVar[dict[int, dict[str, Any]]] = {}

    def record(self) -> dict[str, Any]:
        return self.events.setdefault(id(self.factory), {"sent": 0, "closes": []})

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if payload != b"flood":
            self.sendMessage(payload, isBinary)
            return
        record = self.record()
        record["protocol"] = self
        record["rss_before"] = record["rss_peak"] = vm_rss()
        self._flood(FLOOD_MESSAGES)

    def _flood(self, remaining: int) -> None:
        if remaining == 0 or self.state != self.STATE_OPEN:
            return
        self.sendMessage(CHUNK, isBinary=True)
        record = self.record()
        record["sent"] += 1
        record["rss_peak"] = max(record["rss_peak"], vm_rss())
        self.factory.clock.callLater(0, self._flood, remaining - 1)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.record()["closes"].append((wasClean, code))


@pytest_twisted.ensureDeferred
async def test_peer_that_stops_reading_is_closed_and_memory_stays_bounded(
    serve: Serve,
) -> None:
    """
    The client asks for a 12.5 MiB flood and stops reading (with a 4 KiB
    receive buffer). Once 256 KiB pile up beyond the transport's own buffer,
    the server closes with 1013, drops the rest of the flood, and aborts the
    connection after the close timeout. Its memory grows by far less than
    the flood.
    """
    route = RoutePolicy(
        "/echo",
        [AnonymousAuthenticator()],
        protocol=FloodProtocol,
        limits=RouteLimits(max_buffered_bytes=256 * 1024),
    )
    factory = SecureServerFactory(ServerPolicy.single(route))
    port = serve(factory)

    async def stop_reading() -> None:
        client = await RawClient.connect(port, rcvbuf=4096)
        try:
            await client.upgrade()
            await client.send(frame(TEXT, b"flood"))
            async with asyncio.timeout(SANITY_TIMEOUT):
                while factory.sessions:
                    await asyncio.sleep(0.05)
        finally:
            client.close()

    await aio(stop_reading())
    record = FloodProtocol.events.pop(id(factory))
    protocol = record["protocol"]
    assert factory.counters["limit.max_buffered_bytes"] == 1
    assert (protocol.localCloseCode, protocol.localCloseReason) == (1013, b"slow consumer")
    # onClose ran once; the peer never answered the close, so it is unclean.
    assert [was_clean for was_clean, _ in record["closes"]] == [False]
    assert record["sent"] < FLOOD_MESSAGES
    # A bound, not a timing threshold: with the limit, the server holds at
    # most the transport's buffer (64 KiB) + max_buffered_bytes (256 KiB) +
    # one message, however fast or slow the machine; without it, the whole
    # 12.5 MiB flood (less what the kernel's socket buffers absorb) would
    # sit in the transport's buffer until the connection ends. The peak is
    # sampled after every send of the flood. (Measured on the development
    # machine: ~0.2 MiB with the limit, ~11 MiB with max_buffered_bytes=0.)
    growth = record["rss_peak"] - record["rss_before"]
    assert growth < 8 * 1024 * 1024, f"server RSS grew by {growth} bytes"
    assert factory.connections.total == 0
    # A good client is still served.
    assert await aio(echo_once(port)) == "still here"
    assert factory.counters == Counter({"session.opened": 2, "limit.max_buffered_bytes": 1})
