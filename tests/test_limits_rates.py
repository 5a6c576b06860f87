"""
Traffic rates: the per-connection message and byte buckets of
L{RouteLimits}, the buckets a consumer's connections share, and the counters
that record every close.

Every test runs a real L{SecureServerFactory} on 127.0.0.1 with a real
C{websockets} client. Where the arithmetic of a bucket matters, the factory
gets a L{Clock} as its clock: buckets then refill only when the test advances
it, so the exact frame that goes past a limit is known. Tests with the real
clock only use lower bounds ("at least this long has passed").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import pytest_twisted
import websockets
from conftest import aio
from twisted.internet.task import Clock
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from txwssec import Consumer, ConsumerDirectory, KeyAuthenticator, RoutePolicy, SecureServerFactory
from txwssec.apps.echo import EchoProtocol
from txwssec.consumers import key_digest
from txwssec.errors import CloseCode
from txwssec.limits import TokenBucket
from txwssec.policy import DEFAULT_MAX_MESSAGE_SIZE, RouteLimits

JOHN_KEY = "rates-john-key"
MARY_KEY = "rates-mary-key"

#: A missing echo or close fails the test after this long instead of hanging.
SANITY_TIMEOUT = 10.0

Serve = Callable[[Any], int]

LIMIT_COUNTERS = (
    "limit.message_rate",
    "limit.byte_rate",
    "limit.fragments",
    "limit.control_frames",
    "limit.max_message_size",
    "limit.max_buffered_bytes",
)


# -- helpers ----------------------------------------------------------------


def make_factory(
    limits: RouteLimits,
    *,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    clock: Clock | None = None,
) -> SecureServerFactory:
    """An echo route for john and mary (API keys) with C{limits}."""
    directory = ConsumerDirectory(
        [Consumer("john", (key_digest(JOHN_KEY),)), Consumer("mary", (key_digest(MARY_KEY),))]
    )
    route = RoutePolicy(
        "/echo",
        [KeyAuthenticator(directory)],
        protocol=EchoProtocol,
        max_message_size=max_message_size,
        limits=limits,
    )
    return SecureServerFactory(route, reactor=clock)


def connect(port: int, key: str = JOHN_KEY) -> Any:
    """A C{websockets} client of C{/echo} with C{key}, no compression."""
    return websockets.connect(
        f"ws://127.0.0.1:{port}/echo",
        additional_headers={"apikey": key},
        compression=None,
        open_timeout=SANITY_TIMEOUT,
        max_size=None,
    )


async def recv(ws: ClientConnection) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), SANITY_TIMEOUT)


async def echo_all(ws: ClientConnection, messages: Iterable[str]) -> None:
    """Send C{messages} one by one; each must come back unchanged."""
    for message in messages:
        await ws.send(message)
        assert await recv(ws) == message


async def flood(
    ws: ClientConnection, messages: Iterable[str]
) -> tuple[list[str | bytes], int, str]:
    """
    Send all of C{messages} back to back without reading, then read until
    the server closes.

    @return: the echoes received, and the code and reason of the server's
        close frame.
    """
    try:
        for message in messages:
            await ws.send(message)
    except ConnectionClosed:
        pass
    return await drain(ws)


async def drain(ws: ClientConnection) -> tuple[list[str | bytes], int, str]:
    """Read until the server closes: the echoes, then its close code/reason."""
    echoes: list[str | bytes] = []
    while True:
        try:
            echoes.append(await recv(ws))
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "no close frame from the server"
            return echoes, closed.rcvd.code, closed.rcvd.reason


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait until C{predicate()} holds (server-side bookkeeping after a close)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SANITY_TIMEOUT
    while not predicate():
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def limit_counters(factory: SecureServerFactory) -> dict[str, int]:
    return {name: factory.counters[name] for name in LIMIT_COUNTERS if factory.counters[name]}


# -- per-connection message rate --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_burst_echoes_then_flood_closes_1008(serve: Serve) -> None:
    """
    Five messages back to back fit the burst of five; a flood of fifty gets
    the first five echoed and then a 1008 close naming the limit. The bucket
    belongs to the connection: a new connection is served at once.
    """
    factory = make_factory(RouteLimits(messages_per_second=5, burst=5))
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as ws:
            for i in range(5):
                await ws.send(f"m{i}")
            assert [await recv(ws) for _ in range(5)] == [f"m{i}" for i in range(5)]

        async with connect(port) as ws:
            echoes, code, reason = await flood(ws, (f"f{i}" for i in range(50)))
            assert echoes == [f"f{i}" for i in range(5)]
            assert (code, reason) == (CloseCode.POLICY_VIOLATION, "message rate exceeded")

        async with connect(port) as ws:
            await echo_all(ws, ["fresh", "connection"])

    await aio(client())
    assert limit_counters(factory) == {"limit.message_rate": 1}


@pytest_twisted.ensureDeferred
async def test_bucket_refills_with_time(serve: Serve) -> None:
    """
    Real clock: after the burst is spent, half a second at five per second
    refills (at least) two and a half tokens, so two more messages pass on
    the same connection.
    """
    factory = make_factory(RouteLimits(messages_per_second=5, burst=5))
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as ws:
            for i in range(5):
                await ws.send(f"m{i}")
            assert [await recv(ws) for _ in range(5)] == [f"m{i}" for i in range(5)]
            await asyncio.sleep(0.5)
            await ws.send("after-1")
            await ws.send("after-2")
            assert [await recv(ws), await recv(ws)] == ["after-1", "after-2"]

    await aio(client())
    assert limit_counters(factory) == {}


@pytest_twisted.ensureDeferred
async def test_refill_arithmetic_exact(serve: Serve) -> None:
    """
    With the factory on a L{Clock}: no time passes, no refill; 0.4 s at five
    per second buys exactly two messages and the third is refused.
    """
    clock = Clock()
    factory = make_factory(RouteLimits(messages_per_second=5, burst=5), clock=clock)
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as ws:
            await echo_all(ws, [f"m{i}" for i in range(5)])
            clock.advance(0.4)
            await echo_all(ws, ["r1", "r2"])
            await ws.send("one-too-many")
            echoes, code, reason = await drain(ws)
            assert echoes == []
            assert (code, reason) == (CloseCode.POLICY_VIOLATION, "message rate exceeded")

    await aio(client())
    assert limit_counters(factory) == {"limit.message_rate": 1}


@pytest_twisted.ensureDeferred
async def test_burst_defaults_to_one_second_of_rate(serve: Serve) -> None:
    """C{burst=0}: the bucket holds one second's worth (three messages)."""
    factory = make_factory(RouteLimits(messages_per_second=3), clock=Clock())
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as ws:
            await echo_all(ws, ["a", "b", "c"])
            await ws.send("d")
            _, code, reason = await drain(ws)
            assert (code, reason) == (CloseCode.POLICY_VIOLATION, "message rate exceeded")

    await aio(client())


