"""
The gateway side by side: nginx in front of raw Autobahn, this tree's
``twistd wssec`` gateway in front of raw Autobahn, and optionally other
checkouts' gateways (``--base DIR``, repeatable: the "before" of a change),
each with its own upstream, measured in alternation by one load generator
session per scenario (bench.py's processes, configuration and load
generator). Prints the server CPU per operation (the proxy and its
upstream; with ``--split``, also each proxy process alone) and the median of
the per-window ratios to nginx + Autobahn.

    python bench/gateway_ab.py                           # hs and echo, 3 rounds
    python bench/gateway_ab.py --base /tmp/old --rounds 5
    python bench/gateway_ab.py --scenarios echo --split
"""

from __future__ import annotations

import argparse
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
    Environment,
    Settings,
    Stack,
    Subject,
    _headers,
    echo_spec,
    handshake_spec,
    loadgen,
    running,
)

NGINX = "nginx + Autobahn"
SCENARIOS = ("hs", "echo")


def paired(results: dict[str, Any], label: str, base: str) -> float | None:
    mine = results.get(label, {}).get("windows", [])
    theirs = results.get(base, {}).get("windows", [])
    ratios = [
        a["server_cpu_us_per_op"] / b["server_cpu_us_per_op"]
        for a, b in zip(mine, theirs, strict=False)
        if a.get("server_cpu_us_per_op") and b.get("server_cpu_us_per_op")
    ]
    return statistics.median(ratios) if ratios else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--duration", type=float, default=1.5)
    parser.add_argument("--base", action="append", default=[], help="another checkout's root")
    parser.add_argument(
        "--bases-only", action="store_true", help="only the --base trees, not this one"
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="also nginx and each gateway process alone (no upstream)",
    )
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
    key = _headers(("apikey", API_KEY))
    with tempfile.TemporaryDirectory(prefix="txwssec-gateway-ab-") as folder:
        env = Environment(Path(folder))
        for round_no in range(args.rounds):
            for scenario in scenarios:
                stack = Stack()
                subjects: list[Subject] = []
                try:
                    front, upstream = stack.nginx(env)
                    subjects.append(
                        Subject(
                            NGINX, f"ws://{HOST}:{front.port}/", key, [front.pid, upstream.pid]
                        )
                    )
                    if args.split:
                        # nginx's master and its worker (a descendant)
                        subjects.append(
                            Subject("nginx alone", f"ws://{HOST}:{front.port}/", key, [front.pid])
                        )
                    trees = [] if args.bases_only else [("gateway", None)]
                    trees += [(Path(b).name, b) for b in args.base]
                    tree: str | None
                    for name, tree in trees:
                        upstream = stack.add(env.autobahn(), wait=True)
                        extra = {"PYTHONPATH": tree} if tree else None
                        proxy = stack.add(
                            env.txwssec(upstream=upstream.port, kind="txwssec-gateway", env=extra)
                        )
                        subjects.append(
                            Subject(
                                f"txwssec {name} + Autobahn",
                                f"ws://{HOST}:{proxy.port}/gw",
                                key,
                                [proxy.pid, upstream.pid],
                            )
                        )
                        if args.split:
                            subjects.append(
                                Subject(
                                    f"txwssec {name} alone",
                                    f"ws://{HOST}:{proxy.port}/gw",
                                    key,
                                    [proxy.pid],
                                )
                            )
                except Exception:
                    stack.stop()
                    raise
                with running(*stack.servers):
                    if scenario == "hs":
                        spec = handshake_spec(settings, subjects)
                    else:
                        spec = echo_spec(settings, subjects)
                    results = loadgen(spec).get("targets", {})
                for subject in subjects:
                    value = results.get(subject.label, {})
                    us = value.get("server_cpu_us_per_op")
                    ratio = paired(results, subject.label, NGINX)
                    failures = value.get("failures") or {}
                    table.setdefault((scenario, subject.label), []).append((us, ratio))
                    with open("/proc/loadavg") as handle:
                        load = handle.read().split()[0]
                    print(
                        f"  r{round_no} {scenario:5} {subject.label:34} "
                        f"{us or 0:9.1f} us/op  {ratio or 0:5.3f}x nginx  load {load}"
                        + (f"  failures {failures}" if failures else ""),
                        flush=True,
                    )
    with open("/proc/loadavg") as handle:
        print("loadavg after:", handle.read().strip())
    print(f"\n{time.time() - started:.0f} s; medians over {args.rounds} round(s)\n")
    print("| scenario | server | CPU µs/op (median) | paired ratio to nginx + Autobahn (median) |")
    print("|---|---|---:|---:|")
    for (scenario, label), values in table.items():
        us = [u for u, _ in values if u]
        ratios = [r for _, r in values if r]
        print(
            f"| {scenario} | {label} | {statistics.median(us) if us else 0:.1f} | "
            f"{statistics.median(ratios) if ratios else 0:.3f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
