#!/usr/bin/env python3
"""
The load generator of bench/bench.py: one process, one event loop.

It reads a JSON spec on standard input, runs one scenario against one
server and prints one JSON object (the result) as its last line of output.
bench.py starts it pinned to CPU 1, with the server pinned to CPU 0.

Client stack: asyncio with uvloop and picows when they import (the C
WebSocket client does the masking and framing); otherwise the standard
asyncio loop and the ``websockets`` client (slower: check the reported
``loadgen_cpu_pct``).

The load generator reads the server's CPU time itself, from
``/proc/PID/stat`` (utime + stime of the server process and of all its
descendants, for nginx's workers), at the start and end of the measured
window, so that connection setup and teardown stay out of it.

``handshake`` and ``echo`` take a list of ``targets`` (label, url, headers,
server_pids, ca) and measure them in turn, ``cycles`` times, in windows of
``duration`` seconds after ``warmup`` seconds on each switch (A B C A B C);
the result has one entry per label, with every window. The other scenarios
take one target (url, headers, server_pids).

Scenarios (``spec["scenario"]``):

``handshake``
    ``concurrency`` workers each loop: connect, opening handshake, close
    handshake (1000, answered by the server), TCP close. One operation is a
    full connection; latency is connect to 101.
``echo``
    ``connections`` connections each keep ``inflight`` messages of ``size``
    bytes in flight; every echo is checked against the oldest message
    outstanding on its connection (length, order and content).
``idle``
    opens ``connections`` connections, lets them sit idle and reads the
    server's RSS before and after: memory per connection.
``expiry``
    opens ``connections`` connections with HS256 JWTs whose ``exp`` are
    spread evenly over ``window`` seconds, then records when each close
    3000 arrives, relative to its token's ``exp``.

All traffic goes to the URL in the spec (127.0.0.1); every loop is bounded
in count and time.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import gc
import json
import logging
import os
import random
import resource
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any

try:
    import uvloop
except ImportError:  # pragma: no cover - reported in the result
    uvloop = None  # type: ignore[assignment]

try:
    import picows
    from picows import WSCloseCode, WSListener, WSMsgType, ws_connect
except ImportError:  # pragma: no cover - reported in the result
    picows = None  # type: ignore[assignment]

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Give up on a connection or handshake after this many seconds.
CONNECT_TIMEOUT = 10.0
#: Upper bound on any scenario, whatever the spec says.
HARD_LIMIT = 300.0


# -- the server's accounting --------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces and parentheses).
    return stat[stat.rindex(")") + 2 :].split()


def process_tree(pids: list[int]) -> list[int]:
    """C{pids} and all their live descendants."""
    parents: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parents[int(fields[1])].append(int(entry))
    found: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(parents.get(pid, ()))
    return found


def server_cpu(pids: list[int]) -> float:
    """User + system CPU seconds of C{pids} and their descendants."""
    total = 0
    for pid in process_tree(pids):
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def server_split(pids: list[int]) -> dict[str, float]:
    """
    C{server_cpu}'s parts: user and system CPU seconds, minor page faults
    and voluntary / involuntary context switches of C{pids} and their
    descendants.
    """
    found = {"user_s": 0.0, "sys_s": 0.0, "minflt": 0.0, "vcsw": 0.0, "ivcsw": 0.0}
    for pid in process_tree(pids):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        found["user_s"] += int(fields[11]) / CLK_TCK
        found["sys_s"] += int(fields[12]) / CLK_TCK
        found["minflt"] += int(fields[7])
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("voluntary_ctxt_switches:"):
                        found["vcsw"] += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        found["ivcsw"] += int(line.split()[1])
        except OSError:
            pass
    return found


def server_rss(pids: list[int]) -> int:
    """Resident set size in bytes of C{pids} and their descendants."""
    total = 0
    for pid in process_tree(pids):
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Window:
    """A measured interval: wall time, server CPU and our own CPU."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start = self.end = 0.0
        self.cpu0 = self.cpu1 = 0.0
        self.own0 = self.own1 = 0.0
        self.split0: dict[str, float] = {}
        self.split1: dict[str, float] = {}

    def open(self) -> None:
        self.split0 = server_split(self.pids)
        self.cpu0 = server_cpu(self.pids)
        self.own0 = own_cpu()
        self.start = time.perf_counter()

    def close(self) -> None:
        self.end = time.perf_counter()
        self.cpu1 = server_cpu(self.pids)
        self.split1 = server_split(self.pids)
        self.own1 = own_cpu()

    def result(self, ops: int) -> dict[str, Any]:
        wall = max(self.end - self.start, 1e-9)
        cpu = self.cpu1 - self.cpu0
        return {
            "ops": ops,
            "wall_s": wall,
            "ops_per_s": ops / wall,
            "server_cpu_s": cpu,
            "server_cpu_us_per_op": cpu / ops * 1e6 if ops else None,
            "server_cpu_pct": cpu / wall * 100,
            "loadgen_cpu_pct": (self.own1 - self.own0) / wall * 100,
            # The parts (user, system, faults, switches), for the profile of
            # a gap that instruction counts do not show.
            **{
                f"server_{key}": self.split1.get(key, 0.0) - self.split0.get(key, 0.0)
                for key in self.split0
            },
        }


