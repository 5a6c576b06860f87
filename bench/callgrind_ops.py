#!/usr/bin/env python3
"""
Instructions per operation of a txwssec server, counted by callgrind:
repeatable on a shared machine, where CPU times move with the load (see
bench/RESULTS.md, "Server hot paths, round 2").

The server (bench.py's configuration) runs under ``valgrind
--tool=callgrind`` with the txwssec of TREE (``PYTHONPATH``); after 20
warm-up operations the counters are zeroed, one ``websockets`` client does
N operations, and the counters are dumped. User space only: the kernel's
work (copies in ``send``/``recv``, accept, close) is not counted.

    python bench/callgrind_ops.py TREE SCENARIO [N]

SCENARIO: ``hs`` (key-auth handshakes), ``hsjwt`` (JWT HS256 handshakes),
``bulk`` (64 KiB binary echoes on one connection), ``bulkt`` (64 KiB text);
the gateway (bench.py's gateway configuration, in front of a raw Autobahn
echo server that is not counted): ``gwhs`` (key-auth handshakes through
it), ``gwecho`` (64 B text echoes on one connection, 4 in flight).
Needs valgrind (``callgrind_control``); a run takes a minute or two.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import websockets

from bench.bench import API_KEY, HOST, TWISTD, Environment, free_port, txwssec_config


def wait_port(port: int, timeout: float = 500) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection((HOST, port), 0.5).close()
            return
        except OSError:
            time.sleep(0.3)
    raise SystemExit("the server did not listen")


async def echoes(url: str, headers: dict[str, str], count: int, text: bool) -> None:
    payload: str | bytes = ("a" * 65536) if text else os.urandom(65536)
    async with websockets.connect(
        url, additional_headers=headers, max_size=None, compression=None
    ) as ws:
        for _ in range(count):
            await ws.send(payload)
            await ws.recv()


async def small_echoes(url: str, headers: dict[str, str], count: int) -> None:
    async with websockets.connect(url, additional_headers=headers, compression=None) as ws:
        for _ in range(count // 4):
            for _ in range(4):
                await ws.send("x" * 64)
            for _ in range(4):
                await ws.recv()


async def handshakes(url: str, headers: dict[str, str], count: int) -> None:
    for _ in range(count):
        async with websockets.connect(url, additional_headers=headers, compression=None):
            pass


def main() -> int:
    tree, scenario = sys.argv[1], sys.argv[2]
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    with tempfile.TemporaryDirectory(prefix="txwssec-callgrind-") as name:
        folder = Path(name)
        env = Environment(folder)
        port = free_port()
        gateway = scenario.startswith("gw")
        upstream = env.autobahn() if gateway else None
        config = folder / "server.toml"
        config.write_text(txwssec_config(port, False, upstream.port if upstream else None, env))
        out = folder / "callgrind.out"
        argv = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            TWISTD,
            "-n",
            "--pidfile=",
            f"--logfile={folder / 'server.log'}",
            "wssec",
            "--config",
            str(config),
        ]
        environ = {**os.environ, "PYTHONPATH": tree, "PYTHONMALLOC": "malloc"}
        server = subprocess.Popen(
            argv, cwd=folder, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        jwt = scenario == "hsjwt"
        headers = {"Authorization": f"Bearer {env.token('HS256')}"} if jwt else {"apikey": API_KEY}
        url = f"ws://{HOST}:{port}{'/gw' if gateway else '/jwt-hs' if jwt else '/key'}"

        def run(n: int) -> None:
            if scenario == "gwecho":
                asyncio.run(small_echoes(url, headers, n))
            elif scenario.startswith("bulk"):
                asyncio.run(echoes(url, headers, n, scenario == "bulkt"))
            else:
                asyncio.run(handshakes(url, headers, n))

        try:
            if upstream is not None:
                upstream.wait_listening()
            wait_port(port)
            run(20)
            control = ["callgrind_control"]
            subprocess.run([*control, "-z", str(server.pid)], check=True, capture_output=True)
            run(count)
            subprocess.run([*control, "-d", str(server.pid)], check=True, capture_output=True)
            time.sleep(1)
        finally:
            server.terminate()
            server.wait(60)
            if upstream is not None:
                upstream.stop()
        dump = out.with_name(out.name + ".1")
        total = 0
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("summary:"):
                total = int(line.split()[1])
        if len(sys.argv) > 4:
            shutil.copy(dump, sys.argv[4])
    print(f"{tree} {scenario} {count}: {total} Ir, {total / count:.0f} Ir/op")
    return 0


if __name__ == "__main__":
    sys.exit(main())
