#!/usr/bin/env python3
"""
What the Redis state backend (C{[state] backend = "redis"}) costs the
server against the in-memory one: its CPU time per handshake and per echoed
message, through the real C{twistd wssec}, with the limits that go through
the store switched on (C{max_connections_per_ip}, C{auth_failures_per_minute},
C{connections_per_consumer}, consumer message and byte rates).

Run from the repository root (redis-server must be installed; the script
starts its own on a free port, persisting nothing)::

    python bench/state_cost.py                  # about 40 seconds
    python bench/state_cost.py --rounds 7 --handshakes 1000 --messages 20000
    python bench/state_cost.py --base /tmp/txwssec-main   # memory before/after

C{--base DIR} adds a third server: the memory backend of another checkout
(say, the commit before this change, from C{git archive}), to compare the
memory path before and after.

Each server runs pinned to CPU 0, this client to CPU 1 (when there are two).
The figure is the server's CPU time (utime + stime from /proc/PID/stat) per
handshake (open, then close) and per echo (binary 64 B, 16 in flight), the
servers taking turns within each round, the median of the rounds. Redis's
own CPU time per operation is printed too (it is another process: not in
the server's figure). The targets of the issue (redis <= 1.3x memory per
handshake, <= 1.1x per message) are printed next to the ratios. All
traffic goes to 127.0.0.1; every loop is bounded.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")
API_KEY = "bench-key-0123456789abcdef"
TARGETS = {"handshake": 1.3, "message": 1.1}
#: The caps (0: off; set by --caps): with either on, a handshake asks Redis once.
CAPS = {"per_ip": 0, "per_consumer": 0}
WINDOW = 16

CONFIG = """
[server]
listen = ["tcp:0:interface=127.0.0.1:backlog=1024"]
ping_interval = 0
max_connections_per_ip = {per_ip}
auth_failures_per_minute = 1000
{state}
[[consumer]]
name = "bench"
keys = ["{api_key}"]

[[route]]
path = "/echo"
app = "echo"
auth = ["key"]

[route.limits]
connections_per_consumer = {per_consumer}
consumer_messages_per_second = 10000000
consumer_bytes_per_second = 10000000000
"""


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("redis-server did not start")


def start_server(
    folder: Path, name: str, repo: Path, state: str
) -> tuple[subprocess.Popen[str], int]:
    config = folder / f"{name}.toml"
    config.write_text(CONFIG.format(api_key=API_KEY, state=state, **CAPS))
    env = {**os.environ, "PYTHONPATH": str(repo)}

    def pin() -> None:
        os.sched_setaffinity(0, {0})

    log = folder / f"{name}.log"
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "wssec", "--config", str(config)],
        cwd=folder,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=pin if (os.cpu_count() or 1) > 1 else None,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = log.read_text()
        found = re.search(r"wssec listening on .*\(127\.0\.0\.1:(\d+)\)", text)
        ready = "redis" not in state or "wssec state store ready" in text
        if found and ready:
            return process, int(found.group(1))
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"twistd wssec ({name}) did not start:\n{log.read_text()}")


def handshakes(port: int, pid: int, count: int) -> float:
    """Server CPU seconds per handshake (opened, then closed) over C{count}."""
    from websockets.sync.client import connect

    start = cpu_seconds(pid)
    for _ in range(count):
        with connect(
            f"ws://127.0.0.1:{port}/echo",
            additional_headers={"apikey": API_KEY},
            compression=None,
            proxy=None,
        ):
            pass
    return (cpu_seconds(pid) - start) / count


def messages(port: int, pid: int, count: int) -> float:
    """Server CPU seconds per echo of C{count} binary 64 B messages."""
    from websockets.sync.client import connect

    payload = os.urandom(64)
    with connect(
        f"ws://127.0.0.1:{port}/echo",
        additional_headers={"apikey": API_KEY},
        compression=None,
        proxy=None,
    ) as ws:
        start = cpu_seconds(pid)
        sent = 0
        while sent < count:
            batch = min(WINDOW, count - sent)
            for _ in range(batch):
                ws.send(payload)
            for _ in range(batch):
                ws.recv()
            sent += batch
        return (cpu_seconds(pid) - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handshakes", type=int, default=500, help="handshakes per round")
    parser.add_argument("--messages", type=int, default=10000, help="echoes per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--base", type=Path, help="another checkout: its memory backend too")
    parser.add_argument(
        "--caps",
        action="store_true",
        help="max_connections_per_ip and connections_per_consumer on (1000)",
    )
    options = parser.parse_args()
    if options.caps:
        CAPS.update(per_ip=1000, per_consumer=1000)
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        redis, redis_port = start_redis(work)
        servers: dict[str, tuple[subprocess.Popen[str], int]] = {}
        try:
            if options.base is not None:
                servers["memory (base)"] = start_server(work, "base", options.base, "")
            servers["memory"] = start_server(work, "memory", REPO, "")
            state = f'[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:{redis_port}/0"\n'
            servers["redis"] = start_server(work, "redis", REPO, state)
            figures: dict[tuple[str, str], list[float]] = {}
            redis_cpu: dict[str, list[float]] = {"handshake": [], "message": []}
            for process, port in servers.values():  # warm up
                handshakes(port, process.pid, options.handshakes // 5)
                messages(port, process.pid, options.messages // 5)
            for _ in range(options.rounds):
                for name, (process, port) in servers.items():
                    before = cpu_seconds(redis.pid)
                    per = handshakes(port, process.pid, options.handshakes)
                    figures.setdefault((name, "handshake"), []).append(per)
                    if name == "redis":
                        used = cpu_seconds(redis.pid) - before
                        redis_cpu["handshake"].append(used / options.handshakes)
                    before = cpu_seconds(redis.pid)
                    per = messages(port, process.pid, options.messages)
                    figures.setdefault((name, "message"), []).append(per)
                    if name == "redis":
                        used = cpu_seconds(redis.pid) - before
                        redis_cpu["message"].append(used / options.messages)
            load = Path("/proc/loadavg").read_text().split()[:3]
            caps = "on" if options.caps else "off"
            print(
                f"server CPU per operation, median of {options.rounds} rounds"
                f" (servers alternating), caps {caps}; load average {' '.join(load)}"
            )
            print(f"{'operation':<10} {'server':<14} {'CPU/op':>10} {'ratio':>7} {'target':>7}")
            for what in ("handshake", "message"):
                memory = statistics.median(figures["memory", what])
                for name in servers:
                    value = statistics.median(figures[name, what])
                    ratio = value / memory if memory else float("nan")
                    target = ""
                    if name == "redis":
                        ok = "ok" if ratio <= TARGETS[what] else "OVER"
                        target = f"{TARGETS[what]:>6.1f}x {ok}"
                    print(f"{what:<10} {name:<14} {value * 1e6:>8.1f}us {ratio:>6.2f}x {target}")
                spent = statistics.median(redis_cpu[what]) * 1e6
                print(f"{what:<10} {'(redis-server)':<14} {spent:>8.1f}us")
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(20)
            redis.terminate()
            redis.wait(20)


if __name__ == "__main__":
    main()