def percentiles(samples: list[float]) -> dict[str, float | None]:
    """p50 and p99 in milliseconds."""
    if not samples:
        return {"p50_ms": None, "p99_ms": None}
    ordered = sorted(samples)
    last = len(ordered) - 1
    return {
        "p50_ms": ordered[round(0.50 * last)] * 1000,
        "p99_ms": ordered[round(0.99 * last)] * 1000,
    }


# -- the client: picows, or websockets as a fallback ---------------------------


class Connection:
    """
    One client connection. The owner sets C{on_message(payload, binary)}
    and C{on_close(code)}; C{close()} runs the closing handshake.
    """

    on_message: Callable[[bytes, bool], None]
    on_close: Callable[[int | None], None]

    def __init__(self) -> None:
        self.on_message = _ignore_message
        self.on_close = _ignore_close
        self.close_code: int | None = None
        self.closed_at: float | None = None

    def send(self, payload: bytes, binary: bool) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


def _ignore_message(payload: bytes, binary: bool) -> None:
    pass


def _ignore_close(code: int | None) -> None:
    pass


class HandshakeFailed(Exception):
    """The server refused the upgrade: C{status} is the HTTP status."""

    def __init__(self, status: int | None) -> None:
        super().__init__(status)
        self.status = status


if os.environ.get("BENCH_CLIENT") == "websockets":
    picows = None  # type: ignore[assignment]

#: Extra keyword arguments for picows' ws_connect (from the spec).
_CONNECT_OPTIONS: dict[str, Any] = {}

