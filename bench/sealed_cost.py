#!/usr/bin/env python3
"""
What sealed payloads (wssec.sealed.v1, docs/sealed-v1.md) cost the server:
its CPU time per echo on a sealed route against a plain one, for 64 B and
64 KiB messages, through the real C{twistd wssec}.

Run from the repository root::

    python bench/sealed_cost.py            # about 20 seconds
    python bench/sealed_cost.py --messages 20000 --rounds 5

The server runs pinned to CPU 0, this client to CPU 1 (when there are two).
The figure is the server's CPU time (utime + stime from /proc/PID/stat)
per echoed message, measured in alternation (plain, sealed, plain, ...), the
median of the rounds; the client's own sealing is not counted. The targets
of the issue are printed next to the ratios (sealed 64 B <= 1.3x plain,
64 KiB <= 1.5x). The script prints; its exit status is 0 unless something
could not run. All traffic goes to 127.0.0.1; every loop is bounded.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from txwssec.messages import sealing  # noqa: E402

TWISTD = str(Path(sys.executable).parent / "twistd")
API_KEY = "bench-key-0123456789abcdef"
SEAL_KEY = bytes(range(32))
TARGETS = {64: 1.3, 64 * 1024: 1.5}
WINDOW = 16

CONFIG = """
[server]
listen = ["tcp:0:interface=127.0.0.1"]
ping_interval = 0

[[consumer]]
name = "bench"
keys = ["{api_key}"]
seal_keys = ["base64:{seal_key}"]

[[route]]
path = "/plain"
app = "echo"
auth = ["key"]

[[route]]
path = "/sealed"
app = "echo"
auth = ["key"]
sealed = "required"
"""


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(folder: Path) -> tuple[subprocess.Popen[str], int]:
    config = folder / "sealed.toml"
    config.write_text(CONFIG.format(api_key=API_KEY, seal_key=base64.b64encode(SEAL_KEY).decode()))
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def pin() -> None:
        os.sched_setaffinity(0, {0})

    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "wssec", "--config", str(config)],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=pin if (os.cpu_count() or 1) > 1 else None,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 20
    for line in process.stdout:
        found = re.search(r"wssec listening on .*\(127\.0\.0\.1:(\d+)\)", line)
        if found:
            return process, int(found.group(1))
        if time.monotonic() > deadline:
            break
    process.kill()
    raise SystemExit("twistd wssec did not start")


def measure(port: int, pid: int, path: str, size: int, count: int) -> float:
    """Server CPU seconds per echo of C{count} messages of C{size} bytes on C{path}."""
    from websockets.sync.client import connect

    sealed = path == "/sealed"
    handshake = sealing.ClientHandshake(SEAL_KEY, path)
    protocols = [sealing.PROTOCOL, handshake.offer] if sealed else None
    payload = os.urandom(size)
    with connect(
        f"ws://127.0.0.1:{port}{path}",
        additional_headers={"apikey": API_KEY},
        subprotocols=protocols,  # type: ignore[arg-type]
        max_size=2 * size + 1024,
        compression=None,
    ) as ws:
        session = handshake.accept_hello(ws.recv(), True) if sealed else None  # type: ignore[arg-type]
        # Small messages are sealed before the window and opened after it:
        # the client must not be slower on the sealed route, or the server
        # would read fewer messages per batch and pay more per message for
        # it. (64 KiB ones are sealed and opened as they go: memory.)
        ahead = size <= 1024 and session is not None
        sealed_ahead = [session.seal(payload, True) for _ in range(count)] if ahead else []
        replies: list[bytes] = []
        start = cpu_seconds(pid)
        sent = 0
        while sent < count:
            batch = min(WINDOW, count - sent)
            for index in range(sent, sent + batch):
                if ahead:
                    ws.send(sealed_ahead[index])
                else:
                    ws.send(session.seal(payload, True) if session else payload)
            for _ in range(batch):
                answer = ws.recv()
                if ahead:
                    replies.append(answer)  # type: ignore[arg-type]
                elif session is not None:
                    assert session.unseal(answer, True)[0] == payload  # type: ignore[arg-type]
            sent += batch
        used = cpu_seconds(pid) - start
        for answer in replies:
            assert session is not None and session.unseal(answer, True)[0] == payload
    return used / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--messages", type=int, default=20000, help="64 B echoes per window (64 KiB: a fifth)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory() as folder:
        process, port = start_server(Path(folder))
        try:
            rounds = options.rounds
            print(f"server CPU per echo, median of {rounds} rounds (plain/sealed alternating)")
            print(f"{'size':>8} {'plain':>12} {'sealed':>12} {'ratio':>7} {'target':>7}")
            for size, target in TARGETS.items():
                count = options.messages if size <= 1024 else max(500, options.messages // 5)
                measure(port, process.pid, "/plain", size, count // 5)  # warm up
                measure(port, process.pid, "/sealed", size, count // 5)
                plain, sealed = [], []
                for _ in range(options.rounds):
                    plain.append(measure(port, process.pid, "/plain", size, count))
                    sealed.append(measure(port, process.pid, "/sealed", size, count))
                p, s = statistics.median(plain), statistics.median(sealed)
                ratio = s / p if p else float("nan")
                verdict = "ok" if ratio <= target else "OVER"
                print(
                    f"{size:>8} {p * 1e6:>10.1f}us {s * 1e6:>10.1f}us {ratio:>6.2f}x "
                    f"{target:>6.1f}x {verdict}"
                )
        finally:
            process.terminate()
            process.wait(20)


if __name__ == "__main__":
    main()
