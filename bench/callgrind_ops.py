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
``bulk`` (64 KiB binary echoes on one connection), ``bulkt`` (64 KiB text),
``echo`` (64 B text echoes on one connection, 4 in flight, as ``gwecho``);
the gateway (bench.py's gateway configuration, in front of a raw Autobahn
echo server that is not counted): ``gwhs`` (key-auth handshakes through
it), ``gwecho`` (64 B text echoes on one connection, 4 in flight);
``wss`` (key-auth handshakes over TLS 1.3, each a full TLS handshake),
``wssr`` (the same, each offering the TLS session of the one before: all
resumed but the first warm-up), ``wss12`` and ``wssr12`` (the same with a
TLS 1.2 client; the listener then takes ``min_version = "1.2"``),
``wssn`` (as ``wss``, but the client ends as picows, bench.py's "wss hs"
client, does: its close_notify after the server's close frame, then it
waits for the server's FIN), ``wssbulk`` (64 KiB binary echoes over TLS
1.3), ``wssecho`` (64 B text
echoes over TLS 1.3 on one connection, 4 in flight, like ``gwecho``).
The wss handshakes are bench/loadgen.py's resuming client's (memory BIOs
on a blocking socket): TLS handshake, the client's Finished and the
upgrade request in one send, 101, a masked close 1000, the server's close
frame, TCP close (no close_notify from the client). (Before round 4 the
Finished and the request left in two sends: the server then read them in
one or two reads, and the counts varied by up to 3% between runs.)
Needs valgrind (``callgrind_control``); a run takes a minute or two. The
server runs with ``PYTHONHASHSEED=0`` unless the environment sets another.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import websockets

from bench.bench import (
    API_KEY,
    HOST,
    ORIGIN,
    TWISTD,
    Environment,
    free_port,
    txwssec_config,
)
from bench.loadgen import _CLOSE_1000, _upgrade_request


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