if picows is not None:

    class _PicowsListener(WSListener):
        def __init__(self) -> None:
            self.connection = _PicowsConnection(self)
            self.transport: Any = None
            self.parts: list[bytes] = []
            self.part_type: Any = None

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            kind = frame.msg_type
            if kind is WSMsgType.CLOSE:
                connection = self.connection
                if connection.closed_at is None:
                    connection.closed_at = time.time()
                    connection.close_code = int(frame.get_close_code().value)
                    if not transport.is_close_frame_sent:
                        transport.send_close(frame.get_close_code())
                    transport.disconnect()
                    connection.on_close(connection.close_code)
                return
            if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                if frame.fin:
                    self.connection.on_message(
                        frame.get_payload_as_bytes(), kind is WSMsgType.BINARY
                    )
                else:
                    self.part_type = kind
                    self.parts = [frame.get_payload_as_bytes()]
            elif kind is WSMsgType.CONTINUATION:
                self.parts.append(frame.get_payload_as_bytes())
                if frame.fin:
                    payload = b"".join(self.parts)
                    self.parts = []
                    self.connection.on_message(payload, self.part_type is WSMsgType.BINARY)

        def on_ws_disconnected(self, transport: Any) -> None:
            connection = self.connection
            if connection.closed_at is None:
                connection.closed_at = time.time()
                connection.on_close(None)
            connection.disconnected = True

    class _PicowsConnection(Connection):
        def __init__(self, listener: _PicowsListener) -> None:
            super().__init__()
            self.listener = listener
            self.disconnected = False

        def send(self, payload: bytes, binary: bool) -> None:
            self.listener.transport.send(WSMsgType.BINARY if binary else WSMsgType.TEXT, payload)

        async def close(self) -> None:
            transport = self.listener.transport
            if not self.disconnected:
                if not transport.is_close_frame_sent:
                    transport.send_close(WSCloseCode.OK)
                try:
                    await asyncio.wait_for(transport.wait_disconnected(), CONNECT_TIMEOUT)
                except (TimeoutError, Exception):
                    transport.disconnect(False)

        def abort(self) -> None:
            self.listener.transport.disconnect(False)

    async def connect(
        url: str, headers: list[tuple[str, str]], context: ssl.SSLContext | None
    ) -> Connection:
        try:
            _, listener = await ws_connect(
                _PicowsListener,
                url,
                ssl_context=context,
                extra_headers=headers,
                websocket_handshake_timeout=CONNECT_TIMEOUT,
                max_frame_size=16 * 1024 * 1024,
                enable_auto_pong=True,
                **_CONNECT_OPTIONS,
            )
        except picows.WSHandshakeError as error:
            response = getattr(error, "response", None)
            raise HandshakeFailed(int(response.status) if response is not None else None) from None
        connection: Connection = listener.connection  # type: ignore[attr-defined]
        return connection

    CLIENT = f"picows {getattr(picows, '__version__', '?')}"

else:  # pragma: no cover - the fallback
    import websockets
    from websockets.asyncio.client import connect as _ws_connect

    class _WebsocketsConnection(Connection):
        def __init__(self, ws: Any) -> None:
            super().__init__()
            self.ws = ws
            self.sending: set[asyncio.Future[None]] = set()
            self.reader = asyncio.ensure_future(self._read())

        async def _read(self) -> None:
            try:
                async for message in self.ws:
                    if isinstance(message, str):
                        self.on_message(message.encode(), False)
                    else:
                        self.on_message(message, True)
            except websockets.ConnectionClosed:
                pass
            self.closed_at = time.time()
            rcvd = self.ws.protocol.close_rcvd
            self.close_code = rcvd.code if rcvd is not None else None
            self.on_close(self.close_code)

        def send(self, payload: bytes, binary: bool) -> None:
            message: bytes | str = payload if binary else payload.decode()
            task = asyncio.ensure_future(self.ws.send(message))
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)

        async def close(self) -> None:
            await self.ws.close()
            await self.reader

        def abort(self) -> None:
            self.ws.transport.abort()

    async def connect(
        url: str, headers: list[tuple[str, str]], context: ssl.SSLContext | None
    ) -> Connection:
        try:
            ws = await _ws_connect(
                url,
                additional_headers=headers,
                ssl=context,
                open_timeout=CONNECT_TIMEOUT,
                compression=None,
                max_size=16 * 1024 * 1024,
                ping_interval=None,
            )
        except websockets.InvalidStatus as error:
            raise HandshakeFailed(error.response.status_code) from None
        return _WebsocketsConnection(ws)

    CLIENT = f"websockets {websockets.__version__} (fallback: picows not installed)"


# -- TLS session resumption: a client of its own --------------------------------

#: A masked close frame, code 1000 (mask key 0: the payload is as written).
_CLOSE_1000 = b"\x88\x82\x00\x00\x00\x00\x03\xe8"


