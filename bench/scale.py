#!/usr/bin/env python3
"""
Scaling over the cores of one machine: ``twistd wssec`` with ``[server]
workers = 1`` and ``workers = 2`` (issue 17), measured side by side with
bench/bench.py's machinery and load generator (bench/loadgen.py).

Run from the repository root::

    python bench/scale.py                       # 3 rounds, about 2 minutes
    python bench/scale.py --rounds 5
    python bench/scale.py --write bench/RESULTS.md   # (re)writes its "## Workers" section

Each round starts one server of each kind, then the load generator measures
them in alternation (A B A B ...): handshakes (key header: connect, 101,
close) and 64-byte echoes on 50 connections. It reports operations per
second (the throughput, which is what workers are for) and the server's CPU
time per operation (of the supervisor and its workers, from /proc).

Placement: the one-process server is pinned to CPU 0 (as in bench.py); the
supervisor of two workers and its workers may run on CPUs 0 and 1; the load
generator is pinned to CPU 1, so on a 2-core machine it shares a core with
the second worker, and its own CPU use (``loadgen %``) caps what the servers
can be given: read the throughput ratio with it. A third subject, two
workers pinned to CPU 0 only, shows what the supervisor and its log relay
cost per operation, at the same placement as the one process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench import (
    API_KEY,
    HOST,
    TWISTD,
    Environment,
    ServerProcess,
    Settings,
    Subject,
    _headers,
    echo_spec,
    free_port,
    handshake_spec,
    load_average,
    loadgen,
    running,
    txwssec_config,
)
from bench.loadgen import process_tree

#: The section of bench/RESULTS.md this script writes.
HEADING = "## Workers"
#: The subjects: a label, the workers, the CPUs they may use.
KINDS = {
    "workers=1": (1, {0}),
    "workers=2": (2, {0, 1}),
    # The cost of the architecture (supervisor, log relay) without the
    # second core: CPU per operation against workers=1 at equal placement.
    "workers=2, CPU 0 only": (2, {0}),
}


def start(env: Environment, workers: int, cpus: set[int]) -> ServerProcess:
    """A txwssec server with C{workers} workers, on C{cpus}."""
    port = free_port()
    env.counter += 1
    text = txwssec_config(port, False, None, env).replace(
        "[server]\n", f"[server]\nworkers = {workers}\n", 1
    )
    config = env.folder / f"scale-{env.counter}.toml"
    config.write_text(text)
    log = env.folder / f"scale-{env.counter}.log"
    argv = [TWISTD, "-n", "--pidfile=", f"--logfile={log}", "wssec", "--config", str(config)]
    server = ServerProcess(f"workers-{workers}", argv, port, env.folder)
    # Before the supervisor starts its workers (they inherit its CPUs).
    with contextlib.suppress(OSError):
        os.sched_setaffinity(server.pid, cpus)
    if workers > 1:
        deadline = time.monotonic() + 30
        while f"wssec {workers} workers serving" not in _read(log):
            if time.monotonic() > deadline or server.process.poll() is not None:
                server.stop()
                raise RuntimeError(f"workers did not start:\n{_read(log)[-3000:]}")
            time.sleep(0.1)
        for pid in process_tree([server.pid]):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, cpus)
    server.wait_listening()
    return server


def _read(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")
    return ""


def measure(settings: Settings, rounds: int) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Windows of each scenario and subject, over C{rounds} rounds."""
    found: dict[str, dict[str, list[dict[str, Any]]]] = {
        "handshake": {kind: [] for kind in KINDS},
        "echo": {kind: [] for kind in KINDS},
    }
    key = _headers(("apikey", API_KEY))
    with tempfile.TemporaryDirectory(prefix="txwssec-scale-") as folder:
        env = Environment(Path(folder))
        for round_ in range(rounds):
            servers = [start(env, *KINDS[kind]) for kind in KINDS]
            with running(*servers):
                subjects = [
                    Subject(kind, f"ws://{HOST}:{server.port}/key", key, [server.pid])
                    for kind, server in zip(KINDS, servers, strict=True)
                ]
                for scenario, spec in (
                    ("handshake", handshake_spec(settings, subjects)),
                    ("echo", echo_spec(settings, subjects)),
                ):
                    result = loadgen(spec)
                    for kind in KINDS:
                        target = result["targets"][kind]
                        windows = [
                            {
                                **w,
                                "ops_per_s": w["ops"] / w["wall_s"],
                                "server_cpu_pct": w["server_cpu_s"] / w["wall_s"] * 100,
                                "loadgen_cpu_pct": target["loadgen_cpu_pct"],
                            }
                            for w in target["windows"]
                        ]
                        found[scenario][kind].extend(windows)
                        median = statistics.median(w["ops_per_s"] for w in windows)
                        print(
                            f"round {round_ + 1} {scenario:9} {kind:21}:"
                            f" {median:8.0f} ops/s (median of {len(windows)} windows)"
                            f"  loadgen {target['loadgen_cpu_pct']:.0f}%"
                            f"  load {load_average()}"
                            + (
                                f"  failures {target['failures']}"
                                if target.get("failures")
                                else ""
                            ),
                            flush=True,
                        )
    return found


def table(found: dict[str, dict[str, list[dict[str, Any]]]], load: tuple[str, str]) -> str:
    """The Markdown section of the results."""
    lines = [
        HEADING,
        "",
        "Written by bench/scale.py (`python bench/scale.py --write bench/RESULTS.md`).",
        f"Load average (1, 5, 15 min) before: {load[0]}; after: {load[1]}.",
        "",
        "| scenario | server | ops/s (median) | server CPU µs/op (median) | server CPU %"
        " | loadgen CPU % | ops/s vs workers=1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario, by_kind in found.items():
        base = None
        for kind, windows in by_kind.items():
            rate = statistics.median(w["ops_per_s"] for w in windows)
            cpu = statistics.median(w["server_cpu_us_per_op"] or float("nan") for w in windows)
            server = statistics.median(w["server_cpu_pct"] for w in windows)
            own = statistics.median(w["loadgen_cpu_pct"] for w in windows)
            base = base or rate
            lines.append(
                f"| {scenario} | {kind} | {rate:.0f} | {cpu:.1f} | {server:.0f} | {own:.0f}"
                f" | {rate / base:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def write(path: Path, section: str) -> None:
    """Put C{section} in place of the file's "## Workers" section, or at its end."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", type=Path, help="write the section into this file")
    args = parser.parse_args(argv)
    settings = Settings.full(args.rounds)
    before = load_average()
    found = measure(settings, args.rounds)
    section = table(found, (before, load_average()))
    print(section)
    if args.write:
        write(args.write, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
