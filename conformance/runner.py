"""
Run the Autobahn conformance suite (driven by kosoku) against txwssec.

    python -m conformance [--cases '1.*,2.*'] [--quick] [--targets ws,gateway]
                          [--parallel 2] [--results DIR] [--write-results FILE]
                          [--timeout SECONDS] [--render-only]

Targets (see README.rst):

- ``baseline``: a plain Autobahn|Python echo server, measured directly;
- ``ws``: ``twistd wssec`` over its ``tcp:`` listener, through the relay;
- ``wss``: ``twistd wssec`` over its TLS listener, through the relay;
- ``gateway``: a ``twistd wssec`` gateway route in front of the baseline;
- ``baseline-client``: a plain Autobahn|Python echo client against kosoku's
  fuzzingserver (the client-mode baseline);
- ``client``: txwssec's client against kosoku's fuzzingserver.

Every process is started here, bound to 127.0.0.1 on a port the OS picks
(each one reports it), and stopped however the run ends.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from conformance.notes import FINDINGS, NOTES
from conformance.report import TargetResult, details, markdown, read_reports, table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGETS = ("baseline", "ws", "wss", "gateway", "baseline-client", "client")
#: What each target's OK count is compared with.
BASELINES = {
    "ws": "baseline",
    "wss": "baseline",
    "gateway": "baseline",
    "client": "baseline-client",
}
DESCRIPTIONS = {
    "baseline": "plain Autobahn|Python echo server (what txwssec builds on), direct",
    "ws": "txwssec echo route, ws:// listener, API key required",
    "wss": "txwssec echo route, TLS listener (wss://), API key required",
    "gateway": "txwssec gateway route (API key) in front of the baseline server",
    "baseline-client": "plain Autobahn|Python echo client against the fuzzingserver",
    "client": "txwssec SecureClientFactory echo client against the fuzzingserver",
}
#: The slow families that --quick leaves out (limits, compression).
SLOW = ("9.*", "12.*", "13.*")
#: Largest message the suite sends (9.1.6 and 9.2.6: 16 MiB), plus room.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024 + 64 * 1024
#: What a process gets to report that it listens.
START_TIMEOUT = 30.0


class RunError(Exception):
    """A process did not start or a target could not run."""


# -- processes ----------------------------------------------------------------------


@dataclass
class Process:
    """A started subprocess, its output going to C{log}."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    _file: IO[bytes]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Wait until the log matches C{pattern}; fail if the process exits."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text())
            if match is not None:
                return match
            if not self.alive():
                raise RunError(
                    f"{self.name} exited with status {self.popen.returncode} before it was "
                    f"ready; see {self.log}:\n{_tail(self.text())}"
                )
            if time.monotonic() > deadline:
                raise RunError(f"{self.name} not ready after {timeout:g} s; see {self.log}")
            time.sleep(0.05)

    def wait(self, timeout: float) -> int | None:
        """Wait for the process to exit; its status, or None on timeout."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it is still there after 10 s."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            if self.wait(10) is None:
                self.popen.kill()
                self.popen.wait()
        self._file.close()


class Processes:
    """Starts subprocesses and stops all of them at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Process] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Process:
        log = self.log_dir / f"{name}.log"
        out = log.open("wb")
        environment = dict(os.environ)
        path = os.pathsep.join(p for p in (str(REPO), environment.get("PYTHONPATH")) if p)
        environment["PYTHONPATH"] = path
        environment["PYTHONUNBUFFERED"] = "1"
        environment.update(env or {})
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=environment,
        )
        process = Process(name, popen, log, out)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        while self.started:
            self.started.pop().stop()


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _executable(name: str) -> list[str]:
    """C{name}'s console script next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    if name == "twistd":
        return [sys.executable, "-m", "twisted"]
    raise RunError(f"{name} not found: pip install -e '.[conformance]'")


# -- the txwssec server ---------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """The running C{twistd wssec}: its ports and its credentials."""

    ws_port: int
    wss_port: int
    ca_file: Path
    key: str


def write_config(folder: Path, key: str, upstream_port: int | None) -> Path:
    """
    The conformance configuration: the echo route with security on, limits
    raised only as far as the suite needs, and a gateway route.
    """
    from txwssec.consumers import key_digest
    from txwssec.devcert import write_dev_certificates

    write_dev_certificates(folder / "certs")
    route_settings = f"""\