class _ResumingHandshake(asyncio.Protocol):
    """
    One handshake op over TLS through C{ssl}'s memory BIO, offering a saved
    TLS session (asyncio's transports cannot offer one): TLS handshake,
    upgrade request, 101, close 1000, the server's close, TCP close.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        hostname: str,
        request: bytes,
        session: ssl.SSLSession | None,
        done: asyncio.Future[tuple[float, int, ssl.SSLSession | None, bool]],
    ) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self.incoming, self.outgoing, server_hostname=hostname, session=session
        )
        self.request = request
        self.done = done
        self.state = "tls"
        self.buffer = b""
        self.opened = 0.0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.step()

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        self.step()

    def eof_received(self) -> bool:
        self.fail(ConnectionResetError("EOF before the close frame"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc or ConnectionResetError("connection lost"))

    def fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def step(self) -> None:
        try:
            self._step()
        except Exception as error:
            self.fail(error)

    def _step(self) -> None:
        tls = self.tls
        if self.state == "tls":
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            tls.write(self.request)
            self.state = "upgrade"
        while True:
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                break
            if not chunk:
                break
            self.buffer += chunk
        if self.state == "upgrade" and b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status != 101:
                raise HandshakeFailed(status)
            self.opened = time.perf_counter()
            tls.write(_CLOSE_1000)
            self.state = "closing"
        if self.state == "closing" and len(self.buffer) >= 4:
            if self.buffer[0] != 0x88:
                raise ValueError(f"expected a close frame, got {self.buffer[:2]!r}")
            code = int.from_bytes(self.buffer[2:4], "big")
            self.state = "closed"
            self._flush()
            if not self.done.done():
                self.done.set_result((self.opened, code, tls.session, tls.session_reused))
            self.transport.close()
            return
        self._flush()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.transport.write(data)


def _upgrade_request(url: str, headers: list[tuple[str, str]]) -> tuple[str, int, bytes]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode()


async def resuming_handshake(
    url: str,
    headers: list[tuple[str, str]],
    context: ssl.SSLContext,
    session: ssl.SSLSession | None,
) -> tuple[float, int, ssl.SSLSession | None, bool]:
    """One wss handshake op offering C{session}: (opened at, close code, next session, reused)."""
    host, port, request = _upgrade_request(url, headers)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[float, int, ssl.SSLSession | None, bool]] = loop.create_future()
    await loop.create_connection(
        lambda: _ResumingHandshake(context, "localhost", request, session, done), host, port
    )
    return await done


def failure_name(error: BaseException) -> str:
    if isinstance(error, HandshakeFailed):
        return f"HTTP {error.status}"
    if isinstance(error, asyncio.TimeoutError):
        return "timeout"
    return type(error).__name__


def tls_context(spec: dict[str, Any]) -> ssl.SSLContext | None:
    ca = spec.get("ca")
    if not ca:
        return None
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def headers_of(spec: dict[str, Any]) -> list[tuple[str, str]]:
    return [(str(name), str(value)) for name, value in spec.get("headers", [])]


async def open_many(
    count: int,
    parallel: int,
    opener: Callable[[int], Any],
    failures: collections.Counter[str],
    deadline: float,
) -> list[Connection | None]:
    """Open C{count} connections, C{parallel} at a time; None for failures."""
    result: list[Connection | None] = [None] * count
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count and time.monotonic() < deadline:
            index = next_index
            next_index += 1
            try:
                result[index] = await asyncio.wait_for(opener(index), CONNECT_TIMEOUT)
            except Exception as error:
                failures[failure_name(error)] += 1

    await asyncio.gather(*(worker() for _ in range(parallel)))
    return result


async def close_many(connections: list[Connection | None], parallel: int = 64) -> None:
    live = [c for c in connections if c is not None]

    async def worker() -> None:
        while live:
            connection = live.pop()
            try:
                await connection.close()
            except Exception:
                connection.abort()

    await asyncio.gather(*(worker() for _ in range(parallel)))


# -- scenarios -------------------------------------------------------------------


def targets_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The spec's targets: C{spec["targets"]}, or the spec itself as one target."""
    if "targets" in spec:
        return list(spec["targets"])
    return [
        {
            "label": spec.get("label", "server"),
            "url": spec["url"],
            "headers": spec.get("headers", []),
            "server_pids": spec["server_pids"],
            "ca": spec.get("ca"),
        }
    ]