@pytest_twisted.ensureDeferred
async def test_fragments_count_as_one_message(serve: Serve) -> None:
    """
    A message sent as ten frames takes one token, not ten: with a burst of
    two, it is delivered whole, one more message fits, the next does not.
    """
    factory = make_factory(RouteLimits(messages_per_second=2, burst=2), clock=Clock())
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as ws:
            await ws.send([f"part{i}-" for i in range(10)])
            assert await recv(ws) == "".join(f"part{i}-" for i in range(10))
            await echo_all(ws, ["second"])
            await ws.send("third")
            echoes, code, _ = await drain(ws)
            assert (echoes, code) == ([], CloseCode.POLICY_VIOLATION)

    await aio(client())
    assert limit_counters(factory) == {"limit.message_rate": 1}


# -- control frames count ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ping_flood_closes_1008(serve: Serve) -> None:
    """Pings take tokens: a flood of pings alone closes the connection."""
    factory = make_factory(RouteLimits(messages_per_second=2, burst=3))
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as ws:
            try:
                for i in range(50):
                    await ws.ping(f"p{i}".encode())
            except ConnectionClosed:
                pass
            echoes, code, reason = await drain(ws)
            assert echoes == []
            assert (code, reason) == (CloseCode.POLICY_VIOLATION, "message rate exceeded")

    await aio(client())
    assert limit_counters(factory) == {"limit.message_rate": 1}


@pytest_twisted.ensureDeferred
async def test_pings_and_pongs_share_the_message_bucket(serve: Serve) -> None:
    """
    Exact accounting on a L{Clock}, burst of three: two pings (answered)
    and one unsolicited pong spend the bucket, so the first data message is
    refused.
    """
    factory = make_factory(RouteLimits(messages_per_second=2, burst=3), clock=Clock())
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as ws:
            for payload in (b"one", b"two"):
                pong = await ws.ping(payload)
                await asyncio.wait_for(pong, SANITY_TIMEOUT)
            await ws.pong(b"unsolicited")
            await ws.send("data")
            echoes, code, reason = await drain(ws)
            assert echoes == []
            assert (code, reason) == (CloseCode.POLICY_VIOLATION, "message rate exceeded")

    await aio(client())