auth = ["key"]
compression = true
# 9.* sends messages of up to 16 MiB.
max_message_size = {MAX_MESSAGE_SIZE}

[route.limits]
# 9.3.* and 9.4.* fragment a 4 MiB message into 64-byte frames (65536 of
# them); 9.* echoes 16 MiB faster than a slow peer may read it.
max_fragments = 1_000_000
max_buffered_bytes = {64 * 1024 * 1024}
"""
    gateway = ""
    if upstream_port is not None:
        gateway = f"""
[[route]]
path = "/gw"
upstream = "ws://127.0.0.1:{upstream_port}/"
{route_settings}"""
    text = f"""\
# Written by python -m conformance. Everything not set here is at its default
# (Origin policy, handshake timeout, header limits, auth failure limits...).

[server]
listen = ["tcp:0:interface=127.0.0.1", "tls:0:interface=127.0.0.1"]
# No unsolicited pings: the suite counts every frame it receives, so an
# automatic ping in the middle of a case would make it fail.
ping_interval = 0

[tls]
cert = "certs/server.pem"
key = "certs/server.key"

[auth.key]
header = "apikey"

[[consumer]]
name = "conformance"
keys = ["sha256:{key_digest(key).hex()}"]

[[route]]
path = "/"
app = "echo"
{route_settings}{gateway}"""
    config = folder / "conformance.toml"
    config.write_text(text, encoding="utf-8")
    return config


def start_server(
    processes: Processes, folder: Path, upstream_port: int | None
) -> tuple[Process, Server]:
    key = secrets.token_urlsafe(24)
    config = write_config(folder, key, upstream_port)
    twistd = _executable("twistd")
    process = processes.start(
        "twistd-wssec", [*twistd, "-n", "--pidfile=", "wssec", "--config", str(config)]
    )
    listening = r"wssec listening on {kind}:0\S* \(127\.0\.0\.1:(\d+)\)"
    ws_port = int(process.wait_for(listening.format(kind="tcp")).group(1))
    wss_port = int(process.wait_for(listening.format(kind="tls")).group(1))
    return process, Server(ws_port, wss_port, folder / "certs" / "ca.pem", key)


def start_python(
    processes: Processes, name: str, script: str, *args: str, **env: str
) -> tuple[Process, int]:
    """Start one of this folder's programs; it and the port it reports."""
    process = processes.start(name, [sys.executable, str(HERE / script), *args], env)
    return process, int(process.wait_for(r"^LISTENING (\d+)$").group(1))


def start_relay(
    processes: Processes, name: str, server: Server, *, tls: bool = False, path: str = "/"
) -> tuple[Process, int]:
    args = ["--target-port", str(server.wss_port if tls else server.ws_port), "--path", path]
    if tls:
        args += ["--tls-ca", str(server.ca_file), "--tls-hostname", "localhost"]
    return start_python(processes, name, "relay.py", *args, CONFORMANCE_API_KEY=server.key)


# -- kosoku -------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    include: tuple[str, ...]
    exclude: tuple[str, ...]

    def arguments(self) -> list[str]:
        args = []
        for case in self.include:
            args += ["-i", case]
        for case in self.exclude:
            args += ["-x", case]
        return args


