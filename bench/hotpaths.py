#!/usr/bin/env python3
"""
Server hot paths (issue 19): txwssec's server CPU per operation against
``websockets`` on uvloop, side by side in one run, and optionally against
another checkout of txwssec (the "before" of a change).

It reuses bench/bench.py's processes, configuration and load generator
(bench/loadgen.py, picows on uvloop, pinned to CPU 1; servers pinned to
CPU 0) and measures, in alternating windows, these scenarios:

- ``hs``: handshakes with key auth (``apikey`` header) and JWT HS256;
- ``echo``: 64 B text echo (50 connections x 8 in flight);
- ``bulk``: 64 KiB binary echo (10 x 2); ``bulkt``: the same, text;
- ``wss``: 64 B text echo over TLS 1.3;
- ``wsshs``: key-auth handshakes over TLS 1.3 (full TLS handshakes, as
  bench.py's "wss hs"); ``wssr``: the same through the load generator's
  resuming client, each offering its last TLS session (bench.py's
  "wss resumed").

Ratios are to ``websockets`` 17 on uvloop (``websockets_echo.py --uvloop``),
as the median of the per-window ratios (each window against the websockets
window of the same cycle), then the median over rounds.

    python bench/hotpaths.py                          # ~3 min
    python bench/hotpaths.py --base /tmp/old-checkout # also the txwssec of that tree
    python bench/hotpaths.py --scenarios echo,bulk --rounds 3
    python bench/hotpaths.py --reactor uvloop         # also txwssec on asyncio+uvloop

The script prints; its exit status does not depend on any number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench import (
    API_KEY,
    BENCH,
    HOST,
    PYTHON,
    Environment,
    ServerProcess,
    Settings,
    Subject,
    _headers,
    echo_spec,
    free_port,
    handshake_spec,
    loadgen,
    running,
)

WS = "websockets (uvloop)"
#: twistd on Twisted's asyncio reactor running a uvloop event loop.
UVLOOP_TWISTD = (
    "import sys, asyncio, uvloop\n"
    "from twisted.internet import asyncioreactor\n"
    "asyncioreactor.install(uvloop.new_event_loop())\n"
    "from twisted.scripts.twistd import run\n"
    "sys.argv[0] = 'twistd'\n"
    "run()\n"
)
SCENARIOS = ("hs", "echo", "bulk", "bulkt", "wss", "wsshs", "wssr")


def websockets_uvloop(env: Environment, tls: bool = False) -> ServerProcess:
    port = free_port()
    argv = [PYTHON, str(BENCH / "servers" / "websockets_echo.py"), "--port", str(port), "--uvloop"]
    if tls:
        argv += ["--cert", str(env.cert), "--key", str(env.key)]
    return ServerProcess("websockets-uvloop", argv, port, env.folder)


def txwssec_variants(
    env: Environment, tls: bool, bases: list[str], reactors: list[str]
) -> list[tuple[str, ServerProcess]]:
    """(label, process) for this tree's txwssec and the optional others."""
    found = [("txwssec", env.txwssec(tls=tls))]
    for base in bases:
        label = f"txwssec {Path(base).name}"
        found.append((label, env.txwssec(tls=tls, env={"PYTHONPATH": base})))
    for reactor in reactors:
        process = env.txwssec(tls=tls)
        process.stop()  # started only for its configuration: restart on another reactor
        if reactor == "uvloop":
            # twistd has no uvloop reactor: Twisted's asyncio reactor on a uvloop loop.
            argv = [PYTHON, "-c", UVLOOP_TWISTD, *process.argv[1:]]
        else:
            argv = [process.argv[0], f"--reactor={reactor}", *process.argv[1:]]
        found.append(
            (f"txwssec -r {reactor}", ServerProcess("txwssec", argv, process.port, env.folder))
        )
    return found


def paired(results: dict[str, Any], label: str) -> float | None:
    mine = results.get(label, {}).get("windows", [])
    theirs = results.get(WS, {}).get("windows", [])
    ratios = [
        a["server_cpu_us_per_op"] / b["server_cpu_us_per_op"]
        for a, b in zip(mine, theirs, strict=False)
        if a.get("server_cpu_us_per_op") and b.get("server_cpu_us_per_op")
    ]
    return statistics.median(ratios) if ratios else None