@pytest_twisted.ensureDeferred
async def test_answered_pings_within_burst_are_fine(serve: Serve) -> None:
    """Control frames under the limit do not disturb the data that follows."""
    factory = make_factory(RouteLimits(messages_per_second=2, burst=3), clock=Clock())
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as ws:
            pong = await ws.ping(b"x")
            await asyncio.wait_for(pong, SANITY_TIMEOUT)
            await echo_all(ws, ["a", "b"])

    await aio(client())
    assert limit_counters(factory) == {}


# -- bytes ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_byte_flood_closes_1008(serve: Serve) -> None:
    """
    C{bytes_per_second=1000}, C{max_message_size=1000}: the bucket holds
    1000 bytes, so two 600-byte messages back to back close 1008.
    """
    factory = make_factory(RouteLimits(bytes_per_second=1000), max_message_size=1000)
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as ws:
            echoes, code, reason = await flood(ws, ["a" * 600, "b" * 600, "c" * 600])
            assert echoes == ["a" * 600]
            assert (code, reason) == (CloseCode.POLICY_VIOLATION, "byte rate exceeded")

    await aio(client())
    assert limit_counters(factory) == {"limit.byte_rate": 1}


@pytest_twisted.ensureDeferred
async def test_byte_bucket_exact(serve: Serve) -> None:
    """
    On a L{Clock}: 600 + 400 bytes is exactly the bucket; one more byte is
    refused. A fresh connection has a full bucket again.
    """
    clock = Clock()
    factory = make_factory(RouteLimits(bytes_per_second=1000), max_message_size=1000, clock=clock)
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as ws:
            await echo_all(ws, ["a" * 600, "b" * 400])
            await ws.send("c")
            echoes, code, reason = await drain(ws)
            assert echoes == []
            assert (code, reason) == (CloseCode.POLICY_VIOLATION, "byte rate exceeded")
        async with connect(port) as ws:
            await echo_all(ws, ["d" * 1000])
            clock.advance(0.25)
            await echo_all(ws, ["e" * 250])

    await aio(client())
    assert limit_counters(factory) == {"limit.byte_rate": 1}


@pytest_twisted.ensureDeferred
async def test_byte_bucket_never_smaller_than_a_message(serve: Serve) -> None:
    """
    A byte rate below C{max_message_size} still lets one largest message
    through (the bucket holds C{max(rate, max_message_size)}); then the
    bucket refills at the configured rate only.
    """
    clock = Clock()
    factory = make_factory(RouteLimits(bytes_per_second=100), max_message_size=1000, clock=clock)
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as ws:
            await echo_all(ws, ["x" * 1000])
            clock.advance(1)
            await echo_all(ws, ["y" * 100])
            await ws.send("z")
            _, code, reason = await drain(ws)
            assert (code, reason) == (CloseCode.POLICY_VIOLATION, "byte rate exceeded")

    await aio(client())


@pytest_twisted.ensureDeferred
async def test_fragment_bytes_count(serve: Serve) -> None:
    """Continuation frames spend bytes even though they spend no message token."""
    factory = make_factory(
        RouteLimits(bytes_per_second=1000), max_message_size=1000, clock=Clock()
    )
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as ws:
            await ws.send(["a" * 300, "b" * 300, "c" * 300])
            assert await recv(ws) == "a" * 300 + "b" * 300 + "c" * 300
            await ws.send(["d" * 50, "e" * 51])
            echoes, code, reason = await drain(ws)
            assert echoes == []
            assert (code, reason) == (CloseCode.POLICY_VIOLATION, "byte rate exceeded")

    await aio(client())


# -- buckets shared by a consumer's connections -----------------------------


@pytest_twisted.ensureDeferred
async def test_consumer_bucket_shared_across_connections(serve: Serve) -> None:
    """
    C{consumer_messages_per_second=5}, burst 5: john's two connections
    share five tokens. Three on the first, then three on the second: the
    second connection's third message closes it with 1008, and the first one
    has nothing left either. Mary's connection has her own bucket.
    """
    clock = Clock()
    factory = make_factory(RouteLimits(consumer_messages_per_second=5, burst=5), clock=clock)
    port = serve(factory)

    async def client() -> None:
        async with (
            connect(port) as first,
            connect(port) as second,
            connect(port, MARY_KEY) as mary,
        ):
            await echo_all(first, ["1a", "1b", "1c"])
            echoes, code, reason = await flood(second, ["2a", "2b", "2c"])
            assert echoes == ["2a", "2b"]
            assert (code, reason) == (CloseCode.POLICY_VIOLATION, "message rate exceeded")

            await echo_all(mary, [f"mary{i}" for i in range(5)])

            # The shared bucket is empty for the first connection too.
            await first.send("1d")
            echoes, code, _ = await drain(first)
            assert (echoes, code) == ([], CloseCode.POLICY_VIOLATION)

            # Mary's own bucket is spent by her five messages, not by john's.
            clock.advance(0.2)
            await echo_all(mary, ["one more"])

    await aio(client())
    assert limit_counters(factory) == {"limit.message_rate": 2}