def fuzzingclient(
    processes: Processes,
    name: str,
    port: int,
    selection: Selection,
    parallel: int,
    outdir: Path,
    timeout: float,
) -> None:
    """Run kosoku against C{127.0.0.1:port}; reports into C{outdir}."""
    argv = [*_executable("kosoku"), f"127.0.0.1:{port}", "-p", str(parallel), "-o", str(outdir)]
    process = processes.start(f"kosoku-{name}", argv + selection.arguments())
    if process.wait(timeout) is None:
        process.stop()
        raise RunError(f"kosoku did not finish within {timeout:g} s; see {process.log}")


def fuzzingserver(
    processes: Processes,
    name: str,
    selection: Selection,
    outdir: Path,
    timeout: float,
    plain: bool = False,
) -> Process:
    """
    Run kosoku's fuzzingserver and the client testee (txwssec's, or with
    C{plain} Autobahn's) against it; the testee's process.
    """
    argv = [*_executable("kosoku"), "-m", "fuzzingserver", "127.0.0.1:0", "-o", str(outdir)]
    server = processes.start(f"kosoku-{name}", argv + selection.arguments())
    url = server.wait_for(r"fuzzingserver listening on (ws://127\.0\.0\.1:\d+)").group(1)
    testee_argv = [sys.executable, str(HERE / "client_testee.py"), "--url", url]
    if plain:
        testee_argv += ["--plain", "--agent", "autobahn"]
    testee = processes.start(f"{name}-testee", testee_argv)
    deadline = time.monotonic() + timeout
    try:
        status = testee.wait(timeout)
        if status is None:
            raise RunError(f"the client testee did not finish within {timeout:g} s")
        if status != 0:
            raise RunError(f"the client testee exited with status {status}; see {testee.log}")
        if server.wait(max(10.0, deadline - time.monotonic())) is None:
            raise RunError(f"kosoku's fuzzingserver did not exit; see {server.log}")
    finally:
        testee.stop()
        server.stop()
    return testee


def server_warnings(process: Process | None) -> list[str]:
    """Tracebacks and unhandled errors in a server's log."""
    if process is None:
        return []
    text = process.text()
    found = len(re.findall(r"Traceback \(most recent call last\)|Unhandled [Ee]rror", text))
    if not found:
        return []
    where = f"{process.log.parent.name}/{process.log.name}"
    return [f"{found} traceback(s) or unhandled error(s) in {where} (under --results)"]


# -- the run ----------------------------------------------------------------------------


@dataclass
class Options:
    targets: tuple[str, ...]
    selection: Selection
    parallel: int
    results: Path
    write_results: Path | None
    timeout: float
    command: str
    render_only: bool = False


def parse(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m conformance",
        description="Run the Autobahn conformance suite (kosoku) against txwssec.",
    )
    parser.add_argument(
        "--cases", default="", help="comma-separated case ids or globs, e.g. '1.*,2.*'"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"leave out the slow {', '.join(SLOW)} families"
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated, from {','.join(TARGETS)} (default: all)",
    )
    parser.add_argument(
        "--parallel", type=int, default=2, help="cases at once (server targets; default 2)"
    )
    parser.add_argument(
        "--results", type=Path, default=HERE / "results", help="report folder (git-ignored)"
    )
    parser.add_argument(
        "--write-results", type=Path, metavar="FILE", help="write the markdown summary here"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3600,
        help="seconds each target may take (default 3600)",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="run nothing: summarise the last run found in --results again "
        "(e.g. to rewrite --write-results after editing notes.py)",
    )
    args = parser.parse_args(argv)
    if args.render_only and args.write_results is None:
        parser.error("--render-only needs --write-results FILE")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        parser.error(f"--targets: unknown {unknown} (known: {', '.join(TARGETS)})")
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    include = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    exclude = SLOW if args.quick else ()
    return Options(
        targets=tuple(t for t in TARGETS if t in targets),
        selection=Selection(include, exclude),
        parallel=args.parallel,
        results=args.results.resolve(),
        write_results=args.write_results,
        timeout=args.timeout,
        command=shlex.join(["python", "-m", "conformance", *argv]),
        render_only=args.render_only,
    )