class Tally:
    """One target's measured windows, failures and latencies."""

    def __init__(self, target: dict[str, Any]) -> None:
        self.target = target
        self.windows: list[dict[str, Any]] = []
        self.failures: collections.Counter[str] = collections.Counter()
        self.latencies: list[float] = []
        self.ops = 0
        #: Handshakes that resumed a TLS session (the resuming client only).
        self.resumed = 0

    def result(self) -> dict[str, Any]:
        ops = sum(w["ops"] for w in self.windows)
        wall = sum(w["wall_s"] for w in self.windows)
        cpu = sum(w["server_cpu_s"] for w in self.windows)
        own = sum(w["loadgen_cpu_pct"] * w["wall_s"] for w in self.windows)
        return {
            "ops": ops,
            "wall_s": wall,
            "ops_per_s": ops / wall if wall else 0.0,
            "server_cpu_s": cpu,
            "server_cpu_us_per_op": cpu / ops * 1e6 if ops else None,
            "server_cpu_pct": cpu / wall * 100 if wall else 0.0,
            "loadgen_cpu_pct": own / wall if wall else 0.0,
            "loadgen_cpu_pct_max": max((w["loadgen_cpu_pct"] for w in self.windows), default=0.0),
            **percentiles(self.latencies),
            "failures": dict(self.failures),
            "resumed": self.resumed,
            "windows": [
                {
                    k: w[k]
                    for k in (
                        "ops",
                        "wall_s",
                        "server_cpu_s",
                        "server_cpu_us_per_op",
                        "server_user_s",
                        "server_sys_s",
                        "server_minflt",
                        "server_vcsw",
                        "server_ivcsw",
                    )
                    if k in w
                }
                for w in self.windows
            ],
        }


async def alternate(
    spec: dict[str, Any],
    tallies: list[Tally],
    switch_to: Callable[[int], Any],
    stop: Callable[[], Any],
) -> None:
    """
    Measure the targets in turn, C{cycles} times: A B C A B C... Each turn
    waits C{warmup} seconds after switching (in-flight work of the previous
    target drains), then measures C{duration} seconds.
    """
    state = ALTERNATION
    for _cycle in range(spec.get("cycles", 1)):
        for index, tally in enumerate(tallies):
            state["measuring"] = False
            await switch_to(index)
            await asyncio.sleep(spec.get("warmup", 0.5))
            window = Window(tally.target["server_pids"])
            tally.ops = 0
            window.open()
            state["measuring"] = True
            await asyncio.sleep(spec["duration"])
            state["measuring"] = False
            window.close()
            tally.windows.append(window.result(tally.ops))
    await stop()


#: Shared by a scenario's callbacks: whether the current window is measured.
ALTERNATION: dict[str, Any] = {"measuring": False}


