#!/usr/bin/env python3
"""
Stress test of txwssec's abuse limits against the real C{twistd wssec}.

Run from the repository root (see bench/README.rst)::

    python bench/stress.py

It writes a temporary TOML configuration, starts C{twistd -n wssec} on a
free port of 127.0.0.1, connects a well-behaved client (in its own process)
that sends one message every 50 ms, and runs the attacks one after another:
message flood, compression bomb, oversized message, slowloris, oversized
header block, key brute force, connection floods and slow readers. Around
each attack it samples the server's RSS and CPU time from C{/proc}. It
prints a Markdown table and exits 0 when every attack got its expected
outcome and the good client got every echo in time, 1 otherwise.

All traffic goes to 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import multiprocessing
import os
import re
import resource
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).parent / "twistd"
HOST = "127.0.0.1"
#: A second loopback address, for the brute-force attacker: its failures
#: must not lock out clients coming from HOST.
ATTACKER_HOST = "127.0.0.3"  # then .4, .5... in later rounds
PATH = "/echo"
KIB = 1024
MIB = 1024 * KIB

# -- the server's configuration (the attacks' expectations follow from it) --

HANDSHAKE_TIMEOUT = 2.0
PING_INTERVAL = 5.0
PING_TIMEOUT = 5.0
MAX_CONNECTIONS = 2000
AUTH_FAILURES_PER_MINUTE = 20
MAX_MESSAGE_SIZE = 1 * MIB
MESSAGES_PER_SECOND = 100
BURST = 200
BYTES_PER_SECOND = 1 * MIB
CONNECTIONS_PER_CONSUMER = 50
MAX_BUFFERED_BYTES = 1 * MIB
#: Listen backlog: the connection flood opens 1000 connections at once, and
#: Twisted's default backlog (50) would only add SYN retransmission delays.
BACKLOG = 1024

GOOD_KEY = "good-key"
ATTACKER_KEY = "attacker-key"
CROWD_KEY = "crowd-key"
READER_KEY = "reader-key"
FLOOD_CONSUMERS = 20


def flood_key(index: int) -> str:
    """The key of consumer C{flood-NN}."""
    return f"flood-{index:02d}-key"


# -- the attacks' sizes and bounds -----------------------------------------

#: The good client sends one message per this many seconds...
GOOD_INTERVAL = 0.05
#: ...and counts an echo later than this as missed.
ECHO_DEADLINE = 1.0
#: Messages sent by the flood, at most, in batches.
FLOOD_MAX_MESSAGES = 200_000
FLOOD_BATCH = 500
#: Size of the compression bomb once inflated.
BOMB_SIZE = 64 * MIB
#: The oversized message.
OVERSIZED = 2 * MIB
SLOWLORIS_CONNECTIONS = 200
SLOWLORIS_BYTE_EVERY = 0.25
#: How long a slowloris connection may survive before it counts as a failure.
SLOWLORIS_GRACE = HANDSHAKE_TIMEOUT + 3.0
HEADER_BLOCK_SIZE = 20 * KIB
HEADER_BLOCK_REQUESTS = 50
BRUTE_FORCE_ATTEMPTS = 100
CROWD_CONNECTIONS = 1000
CROWD_HOLD = 1.0
SLOW_READERS = 5
SLOW_READER_RCVBUF = 32 * KIB
SLOW_READER_PAUSE = 3.0
#: What FloodProtocol (bench/stress_app.py) sends on "flood".
APP_FLOOD_COUNT = 200
APP_FLOOD_SIZE = 64 * KIB
#: Peak RSS growth beyond which a bounded attack counts as unbounded. The
#: unbounded outcomes are 64 MiB (an inflated bomb) and 5 x 12.5 MiB (slow
#: readers' unsent data); the bounded ones are a few MiB.
BOMB_PEAK_BOUND = 16 * MIB
SLOW_READER_PEAK_BOUND = 24 * MIB
#: Time for the server's log lines about an attack to arrive.
SETTLE = 0.5
#: Upper bound on one attack's duration.
PHASE_BUDGET = 30.0

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def config_text(port: int) -> str:
    """The TOML configuration of the server under attack."""
    consumers = [("good", GOOD_KEY), ("attacker", ATTACKER_KEY), ("crowd", CROWD_KEY)]
    consumers += [("reader", READER_KEY)]
    consumers += [(f"flood-{i:02d}", flood_key(i)) for i in range(FLOOD_CONSUMERS)]
    consumer_tables = "".join(
        f'[[consumer]]\nname = "{name}"\nkeys = ["{key}"]\n\n' for name, key in consumers
    )
    return f"""\