def run(options: Options) -> list[TargetResult]:
    results_dir = options.results
    log_dir = results_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = Processes(log_dir)
    results: list[TargetResult] = []
    with tempfile.TemporaryDirectory(prefix="txwssec-conformance-") as temp:
        try:
            results = _run_targets(options, processes, Path(temp))
        finally:
            processes.stop_all()
    return results


def _run_targets(options: Options, processes: Processes, temp: Path) -> list[TargetResult]:
    targets = options.targets
    results = [TargetResult(name, DESCRIPTIONS[name]) for name in targets]
    by_name = {r.name: r for r in results}
    baseline_port: int | None = None
    server: Server | None = None
    twistd: Process | None = None
    baseline: Process | None = None

    def fail_all(error: str, names: Sequence[str]) -> None:
        for name in names:
            by_name[name].error = error

    if {"baseline", "gateway"} & set(targets):
        try:
            baseline, baseline_port = start_python(processes, "baseline-echo", "baseline_echo.py")
        except RunError as error:
            fail_all(str(error), [t for t in targets if t in ("baseline", "gateway")])
    if {"ws", "wss", "gateway"} & set(targets):
        try:
            twistd, server = start_server(processes, temp, baseline_port)
        except RunError as error:
            fail_all(str(error), [t for t in targets if t in ("ws", "wss", "gateway")])

    for result in results:
        if not result.ran:
            continue
        name = result.name
        outdir = options.results / name
        shutil.rmtree(outdir, ignore_errors=True)
        print(f"== {name}: {result.description}", flush=True)
        started = time.monotonic()
        relay: Process | None = None
        testee: Process | None = None
        try:
            if name in ("client", "baseline-client"):
                testee = fuzzingserver(
                    processes,
                    name,
                    options.selection,
                    outdir,
                    options.timeout,
                    plain=name == "baseline-client",
                )
            else:
                if name == "baseline":
                    assert baseline_port is not None
                    port = baseline_port
                else:
                    assert server is not None
                    if name == "gateway" and baseline_port is None:
                        raise RunError("the gateway's upstream did not start")
                    relay, port = start_relay(
                        processes,
                        f"relay-{name}",
                        server,
                        tls=name == "wss",
                        path="/gw" if name == "gateway" else "/",
                    )
                fuzzingclient(
                    processes,
                    name,
                    port,
                    options.selection,
                    options.parallel,
                    outdir,
                    options.timeout,
                )
            result.cases = read_reports(outdir)
        except RunError as error:
            result.error = str(error)
        except FileNotFoundError:
            result.error = f"kosoku wrote no report in {outdir}"
        finally:
            result.duration = time.monotonic() - started
            if relay is not None:
                processes.started.remove(relay)
                relay.stop()
        if name in ("ws", "wss", "gateway"):
            result.warnings += server_warnings(twistd)
        if name in ("baseline", "gateway"):
            result.warnings += server_warnings(baseline)
        result.warnings += server_warnings(testee)
        print(f"   {name}: {_counts_line(result)}", flush=True)
    return results