async def small_echoes(
    url: str, headers: dict[str, str], count: int, context: ssl.SSLContext | None = None
) -> None:
    tls: dict[str, Any] = {} if context is None else {"ssl": context, "origin": ORIGIN}
    async with websockets.connect(url, additional_headers=headers, compression=None, **tls) as ws:
        for _ in range(count // 4):
            for _ in range(4):
                await ws.send("x" * 64)
            for _ in range(4):
                await ws.recv()


async def handshakes(url: str, headers: dict[str, str], count: int) -> None:
    for _ in range(count):
        async with websockets.connect(url, additional_headers=headers, compression=None):
            pass


def tls_client(ca: Path, version: str) -> ssl.SSLContext:
    """The wss client's context: TLS 1.3 (or 1.2 only), the bench CA."""
    context = ssl.create_default_context(cafile=str(ca))
    if version == "1.2":
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def _read_until(tls: ssl.SSLSocket, buffer: bytes, done: Any) -> bytes:
    while not done(buffer):
        chunk = tls.recv(262144)
        if not chunk:
            raise ConnectionError("the server closed the connection early")
        buffer += chunk
    return buffer


def wss_handshakes(
    url: str, headers: dict[str, str], count: int, context: ssl.SSLContext, state: dict[str, Any]
) -> None:
    """
    C{count} wss handshakes as bench/loadgen.py's resuming client makes
    them (memory BIOs: the client's Finished and the upgrade request leave
    in one send, as a browser's do); with C{state["resume"]}, each offers
    the last session (kept in C{state["session"]}); C{state["reused"]}
    counts the resumed ones.
    """
    host, port, request = _upgrade_request(url, [("Origin", ORIGIN), *headers.items()])
    resume = state["resume"]
    session = state.get("session")
    reused = 0
    for _ in range(count):
        with socket.create_connection((host, port)) as raw:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = context.wrap_bio(
                incoming, outgoing, server_hostname="localhost", session=session
            )
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    raw.sendall(outgoing.read())
                    data = raw.recv(262144)
                    if not data:
                        raise ConnectionError("the server closed the connection early") from None
                    incoming.write(data)
            tls.write(request)
            raw.sendall(outgoing.read())  # the Finished and the request
            buffer = _read_bio(raw, tls, incoming, b"", lambda b: b"\r\n\r\n" in b)
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            if head.split(b" ", 2)[1] != b"101":
                raise SystemExit(f"no 101: {head!r}")
            tls.write(_CLOSE_1000)
            raw.sendall(outgoing.read())
            buffer = _read_bio(raw, tls, incoming, buffer, lambda b: len(b) >= 4)
            if buffer[:4] != b"\x88\x02\x03\xe8":
                raise SystemExit(f"expected a close 1000, got {buffer[:4]!r}")
            reused += tls.session_reused
            if state.get("notify"):
                # picows' ending (bench.py's "wss hs"): its close_notify,
                # then the server's FIN
                try:
                    tls.unwrap()
                except ssl.SSLWantReadError:  # pragma: no cover - server's not read yet
                    pass
                raw.sendall(outgoing.read())
                try:
                    while raw.recv(262144):
                        pass
                except ConnectionResetError:  # the server's close timer, under valgrind
                    pass
            if resume:
                session = tls.session
    state["session"], state["reused"] = session, reused


def _read_bio(
    raw: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, buffer: bytes, done: Any
) -> bytes:
    while not done(buffer):
        try:
            buffer += tls.read(262144)
            continue
        except ssl.SSLWantReadError:
            pass
        data = raw.recv(262144)
        if not data:
            raise ConnectionError("the server closed the connection early")
        incoming.write(data)
    return buffer


def wss_echoes(url: str, headers: dict[str, str], count: int, context: ssl.SSLContext) -> None:
    """C{count} 64 KiB binary echoes over TLS on one connection."""
    payload = os.urandom(65536)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    frame = b"\x82\xff" + (65536).to_bytes(8, "big") + mask + masked
    host, port, request = _upgrade_request(url, [("Origin", ORIGIN), *headers.items()])
    with socket.create_connection((host, port)) as raw:
        tls = context.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(request)
        buffer = _read_until(tls, b"", lambda b: b"\r\n\r\n" in b)
        buffer = buffer.partition(b"\r\n\r\n")[2]
        for _ in range(count):
            tls.sendall(frame)
            buffer = _read_until(tls, buffer, lambda b: len(b) >= 10 + 65536)
            if buffer[10 : 10 + 65536] != payload:
                raise SystemExit("wrong echo")
            buffer = buffer[10 + 65536 :]
        tls.sendall(_CLOSE_1000)
        _read_until(tls, buffer, lambda b: len(b) >= 4)


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
        wss = scenario.startswith("wss")
        text = txwssec_config(port, wss, upstream.port if upstream else None, env)
        if scenario.endswith("12"):
            text = text.replace('min_version = "1.3"', 'min_version = "1.2"')
        config.write_text(text)
        out = folder / "callgrind.out"
        argv = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            # full names in every dump, for callgrind_annotate of the copy
            "--compress-strings=no",
            "--compress-pos=no",
            TWISTD,
            "-n",
            "--pidfile=",
            f"--logfile={folder / 'server.log'}",
            "wssec",
            "--config",
            str(config),
        ]
        # One hash seed for every run (unless the caller gives one): the
        # same dict and set layouts each time. Runs of one tree still differ
        # by 0.3-0.9% (the reactor's iterations per operation vary with
        # timing under valgrind).
        environ = {
            "PYTHONHASHSEED": "0",
            **os.environ,
            "PYTHONPATH": tree,
            "PYTHONMALLOC": "malloc",
        }
        server = subprocess.Popen(
            argv, cwd=folder, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        jwt = scenario == "hsjwt"
        headers = {"Authorization": f"Bearer {env.token('HS256')}"} if jwt else {"apikey": API_KEY}
        path = "/gw" if gateway else "/jwt-hs" if jwt else "/key"
        url = f"{'wss' if wss else 'ws'}://{HOST}:{port}{path}"
        context = tls_client(env.ca, "1.2" if scenario.endswith("12") else "1.3")
        state: dict[str, Any] = {
            "resume": scenario.startswith("wssr"),
            "reused": 0,
            "notify": scenario == "wssn",
        }

        def run(n: int) -> None:
            if scenario in ("gwecho", "echo"):
                asyncio.run(small_echoes(url, headers, n))
            elif scenario == "wssecho":
                asyncio.run(small_echoes(url, headers, n, context))
            elif scenario == "wssbulk":
                wss_echoes(url, headers, n, context)
            elif wss:
                wss_handshakes(url, headers, n, context, state)
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
    tls_handshakes = wss and scenario not in ("wssbulk", "wssecho")
    resumed = f" ({state['reused']} of {count} resumed)" if tls_handshakes else ""
    print(f"{tree} {scenario} {count}: {total} Ir, {total / count:.0f} Ir/op{resumed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