@pytest_twisted.ensureDeferred
async def test_consumer_bucket_refills_for_all_connections(serve: Serve) -> None:
    """
    A refill of the shared bucket serves whichever connection asks first;
    the per-connection bucket (20/s) is never the limit here.
    """
    clock = Clock()
    factory = make_factory(
        RouteLimits(messages_per_second=20, consumer_messages_per_second=2, burst=2),
        clock=clock,
    )
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as first, connect(port) as second:
            await echo_all(first, ["a"])
            await echo_all(second, ["b"])
            clock.advance(0.5)
            await echo_all(second, ["c"])
            await first.send("d")
            echoes, code, _ = await drain(first)
            assert (echoes, code) == ([], CloseCode.POLICY_VIOLATION)

    await aio(client())
    assert limit_counters(factory) == {"limit.message_rate": 1}


@pytest_twisted.ensureDeferred
async def test_consumer_byte_bucket_shared(serve: Serve) -> None:
    """C{consumer_bytes_per_second}: 600 bytes on each of two connections exceed 1000."""
    factory = make_factory(
        RouteLimits(consumer_bytes_per_second=1000), max_message_size=1000, clock=Clock()
    )
    port = serve(factory)

    async def client() -> None:
        async with (
            connect(port) as first,
            connect(port) as second,
            connect(port, MARY_KEY) as mary,
        ):
            await echo_all(first, ["a" * 600])
            await second.send("b" * 600)
            echoes, code, reason = await drain(second)
            assert echoes == []
            assert (code, reason) == (CloseCode.POLICY_VIOLATION, "byte rate exceeded")
            await echo_all(mary, ["m" * 1000])

    await aio(client())
    assert limit_counters(factory) == {"limit.byte_rate": 1}


# -- counters ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_counters_once_per_closed_connection(serve: Serve) -> None:
    """
    However many frames arrive after the limit, each closed connection is
    counted once, under its own limit's name only.
    """
    factory = make_factory(
        RouteLimits(messages_per_second=5, burst=5, bytes_per_second=1000),
        max_message_size=1000,
    )
    port = serve(factory)

    async def client() -> None:
        for round_ in range(3):
            async with connect(port) as ws:
                _, code, reason = await flood(ws, [f"{round_}-{i}" for i in range(50)])
                assert (code, reason) == (CloseCode.POLICY_VIOLATION, "message rate exceeded")
            assert limit_counters(factory) == {"limit.message_rate": round_ + 1}
        for round_ in range(2):
            async with connect(port) as ws:
                _, code, reason = await flood(ws, ["x" * 900] * 4)
                assert (code, reason) == (CloseCode.POLICY_VIOLATION, "byte rate exceeded")
            assert limit_counters(factory) == {
                "limit.message_rate": 3,
                "limit.byte_rate": round_ + 1,
            }
        await eventually(lambda: factory.connections.total == 0)

    await aio(client())
    assert factory.counters["session.opened"] == 5


# -- defaults ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_limits_by_default(serve: Serve) -> None:
    """Default L{RouteLimits}: a thousand messages back to back all come back."""
    assert RouteLimits().messages_per_second == 0
    assert RouteLimits().bytes_per_second == 0
    factory = make_factory(RouteLimits())
    port = serve(factory)

    async def client() -> None:
        async with connect(port) as ws:
            for i in range(1000):
                await ws.send(f"message {i}")
            received = [await recv(ws) for _ in range(1000)]
            assert received == [f"message {i}" for i in range(1000)]
            pong = await ws.ping()
            await asyncio.wait_for(pong, SANITY_TIMEOUT)

    await aio(client())
    assert limit_counters(factory) == {}


# -- the bucket itself ------------------------------------------------------


def test_token_bucket_arithmetic() -> None:
    """Lazy refill from clock readings (binary fractions keep it exact)."""
    bucket = TokenBucket(rate=4, burst=4, now=100.0)
    assert all(bucket.take(1, 100.0) for _ in range(4))
    assert not bucket.take(1, 100.0)
    # A refused take takes nothing: 0.25 s later exactly one token is there.
    assert bucket.take(1, 100.25)
    assert not bucket.take(1, 100.25)
    # Never more than the burst, however long the pause.
    assert bucket.take(4, 1000.0)
    assert not bucket.take(0.5, 1000.0)
    # A take larger than what is there fails without spending it.
    assert not bucket.take(3, 1000.5)
    assert bucket.take(2, 1000.5)
    assert not bucket.take(0.001, 1000.5)