async def handshake(spec: dict[str, Any]) -> dict[str, Any]:
    targets = targets_of(spec)
    tallies = [Tally(t) for t in targets]
    contexts = [tls_context(t) for t in targets]
    headers = [headers_of(t) for t in targets]
    state = ALTERNATION
    current = {"index": 0, "epoch": 0, "stop": False}
    limit = time.monotonic() + HARD_LIMIT

    async def worker() -> None:
        sessions: dict[int, ssl.SSLSession | None] = {}
        while not current["stop"] and time.monotonic() < limit:
            index, epoch = current["index"], current["epoch"]
            tally, url = tallies[index], targets[index]["url"]
            started = time.perf_counter()
            measured = state["measuring"]
            resume = targets[index].get("resume")
            if resume is not None:
                # The memory-BIO client: a full handshake every time
                # (resume false) or offering the last session (resume true).
                context = contexts[index]
                assert context is not None
                try:
                    opened, code, session, reused = await asyncio.wait_for(
                        resuming_handshake(
                            url, headers[index], context, sessions.get(index) if resume else None
                        ),
                        CONNECT_TIMEOUT,
                    )
                except Exception as error:
                    sessions.pop(index, None)
                    if measured:
                        tally.failures[failure_name(error)] += 1
                    continue
                sessions[index] = session
                if code != 1000:
                    if measured:
                        tally.failures[f"close {code}"] += 1
                    continue
                if state["measuring"] and current["epoch"] == epoch:
                    tally.ops += 1
                    tally.resumed += reused
                    tally.latencies.append(opened - started)
                continue
            try:
                connection = await asyncio.wait_for(
                    connect(url, headers[index], contexts[index]), CONNECT_TIMEOUT
                )
            except Exception as error:
                if measured:
                    tally.failures[failure_name(error)] += 1
                continue
            opened = time.perf_counter()
            try:
                await connection.close()
            except Exception as error:
                if measured:
                    tally.failures[failure_name(error)] += 1
                continue
            if connection.close_code != 1000:
                if measured:
                    tally.failures[f"close {connection.close_code}"] += 1
                continue
            if state["measuring"] and current["epoch"] == epoch:
                tally.ops += 1
                tally.latencies.append(opened - started)

    async def switch_to(index: int) -> None:
        current["index"] = index
        current["epoch"] += 1

    workers: list[asyncio.Future[None]] = []

    async def start_and_switch(index: int) -> None:
        await switch_to(index)
        if not workers:
            workers.extend(asyncio.ensure_future(worker()) for _ in range(spec["concurrency"]))

    async def stop() -> None:
        current["stop"] = True
        await asyncio.gather(*workers)

    await alternate(spec, tallies, start_and_switch, stop)
    return by_label(tallies)


def by_label(tallies: list[Tally]) -> dict[str, Any]:
    results = {t.target.get("label", str(i)): t.result() for i, t in enumerate(tallies)}
    if len(results) == 1:
        return next(iter(results.values()))
    return {"targets": results}