def _counts_line(result: TargetResult) -> str:
    if not result.ran:
        return f"DID NOT RUN: {result.error}"
    counts = result.counts()
    parts = [f"{counts[c]} {c}" for c in ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED")]
    parts.append(f"{counts['FAILED']} FAILED")
    return f"{len(result.cases)} cases: " + ", ".join(parts) + f" in {result.duration:.0f} s"


def versions() -> list[tuple[str, str]]:
    def version(distribution: str) -> str:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            return "not installed"

    import txwssec

    return [
        ("Python", platform.python_version()),
        ("Twisted", version("twisted")),
        ("Autobahn", version("autobahn")),
        ("txwssec", txwssec.__version__),
        ("kosoku", version("kosoku")),
        ("OpenSSL", ssl.OPENSSL_VERSION),
        ("machine", f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"),
    ]


def results_header(run: dict[str, Any]) -> list[str]:
    """The top of RESULTS.md, from a run's record (see L{record})."""
    selection = Selection(tuple(run["include"]), tuple(run["exclude"]))
    lines = [
        "# Autobahn conformance results",
        "",
        "Written by `python -m conformance --write-results` (see README.rst); "
        "do not edit by hand: the explanations live in `conformance/notes.py`.",
        "",
        f"- Date: {run['started']} UTC",
        f"- Command: `{run['command']}`",
        f"- Cases: {_selection_text(selection)}; {run['parallel']} at once on the server targets",
    ]
    lines += [f"- {name}: {value}" for name, value in run["versions"]]
    return lines


def record(options: Options, started: datetime.datetime, results: Sequence[TargetResult]) -> None:
    """Keep what RESULTS.md needs besides the reports in C{results/run.json}."""
    run = {
        "started": f"{started:%Y-%m-%d %H:%M}",
        "command": options.command,
        "include": list(options.selection.include),
        "exclude": list(options.selection.exclude),
        "parallel": options.parallel,
        "versions": versions(),
        "targets": [
            {
                "name": r.name,
                "description": r.description,
                "duration": r.duration,
                "error": r.error,
                "warnings": r.warnings,
            }
            for r in results
        ],
    }
    path = options.results / "run.json"
    path.write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")


def replay(options: Options) -> tuple[dict[str, Any], list[TargetResult]]:
    """The last run's record and results, read back from C{--results}."""
    path = options.results / "run.json"
    try:
        run: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"no run recorded in {options.results}") from None
    results = []
    for saved in run["targets"]:
        result = TargetResult(
            saved["name"],
            saved["description"],
            duration=saved["duration"],
            error=saved["error"],
            warnings=list(saved["warnings"]),
        )
        if result.ran:
            result.cases = read_reports(options.results / result.name)
        results.append(result)
    return run, results


def _selection_text(selection: Selection) -> str:
    text = ", ".join(selection.include) if selection.include else "the whole suite"
    if selection.exclude:
        text += f" except {', '.join(selection.exclude)}"
    return text


@contextmanager
def _interrupts_as_exceptions() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C does, so every process is stopped."""

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(list(sys.argv[1:] if argv is None else argv))
    if options.render_only:
        try:
            recorded, results = replay(options)
        except RunError as error:
            print(error, file=sys.stderr)
            return 2
    else:
        started = datetime.datetime.now(datetime.UTC)
        try:
            with _interrupts_as_exceptions():
                results = run(options)
        except KeyboardInterrupt:
            print("interrupted: every process was stopped", file=sys.stderr)
            return 130
        record(options, started, results)
        recorded = json.loads((options.results / "run.json").read_text(encoding="utf-8"))
    print()
    for line in table(results):
        print(line)
    by_name = {r.name: r for r in results if r.ran}
    for result in results:
        for line in details(result):
            print(line)
        baseline = by_name.get(BASELINES.get(result.name, ""))
        if baseline is not None and result.ran:
            ok, base_ok = result.counts()["OK"], baseline.counts()["OK"]
            if set(result.cases) == set(baseline.cases) and ok < base_ok:
                print(f"{result.name}: {ok} OK, fewer than {baseline.name}'s {base_ok}")
    print(f"reports: {options.results}")
    if options.write_results is not None:
        text = markdown(results, results_header(recorded), NOTES, FINDINGS)
        options.write_results.write_text(text, encoding="utf-8")
        print(f"wrote {options.write_results}")
    # The baselines measure Autobahn alone: their FAILED cases are reported,
    # not held against txwssec (a baseline that did not run still fails).
    failed = any(
        not r.ran or (r.counts()["FAILED"] and not r.name.startswith("baseline")) for r in results
    )
    return 1 if failed else 0