def split(value: dict[str, Any]) -> str:
    """The server's user / system CPU, faults and switches per operation."""
    windows = value.get("windows", [])
    ops = sum(w.get("ops", 0) for w in windows)
    if not ops or not all("server_user_s" in w for w in windows):
        return ""
    per = {
        key: sum(w[f"server_{key}"] for w in windows) / ops
        for key in ("user_s", "sys_s", "minflt", "vcsw", "ivcsw")
    }
    return (
        f"  user {per['user_s'] * 1e6:6.1f} sys {per['sys_s'] * 1e6:5.1f} us/op"
        f"  minflt {per['minflt']:5.2f} cs {per['vcsw']:4.2f}+{per['ivcsw']:4.2f}/op"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--duration", type=float, default=1.5)
    parser.add_argument(
        "--base",
        action="append",
        default=[],
        help="another checkout's root: its txwssec measured too (repeatable)",
    )
    parser.add_argument(
        "--reactor",
        action="append",
        default=[],
        help="also txwssec under twistd -r REACTOR (asyncio, or uvloop: asyncio on uvloop)",
    )
    parser.add_argument("--json", help="write every window to this file")
    args = parser.parse_args(argv)
    scenarios = [name for name in args.scenarios.split(",") if name]
    defaults = Settings.full(args.rounds)
    settings = Settings(
        args.rounds,
        args.cycles,
        args.duration,
        defaults.warmup,
        *list(defaults.__dict__.values())[4:],
    )
    with open("/proc/loadavg") as handle:
        print("loadavg before:", handle.read().strip(), flush=True)
    started = time.time()
    table: dict[tuple[str, str], list[tuple[float | None, float | None]]] = {}
    raw: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="txwssec-hotpaths-") as folder:
        env = Environment(Path(folder))
        key = _headers(("apikey", API_KEY))
        jwt = _headers(("Authorization", f"Bearer {env.token('HS256')}"))
        for round_no in range(args.rounds):
            for scenario in scenarios:
                tls = scenario.startswith("wss")
                resume = True if scenario == "wssr" else None
                scheme = "wss" if tls else "ws"
                ws = websockets_uvloop(env, tls)
                others = txwssec_variants(env, tls, args.base, args.reactor)
                with running(ws, *(process for _, process in others)):
                    ca = env.ca if tls else None
                    subjects = [
                        Subject(WS, f"{scheme}://{HOST}:{ws.port}/key", key, [ws.pid], ca, resume)
                    ]
                    for label, process in others:
                        url = f"{scheme}://{HOST}:{process.port}"
                        if scenario == "hs":
                            subjects.append(
                                Subject(f"{label} key", f"{url}/key", key, [process.pid])
                            )
                            subjects.append(
                                Subject(f"{label} JWT", f"{url}/jwt-hs", jwt, [process.pid])
                            )
                        else:
                            subjects.append(
                                Subject(label, f"{url}/key", key, [process.pid], ca, resume)
                            )
                    if scenario in ("hs", "wsshs", "wssr"):
                        spec = handshake_spec(settings, subjects)
                    else:
                        spec = echo_spec(
                            settings,
                            subjects,
                            bulk=scenario.startswith("bulk"),
                            binary=scenario == "bulk",
                        )
                    result = loadgen(spec)
                    results = result.get("targets", {})
                    raw.append({"round": round_no, "scenario": scenario, "results": results})
                    for subject in subjects:
                        value = results.get(subject.label, {})
                        us = value.get("server_cpu_us_per_op")
                        ratio = paired(results, subject.label)
                        failures = value.get("failures") or {}
                        table.setdefault((scenario, subject.label), []).append((us, ratio))
                        print(
                            f"  r{round_no} {scenario:6} {subject.label:26} "
                            f"{us or 0:9.1f} us/op  {ratio or 0:5.2f}x ws"
                            + split(value)
                            + (f"  failures {failures}" if failures else ""),
                            flush=True,
                        )
    with open("/proc/loadavg") as handle:
        print("loadavg after:", handle.read().strip())
    print(f"\n{time.time() - started:.0f} s; medians over {args.rounds} round(s)\n")
    print("| scenario | server | server CPU us/op (per round) | ratio to websockets on uvloop |")
    print("|---|---|---:|---:|")
    for (scenario, label), runs in table.items():
        us = [value for value, _ in runs if value]
        ratios = [value for _, value in runs if value]
        shown = ", ".join(f"{value:.1f}" for value in us)
        median_us = statistics.median(us) if us else 0.0
        median_ratio = statistics.median(ratios) if ratios else 0.0
        print(f"| {scenario} | {label} | {median_us:.1f} ({shown}) | {median_ratio:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