class EchoTarget:
    """One target's connections and the messages in flight on them."""

    def __init__(self, spec: dict[str, Any], tally: Tally, key: int) -> None:
        self.spec = spec
        self.tally = tally
        self.key = key
        self.sending = False
        self.outstanding = 0
        self.drained: asyncio.Future[None] | None = None
        self.connections: list[Connection | None] = []
        size, binary = spec["size"], spec.get("binary", False)
        if size < 24:
            raise SystemExit("echo size must be at least 24 bytes")
        self.binary = binary
        self.filler = (
            random.Random(7).randbytes(size)
            if binary
            else (b"abcdefghijklmnopqrstuvwxyz0123456789" * (size // 36 + 1))[:size]
        )
        self.senders: list[Callable[[], None]] = []

    def attach(self, index: int, connection: Connection) -> None:
        pending: collections.deque[tuple[bytes, float]] = collections.deque()
        counter = [0]
        perf = time.perf_counter
        tally, binary, filler = self.tally, self.binary, self.filler[24:]
        failures = tally.failures
        state = ALTERNATION
        prefix = self.key * 1000 + index

        def send_one() -> None:
            seq = counter[0]
            counter[0] = seq + 1
            payload = b"%011d:%011d:" % (prefix, seq) + filler
            pending.append((payload, perf()))
            self.outstanding += 1
            connection.send(payload, binary)

        def on_message(payload: bytes, is_binary: bool) -> None:
            if not pending:
                failures["unexpected message"] += 1
                return
            sent, at = pending.popleft()
            self.outstanding -= 1
            if payload != sent or is_binary != binary:
                if len(payload) != len(sent):
                    failures["echo length"] += 1
                elif payload[:24] != sent[:24]:
                    failures["echo order"] += 1
                else:
                    failures["echo content"] += 1
            elif state["measuring"] and self.sending:
                tally.ops += 1
                tally.latencies.append(perf() - at)
            if self.sending:
                send_one()
            elif self.outstanding == 0:
                self._drained()

        def on_close(code: int | None) -> None:
            if pending:
                failures[f"closed {code} with echoes pending"] += 1
                self.outstanding -= len(pending)
                pending.clear()
                if not self.sending and self.outstanding == 0:
                    self._drained()

        def start() -> None:
            for _ in range(self.spec["inflight"]):
                send_one()

        connection.on_message = on_message
        connection.on_close = on_close
        self.senders.append(start)

    def _drained(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def start(self) -> None:
        self.sending = True
        for start in self.senders:
            start()

    async def stop(self) -> None:
        self.sending = False
        if self.outstanding > 0:
            self.drained = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self.drained), 10)
            except TimeoutError:
                self.tally.failures["echoes missing at the end"] += self.outstanding
                self.outstanding = 0


async def echo(spec: dict[str, Any]) -> dict[str, Any]:
    targets = targets_of(spec)
    tallies = [Tally(t) for t in targets]
    deadline = time.monotonic() + 120
    echoes = []
    for key, (target, tally) in enumerate(zip(targets, tallies, strict=True)):
        url, headers, context = target["url"], headers_of(target), tls_context(target)

        async def opener(
            index: int, url: str = url, headers: Any = headers, context: Any = context
        ) -> Connection:
            return await connect(url, headers, context)

        echo_target = EchoTarget(spec, tally, key)
        echo_target.connections = await open_many(
            spec["connections"], 16, opener, tally.failures, deadline
        )
        for index, connection in enumerate(echo_target.connections):
            if connection is not None:
                echo_target.attach(index, connection)
        echoes.append(echo_target)
    active: dict[str, EchoTarget | None] = {"target": None}

    async def switch_to(index: int) -> None:
        previous = active["target"]
        if previous is not None:
            await previous.stop()
        active["target"] = echoes[index]
        echoes[index].start()

    async def stop() -> None:
        previous = active["target"]
        if previous is not None:
            await previous.stop()
        for echo_target in echoes:
            await close_many(echo_target.connections)

    await alternate(spec, tallies, switch_to, stop)
    for echo_target, tally in zip(echoes, tallies, strict=True):
        tally.target["connections"] = sum(1 for c in echo_target.connections if c is not None)
    results = by_label(tallies)
    return results


async def idle(spec: dict[str, Any]) -> dict[str, Any]:
    url, headers, context = spec["url"], headers_of(spec), tls_context(spec)
    pids = spec["server_pids"]
    count = spec["connections"]
    failures: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + min(spec.get("timeout", 120), HARD_LIMIT)

    async def opener(index: int) -> Connection:
        return await connect(url, headers, context)

    # Warm up: the first connections load code and fill caches.
    warm = await open_many(min(200, count), 16, opener, failures, deadline)
    await close_many(warm)
    await asyncio.sleep(spec.get("settle", 1.0))
    rss0 = server_rss(pids)
    window = Window(pids)
    window.open()
    connections = await open_many(count, spec.get("parallel", 32), opener, failures, deadline)
    window.close()
    opened = sum(1 for c in connections if c is not None)
    await asyncio.sleep(spec.get("settle", 1.0))
    rss1 = server_rss(pids)
    await asyncio.sleep(spec.get("settle", 1.0))
    rss2 = server_rss(pids)
    still_open = sum(1 for c in connections if c is not None and c.closed_at is None)
    lost = opened - still_open
    if lost:
        failures["closed while idle"] += lost
    await close_many(connections)
    per_connection = (max(rss1, rss2) - rss0) / opened if opened else None
    return {
        **window.result(opened),
        "connections": opened,
        "rss_before": rss0,
        "rss_after": max(rss1, rss2),
        "bytes_per_connection": per_connection,
        "failures": dict(failures),
    }


async def expiry(spec: dict[str, Any]) -> dict[str, Any]:
    import jwt

    url, context = spec["url"], tls_context(spec)
    base_headers = headers_of(spec)
    pids = spec["server_pids"]
    count, spread = spec["connections"], spec["window"]
    secret, consumer = spec["secret"], spec["consumer"]
    failures: collections.Counter[str] = collections.Counter()
    hard_deadline = time.monotonic() + min(spec.get("timeout", 180), HARD_LIMIT)

    def token(exp: float) -> list[tuple[str, str]]:
        value = jwt.encode({"sub": consumer, "exp": exp}, secret, algorithm="HS256")
        return [*base_headers, ("Authorization", f"Bearer {value}")]

    # Calibrate: how fast does the server open sessions? (long-lived tokens)
    far = time.time() + 3600
    started = time.monotonic()
    probe = await open_many(
        300,
        32,
        lambda i: connect(url, token(far), context),
        failures,
        hard_deadline,
    )
    rate = sum(1 for c in probe if c is not None) / max(time.monotonic() - started, 1e-3)
    await close_many(probe)
    failures.clear()
    # Every session must be open before the first deadline: leave 60% slack.
    opening = count / max(rate, 1.0) * 1.6 + 2.0
    first = time.time() + opening
    expires = [first + spread * i / count for i in range(count)]
    print(json.dumps({"first_deadline": first}), file=sys.stderr, flush=True)

    async def opener(index: int) -> Connection:
        return await connect(url, token(expires[index]), context)

    open_started = time.monotonic()
    connections = await open_many(count, spec.get("parallel", 32), opener, failures, hard_deadline)
    open_took = time.monotonic() - open_started
    opened = [(i, c) for i, c in enumerate(connections) if c is not None]
    early = [c for _, c in opened if c.closed_at is not None and c.closed_at < first]
    window = Window(pids)
    # The load generator's own garbage collector must not delay the reading
    # of close frames: with 10,000 connections a full pass takes most of a
    # second, and it would be counted as the server's lateness. One pass
    # now, while every session is still open, then none until the end.
    gc.collect()
    gc.disable()
    wait = first - time.time() - 0.25
    if wait > 0:
        await asyncio.sleep(wait)
    window.open()
    # Wait for every close (bounded): the last deadline, plus 5 s at most.
    last = first + spread
    try:
        while time.time() < last + 5 and time.monotonic() < hard_deadline:
            if all(c.closed_at is not None for _, c in opened):
                break
            await asyncio.sleep(0.02)
    finally:
        gc.enable()
    window.close()
    late: list[float] = []
    codes: collections.Counter[str] = collections.Counter()
    for index, connection in opened:
        codes[str(connection.close_code)] += 1
        if connection.close_code == 3000 and connection.closed_at is not None:
            late.append(connection.closed_at - expires[index])
    never = sum(1 for _, c in opened if c.closed_at is None)
    await close_many([c for _, c in opened if c.closed_at is None])
    ordered = sorted(late)
    within = sum(1 for value in ordered if value <= 0.100)
    result = window.result(len(late))
    return {
        **result,
        "connections": len(opened),
        "open_s": open_took,
        "opened_before_first_deadline": len(opened) - len(early),
        "calibrated_rate": rate,
        "close_codes": dict(codes),
        "not_closed": never,
        "closed_3000": len(late),
        "within_100ms": within,
        "lateness_ms": {
            "min": ordered[0] * 1000 if ordered else None,
            "p50": ordered[len(ordered) // 2] * 1000 if ordered else None,
            "p99": ordered[round(0.99 * (len(ordered) - 1))] * 1000 if ordered else None,
            "max": ordered[-1] * 1000 if ordered else None,
        },
        "failures": dict(failures),
    }


SCENARIOS = {"handshake": handshake, "echo": echo, "idle": idle, "expiry": expiry}


def main() -> None:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    spec = json.loads(sys.stdin.read())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if spec.get("cpu") is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(spec["cpu"])})
    if "aiofastnet" in spec and picows is not None:
        _CONNECT_OPTIONS["use_aiofastnet"] = bool(spec["aiofastnet"])
    scenario = SCENARIOS[spec["scenario"]]
    if uvloop is not None:
        result = uvloop.run(scenario(spec))
        loop_name = f"uvloop {getattr(uvloop, '__version__', '?')}"
    else:  # pragma: no cover
        result = asyncio.run(scenario(spec))
        loop_name = "asyncio (uvloop not installed)"
    result["client"] = CLIENT
    result["loop"] = loop_name
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