# Written by bench/stress.py.
[server]
listen = ["tcp:{port}:interface={HOST}:backlog={BACKLOG}"]
handshake_timeout = {HANDSHAKE_TIMEOUT}
max_connections = {MAX_CONNECTIONS}
max_connections_per_ip = 0
auth_failures_per_minute = {AUTH_FAILURES_PER_MINUTE}
ping_interval = {PING_INTERVAL}
ping_timeout = {PING_TIMEOUT}

[auth.key]
header = "apikey"

{consumer_tables}\
[[route]]
path = "{PATH}"
app = "bench.stress_app:FloodProtocol"
auth = ["key"]
max_message_size = {MAX_MESSAGE_SIZE}
compression = true

[route.limits]
messages_per_second = {MESSAGES_PER_SECOND}
burst = {BURST}
bytes_per_second = {BYTES_PER_SECOND}
connections_per_consumer = {CONNECTIONS_PER_CONSUMER}
max_buffered_bytes = {MAX_BUFFERED_BYTES}
"""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


# -- the server process ----------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """The server process's resources at one instant."""

    rss: int  #: resident set size, bytes
    peak: int  #: peak RSS since the last reset, bytes
    cpu: float  #: user + system CPU time, seconds


class Server:
    """C{twistd -n wssec} as a subprocess, its output collected by a thread."""

    def __init__(self, config: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.lines: list[str] = []
        self._listening = threading.Event()
        self.process = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "wssec", "--config", str(config)],
            cwd=config.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if "wssec listening on" in line:
                self._listening.set()

    def wait_listening(self, timeout: float = 20.0) -> None:
        """Return once the server listens; raise if it does not in time."""
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("twistd did not start listening:\n" + "".join(self.lines))

    @property
    def pid(self) -> int:
        return self.process.pid

    def usage(self) -> Usage:
        """RSS, peak RSS and CPU time, from C{/proc/PID/status} and C{stat}."""
        fields: dict[str, int] = {}
        status = Path(f"/proc/{self.pid}/status").read_text()
        for line in status.splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * KIB
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        # Fields after the command name (which may hold spaces), from field 3.
        rest = stat[stat.rindex(")") + 2 :].split()
        ticks = int(rest[11]) + int(rest[12])  # utime, stime: fields 14 and 15
        return Usage(fields["VmRSS"], fields["VmHWM"], ticks / os.sysconf("SC_CLK_TCK"))

    def reset_peak(self) -> None:
        """Reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)."""
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def stop(self) -> int:
        """SIGTERM, then the exit status (killed if it does not stop)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait(10)
        self._reader.join(10)
        return status


#: What the server logs, tallied per attack: (pattern, event name); a group
#: in the pattern is appended to the name.
LOG_EVENTS = [
    (re.compile(r"\baccepted \S+ on \S+ as "), "accepted"),
    (re.compile(r"\brefused \S+ on \S+ with (\d{3})"), "refused "),
    (re.compile(r"\blimit limit\.(\w+): closing"), ""),
    (re.compile(r"\bsession (\w+): closing"), "session "),
    (re.compile(r"opening handshake timeout"), "handshake timeout"),
    (re.compile(r"closing handshake timeout"), "close timeout"),
    (re.compile(r"#(?:error|critical)\]|Traceback|Unhandled"), "ERROR"),
]


def tally(lines: Iterable[str]) -> Counter[str]:
    """Count the server's log events in C{lines}."""
    events: Counter[str] = Counter()
    for line in lines:
        for pattern, name in LOG_EVENTS:
            match = pattern.search(line)
            if match:
                events[name + "".join(match.groups())] += 1
    return events


# -- a WebSocket client by hand ----------------------------------------------


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """A masked client frame."""
    head = bytearray([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    size = len(payload)
    if size < 126:
        head.append(0x80 | size)
    elif size < 1 << 16:
        head += struct.pack("!BH", 0x80 | 126, size)
    else:
        head += struct.pack("!BQ", 0x80 | 127, size)
    key = secrets.token_bytes(4)
    if size == 0:
        return bytes(head) + key
    stream = (key * (size // 4 + 1))[:size]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")
    return bytes(head) + key + masked.to_bytes(size, "big")


def close_payload(code: int) -> bytes:
    return struct.pack("!H", code)


@dataclass
class Conn:
    """A raw connection after its handshake response."""

    status: int  #: HTTP status (0: no response)
    headers: dict[str, str]
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    error: str = ""

    def close(self, abort: bool = False) -> None:
        """Close the TCP connection (with a RST when C{abort})."""
        if self.writer is not None:
            if abort:
                self.writer.transport.abort()
            else:
                self.writer.close()
            self.writer = None

    @property
    def outcome(self) -> str:
        """The status, or what happened instead of one."""
        return str(self.status) if self.status else self.error or "no response"


async def open_tcp(
    port: int, *, local_host: str = HOST, rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to the server from C{local_host}."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((local_host, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


def upgrade_request(port: int, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """An opening handshake for PATH with extra C{headers}."""
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    lines = [
        f"GET {PATH} HTTP/1.1",
        f"Host: {HOST}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def handshake(
    port: int,
    headers: Iterable[tuple[str, str]] = (),
    *,
    local_host: str = HOST,
    rcvbuf: int | None = None,
    timeout: float = 10.0,
) -> Conn:
    """
    Send an opening handshake and read the response head. A 101 leaves the
    connection open; anything else closes it.
    """
    try:
        reader, writer = await asyncio.wait_for(
            open_tcp(port, local_host=local_host, rcvbuf=rcvbuf), timeout
        )
    except (OSError, TimeoutError) as error:
        return Conn(0, {}, error=f"connect: {type(error).__name__}")
    conn = Conn(0, {}, reader, writer)
    try:
        writer.write(upgrade_request(port, headers))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.IncompleteReadError:
        conn.error = "eof"
    except (OSError, TimeoutError, asyncio.LimitOverrunError) as error:
        conn.error = type(error).__name__
    else:
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        conn.status = int(status_line.split()[1])
        for line in header_lines:
            name, colon, value = line.partition(":")
            if colon:
                conn.headers[name.strip().lower()] = value.strip()
    if conn.status != 101:
        conn.close()
    return conn


@dataclass
class Ending:
    """How a connection ended, seen from the client."""

    code: int | None = None  #: the server's close code, if a close frame came
    how: str = ""  #: "close", "eof", "reset" or "timeout"
    frames: int = 0  #: data frames received before the end
    data: int = 0  #: their payload bytes

    def __str__(self) -> str:
        return f"close {self.code}" if self.how == "close" else self.how


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame: opcode and payload."""
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
    elif size == 127:
        (size,) = struct.unpack("!Q", await reader.readexactly(8))
    if second & 0x80:
        await reader.readexactly(4)  # servers do not mask; tolerate it
    return first & 0x0F, await reader.readexactly(size)


async def await_close(conn: Conn, timeout: float, stop_after: int = 0) -> Ending:
    """
    Read frames until the server closes (answering its close frame), the
    connection drops, C{timeout} passes, or C{stop_after} data frames came.
    Pings are answered.
    """
    ending = Ending()
    assert conn.reader is not None
    try:
        async with asyncio.timeout(timeout):
            while True:
                opcode, payload = await read_frame(conn.reader)
                if opcode == CLOSE:
                    ending.code = struct.unpack("!H", payload[:2])[0] if payload else 1005
                    ending.how = "close"
                    if conn.writer is not None and not conn.writer.is_closing():
                        conn.writer.write(client_frame(CLOSE, payload[:2]))
                    break
                if opcode == PING:
                    if conn.writer is not None and not conn.writer.is_closing():
                        conn.writer.write(client_frame(PONG, payload))
                elif opcode < CLOSE:
                    ending.frames += 1
                    ending.data += len(payload)
                    if stop_after and ending.frames >= stop_after:
                        ending.how = "complete"
                        break
    except TimeoutError:
        ending.how = "timeout"
    except asyncio.IncompleteReadError:
        ending.how = "eof"
    except ConnectionResetError:
        ending.how = "reset"
    return ending


def counted(outcomes: Iterable[object]) -> str:
    """C{"429 x950, 101 x50"}: outcomes counted, most frequent first."""
    counts = Counter(str(o) for o in outcomes)
    return ", ".join(f"{name} x{count}" for name, count in counts.most_common())


# -- the well-behaved client (its own process) ---------------------------------


def good_client_main(port: int, control: Connection) -> None:
    """
    The well-behaved client: one message every GOOD_INTERVAL, echoes
    matched by sequence number, tallied per phase. Commands arrive on
    C{control}: C{("phase", name)} and C{("stop",)}; it answers C{("ready",)}
    or C{("failed", why)} once connected, and C{("stats", {...}, why)} at
    the end. Runs in a separate process so that the attacks' client-side
    work does not delay it.
    """
    asyncio.run(_good_client(port, control))


async def _good_client(port: int, control: Connection) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    loop = asyncio.get_running_loop()
    try:
        ws = await connect(
            f"ws://{HOST}:{port}{PATH}",
            additional_headers={"apikey": GOOD_KEY},
            proxy=None,
            open_timeout=10,
        )
    except Exception as error:
        control.send(("failed", repr(error)))
        return
    control.send(("ready",))
    sent: Counter[str] = Counter()
    ok: Counter[str] = Counter()
    late: Counter[str] = Counter()
    worst: dict[str, float] = {}
    pending: dict[int, tuple[str, float]] = {}
    ended: list[str] = []

    async def receive() -> None:
        try:
            async for message in ws:
                entry = pending.pop(int(message), None)
                if entry is not None:
                    name, scheduled = entry
                    latency = loop.time() - scheduled
                    worst[name] = max(worst.get(name, 0.0), latency)
                    if latency <= ECHO_DEADLINE:
                        ok[name] += 1
                    else:
                        late[name] += 1
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
            ended.append(f"good client connection closed ({code})")

    receiver = asyncio.create_task(receive())
    phase = "startup"
    sequence = 0
    tick = loop.time()
    while True:
        command: tuple[str, ...] = ("",)
        while control.poll():
            command = control.recv()
            if command[0] == "phase":
                phase = command[1]
        if command[0] == "stop":
            break
        sequence += 1
        sent[phase] += 1
        # Latency counts from when the message was due, so a stalled send
        # shows up too.
        pending[sequence] = (phase, tick)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(str(sequence))
        tick = max(tick + GOOD_INTERVAL, loop.time() - GOOD_INTERVAL)
        await asyncio.sleep(max(0.0, tick - loop.time()))
    deadline = loop.time() + ECHO_DEADLINE + 1
    while pending and not receiver.done() and loop.time() < deadline:
        await asyncio.sleep(0.02)
    await ws.close()
    receiver.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await receiver
    stats = {
        name: (count, ok[name], late[name], worst.get(name, 0.0) * 1000)
        for name, count in sent.items()
    }
    control.send(("stats", stats, "; ".join(ended)))


# -- the attacks -------------------------------------------------------------


@dataclass
class Outcome:
    """What one attack observed, and whether it was the expected outcome."""

    ok: bool
    observed: str


async def message_flood(port: int) -> Outcome:
    """One connection sends small messages as fast as it can: close 1008."""
    conn = await handshake(port, [("apikey", ATTACKER_KEY)])
    if conn.status != 101:
        return Outcome(False, f"handshake: {conn.outcome}")
    assert conn.writer is not None
    ending_task = asyncio.create_task(await_close(conn, timeout=15))
    batch = client_frame(TEXT, b"x" * 16) * FLOOD_BATCH
    sent = 0
    started = time.monotonic()
    try:
        while not ending_task.done() and sent < FLOOD_MAX_MESSAGES:
            conn.writer.write(batch)
            sent += FLOOD_BATCH
            await asyncio.wait_for(conn.writer.drain(), 5)
    except (OSError, TimeoutError):
        pass
    ending = await ending_task
    took = time.monotonic() - started
    conn.close()
    return Outcome(
        ending.code == 1008,
        f"{ending} after <= {sent} msgs in {took:.2f} s ({ending.frames} echoed)",
    )


def deflate_bomb(size: int) -> bytes:
    """C{size} zero bytes, deflated for permessage-deflate (RFC 7692)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(MIB)
    parts = [compressor.compress(chunk) for _ in range(size // MIB)]
    parts.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    data = b"".join(parts)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


async def compression_bomb(port: int, bomb: bytes) -> Outcome:
    """64 MiB of zeros, ~64 KiB deflated, in one RSV1 frame: close 1009."""
    conn = await handshake(
        port, [("apikey", ATTACKER_KEY), ("Sec-WebSocket-Extensions", "permessage-deflate")]
    )
    if conn.status != 101:
        return Outcome(False, f"handshake: {conn.outcome}")
    if "permessage-deflate" not in conn.headers.get("sec-websocket-extensions", ""):
        conn.close()
        return Outcome(False, "permessage-deflate not negotiated")
    assert conn.writer is not None
    conn.writer.write(client_frame(BINARY, bomb, rsv1=True))
    ending = await await_close(conn, timeout=10)
    conn.close()
    return Outcome(ending.code == 1009, f"{ending} ({len(bomb) // KIB} KiB on the wire)")


async def oversized_message(port: int) -> Outcome:
    """
    A 2 MiB message (limit 1 MiB), sent as one frame and, on another
    connection, as 32 frames of 64 KiB: close 1009 both times.
    """
    payload = bytes(OVERSIZED)
    single = client_frame(BINARY, payload)
    piece = OVERSIZED // 32
    fragmented = b"".join(
        client_frame(
            BINARY if index == 0 else 0x0,
            payload[index : index + piece],
            fin=index + piece >= OVERSIZED,
        )
        for index in range(0, OVERSIZED, piece)
    )
    endings: list[Ending] = []
    for data in (single, fragmented):
        conn = await handshake(port, [("apikey", ATTACKER_KEY)])
        if conn.status != 101:
            return Outcome(False, f"handshake: {conn.outcome}")
        assert conn.writer is not None
        conn.writer.write(data)
        endings.append(await await_close(conn, timeout=10))
        conn.close()
    return Outcome(
        all(ending.code == 1009 for ending in endings),
        f"one frame: {endings[0]}; 32 frames: {endings[1]}",
    )


async def slowloris(port: int) -> Outcome:
    """
    Connections that trickle their handshake, one byte every 250 ms: each is
    dropped after handshake_timeout, without a response.
    """

    async def trickle() -> tuple[str, float]:
        reader, writer = await open_tcp(port)
        started = time.monotonic()
        writer.write(f"GET {PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nX-Slow: ".encode())
        answer = asyncio.create_task(reader.read(4096))
        try:
            while time.monotonic() - started < SLOWLORIS_GRACE:
                done, _ = await asyncio.wait({answer}, timeout=SLOWLORIS_BYTE_EVERY)
                if done:
                    break
                writer.write(b"z")
            if not answer.done():
                answer.cancel()
                return "still open", time.monotonic() - started
            try:
                data = answer.result()
            except ConnectionResetError:
                return "reset", time.monotonic() - started
            return ("eof" if not data else "answered"), time.monotonic() - started
        finally:
            writer.transport.abort()

    results = await asyncio.gather(*(trickle() for _ in range(SLOWLORIS_CONNECTIONS)))
    dropped = [took for how, took in results if how in ("reset", "eof")]
    span = f" after {min(dropped):.2f}-{max(dropped):.2f} s" if dropped else ""
    return Outcome(
        len(dropped) == SLOWLORIS_CONNECTIONS and min(dropped) >= HANDSHAKE_TIMEOUT * 0.9,
        f"{counted(how for how, _ in results)}{span}",
    )


async def header_block(port: int) -> Outcome:
    """Handshakes with a 20 KiB header block (limit 16 KiB): 431."""
    padding = [("apikey", ATTACKER_KEY), ("X-Pad", "a" * HEADER_BLOCK_SIZE)]
    conns = await asyncio.gather(*(handshake(port, padding) for _ in range(HEADER_BLOCK_REQUESTS)))
    outcomes = [conn.outcome for conn in conns]
    return Outcome(all(o == "431" for o in outcomes), counted(outcomes))


async def brute_force(port: int, attacker: str) -> Outcome:
    """
    Wrong keys, one after another, from C{attacker} (127.0.0.3 in the first
    round): 401 up to auth_failures_per_minute, then 429 with Retry-After,
    even for a right key from there; a client from 127.0.0.1 is still let in.
    """
    outcomes: list[str] = []
    retry_after: set[str] = set()
    for attempt in range(BRUTE_FORCE_ATTEMPTS):
        conn = await handshake(port, [("apikey", f"guess-{attempt:03d}")], local_host=attacker)
        outcomes.append(conn.outcome)
        if conn.status == 429:
            retry_after.add(conn.headers.get("retry-after", "missing"))
    right_key_there = await handshake(port, [("apikey", ATTACKER_KEY)], local_host=attacker)
    right_key_here = await handshake(port, [("apikey", ATTACKER_KEY)])
    right_key_there.close()
    right_key_here.close()
    failures = outcomes.count("401")
    # The failure window is a weighted pair of fixed minutes: a minute
    # boundary in the middle of the run may let one more attempt through.
    in_order = outcomes == ["401"] * failures + ["429"] * (len(outcomes) - failures)
    retry_ok = all(value.isdigit() and 1 <= int(value) <= 60 for value in retry_after)
    ok = (
        in_order
        and AUTH_FAILURES_PER_MINUTE <= failures <= AUTH_FAILURES_PER_MINUTE + 1
        and retry_ok
        and right_key_there.status == 429
        and right_key_here.status == 101
    )
    retry = ",".join(sorted(retry_after, key=lambda v: (len(v), v))) or "-"
    return Outcome(
        ok,
        f"{counted(outcomes)} (Retry-After {retry}); right key from {attacker}: "
        f"{right_key_there.outcome}, from {HOST}: {right_key_here.outcome}",
    )


async def crowd(port: int, keys: list[str], abort: bool) -> tuple[list[Conn], list[str], int]:
    """
    Open one connection per key, all at once, hold the accepted ones open
    for CROWD_HOLD seconds, close them (RST when C{abort}), then open
    connections_per_consumer new ones with C{keys[0]} to check that the
    server released the consumer's counter.

    @return: the connections, the release check's outcomes, and how many
        connections were open at the same time.
    """
    conns = await asyncio.gather(*(handshake(port, [("apikey", key)]) for key in keys))
    open_now = sum(1 for conn in conns if conn.status == 101)
    await asyncio.sleep(CROWD_HOLD)
    for conn in conns:
        conn.close(abort=abort)
    await asyncio.sleep(SETTLE)
    again = await asyncio.gather(
        *(handshake(port, [("apikey", keys[0])]) for _ in range(CONNECTIONS_PER_CONSUMER))
    )
    for conn in again:
        conn.close()
    return conns, [conn.outcome for conn in again], open_now


async def crowd_one_consumer(port: int) -> Outcome:
    """1000 connections at once with one key: 50 accepted, 950 refused 429."""
    conns, again, _ = await crowd(port, [CROWD_KEY] * CROWD_CONNECTIONS, abort=False)
    outcomes = [conn.outcome for conn in conns]
    expected = Counter(
        {"101": CONNECTIONS_PER_CONSUMER, "429": CROWD_CONNECTIONS - CONNECTIONS_PER_CONSUMER}
    )
    ok = Counter(outcomes) == expected and all(o == "101" for o in again)
    return Outcome(ok, f"{counted(outcomes)}; after FIN, 50 new: {counted(again)}")


async def crowd_many_consumers(port: int) -> Outcome:
    """
    1000 connections at once, 50 for each of 20 consumers: all accepted
    (max_connections is 2000), held, then reset.
    """
    keys = [flood_key(i % FLOOD_CONSUMERS) for i in range(CROWD_CONNECTIONS)]
    conns, again, open_now = await crowd(port, keys, abort=True)
    outcomes = [conn.outcome for conn in conns]
    ok = open_now == CROWD_CONNECTIONS and all(o == "101" for o in again)
    return Outcome(ok, f"{counted(outcomes)}; after RST, 50 new: {counted(again)}")


async def slow_readers(port: int) -> Outcome:
    """
    Connections that ask for 200 x 64 KiB and stop reading: the server
    closes them (1013) once max_buffered_bytes pile up. A control connection
    that asks for the same and reads gets all of it.
    """
    readers = await asyncio.gather(
        *(
            handshake(port, [("apikey", READER_KEY)], rcvbuf=SLOW_READER_RCVBUF)
            for _ in range(SLOW_READERS)
        )
    )
    control = await handshake(port, [("apikey", READER_KEY)])
    if control.status != 101 or any(conn.status != 101 for conn in readers):
        for conn in [control, *readers]:
            conn.close()
        return Outcome(False, f"handshakes: {counted(c.outcome for c in [control, *readers])}")
    for conn in [*readers, control]:
        assert conn.writer is not None
        conn.writer.write(client_frame(TEXT, b"flood"))

    async def read_then_close() -> tuple[Ending, Ending]:
        got = await await_close(control, 20, stop_after=APP_FLOOD_COUNT)
        if control.writer is None or got.how != "complete":
            return got, got
        control.writer.write(client_frame(CLOSE, close_payload(1000)))
        return got, await await_close(control, 5)

    control_task = asyncio.create_task(read_then_close())
    await asyncio.sleep(SLOW_READER_PAUSE)
    endings = await asyncio.gather(*(await_close(conn, timeout=10) for conn in readers))
    got, got_close = await control_task
    for conn in [*readers, control]:
        conn.close()
    ended = [e for e in endings if e.how in ("close", "eof", "reset")]
    received = [e.data // KIB for e in endings]
    ok = (
        len(ended) == SLOW_READERS
        and all(e.frames < APP_FLOOD_COUNT and (e.how != "close" or e.code == 1013) for e in ended)
        and got.frames == APP_FLOOD_COUNT
        and got_close.code == 1000
    )
    return Outcome(
        ok,
        f"slow: {counted(endings)} (read {min(received)}-{max(received)} KiB of "
        f"{APP_FLOOD_COUNT * APP_FLOOD_SIZE // KIB}); reading control: "
        f"{got.frames}/{APP_FLOOD_COUNT} msgs, then {got_close}",
    )


async def baseline(port: int) -> Outcome:
    """Nothing but the good client, for a second."""
    await asyncio.sleep(1.0)
    return Outcome(True, "-")


# -- the run -----------------------------------------------------------------


@dataclass
class Row:
    """One line of the report."""

    attack: str
    expected: str
    outcome: Outcome
    before: Usage
    after: Usage
    events: Counter[str]
    good: tuple[int, int, int, float] = (0, 0, 0, 0.0)

    @property
    def ok(self) -> bool:
        sent, ok, _, _ = self.good
        return self.outcome.ok and sent == ok and not self.events["ERROR"]


@dataclass
class Run:
    """The server, the good client and the report's rows."""

    server: Server
    control: Connection
    rows: list[Row] = field(default_factory=list)

    async def phase(
        self,
        attack: str,
        expected: str,
        run: Callable[[], Awaitable[Outcome]],
        peak_bound: int = 0,
    ) -> None:
        """Run one attack and record what it and the server showed."""
        self.control.send(("phase", attack))
        await asyncio.sleep(GOOD_INTERVAL)
        mark = len(self.server.lines)
        self.server.reset_peak()
        before = self.server.usage()
        try:
            outcome = await asyncio.wait_for(run(), PHASE_BUDGET)
        except TimeoutError:
            outcome = Outcome(False, f"did not finish within {PHASE_BUDGET:.0f} s")
        await asyncio.sleep(SETTLE)
        after = self.server.usage()
        if peak_bound and after.peak - before.rss > peak_bound:
            outcome.ok = False
            outcome.observed += f"; peak RSS over the {peak_bound // MIB} MiB bound"
        self.rows.append(
            Row(attack, expected, outcome, before, after, tally(self.server.lines[mark:]))
        )
        print(f"  {attack}: {outcome.observed}", file=sys.stderr, flush=True)


def table(rows: list[Row]) -> str:
    """The Markdown report."""

    def mib(size: int) -> str:
        return f"{size / MIB:.1f}"

    lines = [
        "| attack | expected | observed (client side) | server log | RSS before -> after"
        " (peak) MiB | server CPU s | good client echoes ok/sent, max latency |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        sent, ok, late, worst = row.good
        late_note = f" ({late} late)" if late else ""
        events = ", ".join(f"{name} {count}" for name, count in sorted(row.events.items()))
        verdict = "" if row.ok else " **FAIL**"
        lines.append(
            f"| {row.attack}{verdict} | {row.expected} | {row.outcome.observed} | {events or '-'}"
            f" | {mib(row.before.rss)} -> {mib(row.after.rss)} ({mib(row.after.peak)})"
            f" | {row.after.cpu - row.before.cpu:.2f}"
            f" | {ok}/{sent}{late_note}, {worst:.0f} ms |"
        )
    return "\n".join(lines)


async def attack_all(port: int, run: Run, rounds: int) -> None:
    """The attacks, in order, C{rounds} times (to see whether memory keeps growing)."""
    bomb = deflate_bomb(BOMB_SIZE)  # before the clock starts: it takes CPU here
    for index in range(rounds):
        # A fresh attacker address each round: the previous one stays
        # blocked for up to a minute.
        attacker = f"127.0.0.{3 + index}"
        suffix = f" [round {index + 1}]" if rounds > 1 else ""
        phases: list[tuple[str, str, Callable[[], Awaitable[Outcome]], int]] = [
            ("baseline (good client alone)", "-", lambda: baseline(port), 0),
            ("a. message flood", "close 1008", lambda: message_flood(port), 0),
            (
                "b. compression bomb (64 MiB of zeros)",
                f"close 1009, peak RSS +<{BOMB_PEAK_BOUND // MIB} MiB",
                lambda: compression_bomb(port, bomb),
                BOMB_PEAK_BOUND,
            ),
            (
                "c. oversized message (2 MiB)",
                "close 1009 (x2)",
                lambda: oversized_message(port),
                0,
            ),
            (
                f"d. slowloris x{SLOWLORIS_CONNECTIONS}",
                f"all dropped after {HANDSHAKE_TIMEOUT:g} s, no response",
                lambda: slowloris(port),
                0,
            ),
            (
                f"e. 20 KiB header block x{HEADER_BLOCK_REQUESTS}",
                f"431 x{HEADER_BLOCK_REQUESTS}",
                lambda: header_block(port),
                0,
            ),
            (
                f"f. brute force x{BRUTE_FORCE_ATTEMPTS} from {attacker}",
                f"401 x{AUTH_FAILURES_PER_MINUTE}, then 429 + Retry-After; {HOST} unaffected",
                functools.partial(brute_force, port, attacker),
                0,
            ),
            (
                f"g1. {CROWD_CONNECTIONS} connections, one consumer",
                f"101 x{CONNECTIONS_PER_CONSUMER}, "
                f"429 x{CROWD_CONNECTIONS - CONNECTIONS_PER_CONSUMER}; counter released",
                lambda: crowd_one_consumer(port),
                0,
            ),
            (
                f"g2. {CROWD_CONNECTIONS} connections, {FLOOD_CONSUMERS} consumers",
                f"101 x{CROWD_CONNECTIONS} ({CONNECTIONS_PER_CONSUMER}/consumer);"
                " counters released",
                lambda: crowd_many_consumers(port),
                0,
            ),
            (
                f"h. slow readers x{SLOW_READERS} (+1 reading)",
                "slow ones closed (1013 or abort), reader gets all",
                lambda: slow_readers(port),
                SLOW_READER_PEAK_BOUND,
            ),
        ]
        for attack, expected, call, bound in phases:
            await run.phase(attack + suffix, expected, call, bound)


#: Descriptors each process needs: the connection flood holds 1000 sockets
#: open in this process and in the server (which inherits the limit).
FILES_NEEDED = 4096


def raise_file_limit() -> None:
    """Raise the soft limit on open files (inherited by the server) if low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FILES_NEEDED if hard == resource.RLIM_INFINITY else min(FILES_NEEDED, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < FILES_NEEDED:
        print(
            f"stress: only {wanted} open files allowed (ulimit -Hn); the connection"
            " floods may fail",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Stress txwssec's abuse limits against the real twistd wssec."
    )
    parser.add_argument(
        "--server-log", action="store_true", help="print the server's log at the end"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        choices=range(1, 11),
        metavar="N",
        help="run the attacks N times against the same server (1-10; default 1)",
    )
    options = parser.parse_args(argv)
    if not TWISTD.exists():
        print(f"stress: {TWISTD} not found (install Twisted in this Python)", file=sys.stderr)
        return 2
    raise_file_limit()
    started = time.monotonic()
    try:
        rows, status, stopped, notes = _run(options.rounds, options.server_log)
    except RuntimeError as error:
        print(f"stress: {error}", file=sys.stderr)
        return 1
    took = time.monotonic() - started
    print(table(rows))
    print()
    ending = (
        "ended by SIGTERM as twistd does after a clean shutdown"
        if status == -signal.SIGTERM
        else f"exit status {status}"
    )
    print(
        f"Server: twistd wssec {stopped}, {ending}. Run took {took:.0f} s. Good client: one"
        f" message per {GOOD_INTERVAL * 1000:.0f} ms; an echo later than {ECHO_DEADLINE:g} s"
        " counts as missed."
    )
    failed = [row.attack for row in rows if not row.ok] + notes
    if failed:
        print(f"FAILED: {'; '.join(failed)}")
        return 1
    print("All attacks got their expected outcome; the good client got every echo in time.")
    return 0


def _run(rounds: int, show_log: bool) -> tuple[list[Row], int, str, list[str]]:
    """
    Start the server and the good client, run the attacks, stop both.

    @return: the rows, the server's exit status, how it stopped, and
        problems found outside the rows.
    """
    with tempfile.TemporaryDirectory(prefix="txwssec-stress-") as folder:
        port = free_port()
        config = Path(folder) / "stress.toml"
        config.write_text(config_text(port))
        server = Server(config)
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        good = context.Process(target=good_client_main, args=(port, child_end), daemon=True)
        notes: list[str] = []
        try:
            server.wait_listening()
            print(f"stress: twistd wssec pid {server.pid} on {HOST}:{port}", file=sys.stderr)
            good.start()
            if not parent_end.poll(20):
                raise RuntimeError("the good client did not connect")
            answer = parent_end.recv()
            if answer[0] != "ready":
                raise RuntimeError(f"the good client could not connect: {answer[1]}")
            run = Run(server, parent_end)
            asyncio.run(attack_all(port, run, rounds))
            if server.process.poll() is not None:
                notes.append("the server died during the attacks")
            parent_end.send(("stop",))
            if not parent_end.poll(ECHO_DEADLINE + 10):
                raise RuntimeError("the good client did not report")
            _, stats, ended = parent_end.recv()
            if ended:
                notes.append(ended)
            for row in run.rows:
                row.good = stats.get(row.attack, (0, 0, 0, 0.0))
        finally:
            if good.is_alive():
                good.join(5)
            if good.is_alive():
                good.kill()
            status = server.stop()
            if show_log:
                print("".join(server.lines), file=sys.stderr)
    output = "".join(server.lines)
    stopped = "stopped cleanly" if "Server Shut Down." in output else "did NOT stop cleanly"
    if "Server Shut Down." not in output:
        notes.append("the server did not shut down cleanly")
    errors = tally(server.lines)["ERROR"]
    if errors:
        notes.append(f"{errors} error lines in the server log (see --server-log)")
    return run.rows, status, stopped, notes


if __name__ == "__main__":
    sys.exit(main())
