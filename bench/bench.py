#!/usr/bin/env python3
"""
Benchmarks: txwssec's security layer against the Autobahn it builds on, and
against the servers a Python user would otherwise pick (see bench/README.rst).

Run from the repository root::

    python bench/bench.py                       # everything, about 8 minutes
    python bench/bench.py --quick               # smaller, about 2 minutes
    python bench/bench.py --scenarios handshake,echo --rounds 3
    python bench/bench.py --write bench/RESULTS.md

Every server runs in its own process pinned to CPU 0, the load generator
(bench/loadgen.py) in one process pinned to CPU 1. The figure that matters is
the server's CPU time per operation, read from /proc/PID/stat by the load
generator at the start and end of each measured window: it is far less
sensitive than wall time to whatever else runs on the machine. Servers are
measured in alternation (A B A B ...) within one session, and every ratio is
to raw Autobahn measured in that same session.

The script prints; it never fails because of a number (exit status 0 unless
something could not run at all). All traffic goes to 127.0.0.1; every run is
bounded in count and time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PYTHON = sys.executable
TWISTD = str(Path(PYTHON).parent / "twistd")
HOST = "127.0.0.1"
SERVER_CPU = 0
LOADGEN_CPU = 1
KIB = 1024
TIMES = "\N{MULTIPLICATION SIGN}"
MICRO = "\N{MICRO SIGN}"

ORIGIN = "https://app.example.com"
API_KEY = "bench-key-0123456789abcdef"
CONSUMER = "bench"
JWT_SECRET = "bench-secret-0123456789abcdef0123456789"
#: The load generator's own CPU beyond which a run is flagged as saturated.
SATURATED = 90.0

SCENARIOS = (
    "handshake",
    "echo",
    "bulk",
    "idle",
    "tls",
    "gateway",
    "expiry",
    "accel",
    "ops",
    "profile",
)


# -- settings ------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    rounds: int  #: fresh server processes per scenario, measured A B A B
    cycles: int  #: within a round, the subjects are measured in turn this many times
    duration: float  #: measured seconds per window
    warmup: float  #: seconds after switching subject before a window opens
    handshake_concurrency: int
    echo_connections: int
    echo_inflight: int
    bulk_connections: int
    bulk_inflight: int
    idle_connections: int
    expiry_connections: int
    expiry_window: float
    profile_seconds: float

    @classmethod
    def full(cls, rounds: int) -> Settings:
        return cls(rounds, 3, 1.5, 0.4, 16, 50, 8, 10, 2, 5000, 10000, 1.0, 8.0)

    @classmethod
    def quick(cls, rounds: int) -> Settings:
        return cls(rounds, 2, 0.75, 0.3, 16, 50, 8, 10, 2, 1000, 2000, 1.0, 4.0)


# -- processes -------------------------------------------------------------------


def _pinned(cpu: int) -> Callable[[], None]:
    """A preexec_fn: pin the child to C{cpu} and raise its open-file limit."""

    def setup() -> None:
        if hasattr(os, "sched_setaffinity"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {cpu})
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    return setup


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """One server process, pinned to CPU 0, its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        workdir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = workdir / f"{name}-{port}.out"
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO), full_env.get("PYTHONPATH")])
        )
        full_env.update(env or {})
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            argv,
            cwd=workdir,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_pinned(SERVER_CPU),
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with socket.socket() as probe:
                probe.settimeout(0.5)
                if probe.connect_ex((HOST, self.port)) == 0:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not start listening on {self.port}:\n{self.output()}")

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


class Environment:
    """The temporary folder with certificates, keys and configurations."""

    def __init__(self, folder: Path) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from txwssec.devcert import write_dev_certificates

        self.folder = folder
        write_dev_certificates(folder / "certs")
        self.cert = folder / "certs" / "server.pem"
        self.key = folder / "certs" / "server.key"
        self.ca = folder / "certs" / "ca.pem"
        es_key = ec.generate_private_key(ec.SECP256R1())
        self.es_private_pem = es_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (folder / "es256-public.pem").write_bytes(
            es_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        self.commands: dict[str, str] = {}
        self.configs: dict[str, str] = {}
        self.counter = 0
        #: Run txwssec with Python's own cycle collector settings
        #: (gc_young_threshold = 0) instead of twistd wssec's tuning.
        self.python_gc = False

    def token(self, algorithm: str, lifetime: float = 7200) -> str:
        import jwt

        claims = {"sub": CONSUMER, "exp": int(time.time() + lifetime)}
        if algorithm == "HS256":
            return jwt.encode(claims, JWT_SECRET, algorithm="HS256")
        return jwt.encode(claims, self.es_private_pem, algorithm="ES256")

    def _remember(self, kind: str, argv: list[str], config: str | None = None) -> None:
        shown = shlex.join(argv).replace(str(self.folder), "$TMP").replace(str(REPO) + "/", "")
        self.commands.setdefault(kind, shown)
        if config is not None:
            self.configs.setdefault(kind, config.replace(str(self.folder), "$TMP"))

    # -- the servers ------------------------------------------------------

    def autobahn(self, tls: bool = False) -> ServerProcess:
        port = free_port()
        argv = [PYTHON, str(BENCH / "servers" / "autobahn_echo.py"), "--port", str(port)]
        if tls:
            argv += ["--cert", str(self.cert), "--key", str(self.key)]
        self._remember("autobahn-tls" if tls else "autobahn", argv)
        return ServerProcess("autobahn", argv, port, self.folder)

    def websockets(self, tls: bool = False) -> ServerProcess:
        """websockets on uvloop, with the key, JWT, Origin and size checks."""
        port = free_port()
        argv = [
            PYTHON,
            str(BENCH / "servers" / "websockets_echo.py"),
            "--port",
            str(port),
            "--loop",
            "uvloop",
        ]
        if tls:
            argv += ["--cert", str(self.cert), "--key", str(self.key)]
        self._remember("websockets-tls" if tls else "websockets", argv)
        return ServerProcess("websockets", argv, port, self.folder)

    def txwssec(
        self,
        tls: bool = False,
        upstream: int | None = None,
        env: dict[str, str] | None = None,
        kind: str = "txwssec",
        extra: str = "",
    ) -> ServerProcess:
        port = free_port()
        self.counter += 1
        text = txwssec_config(port, tls, upstream, self) + extra
        config = self.folder / f"txwssec-{self.counter}.toml"
        config.write_text(text)
        argv = [
            TWISTD,
            "-n",
            "--pidfile=",
            f"--logfile={self.folder / f'txwssec-{self.counter}.log'}",
            "wssec",
            "--config",
            str(config),
        ]
        self._remember(kind, argv, text)
        return ServerProcess("txwssec", argv, port, self.folder, env)

    def nginx(self, upstream: int, tls: bool = False) -> ServerProcess:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        port = free_port()
        prefix = self.folder / f"nginx-{port}"
        prefix.mkdir()
        text = nginx_config(port, upstream, prefix, (self.cert, self.key) if tls else None)
        (prefix / "nginx.conf").write_text(text)
        argv = [
            binary,
            "-p",
            str(prefix),
            "-c",
            str(prefix / "nginx.conf"),
            "-e",
            str(prefix / "error.log"),
            "-g",
            "daemon off;",
        ]
        self._remember("nginx-tls" if tls else "nginx", argv, text)
        return ServerProcess("nginx", argv, port, self.folder)


def txwssec_config(port: int, tls: bool, upstream: int | None, env: Environment) -> str:
    """
    The txwssec configuration: key auth (header and subprotocol), JWT HS256
    and ES256, an Origin list, every route limit on with generous values,
    max_lifetime (an expiry timer per session) and idle_timeout (a timer per
    session) on every route, auto-ping on (txwssec's default, 30 s).
    """
    listen = (
        f"tls:{port}:interface={HOST}:backlog=1024"
        if tls
        else (f"tcp:{port}:interface={HOST}:backlog=1024")
    )
    tls_table = (
        f'[tls]\ncert = "{env.cert}"\nkey = "{env.key}"\nmin_version = "1.3"\n\n' if tls else ""
    )
    common = f"""\
allowed_origins = ["{ORIGIN}", "https://admin.example.com"]
max_message_size = 1048576
max_lifetime = 3600
idle_timeout = 600

[route.limits]
messages_per_second = 1000000
burst = 2000000
bytes_per_second = 10000000000
consumer_messages_per_second = 10000000
consumer_bytes_per_second = 100000000000
connections_per_consumer = 100000
max_buffered_bytes = 4194304
max_fragments = 1024
max_pending_control_frames = 32
"""
    if upstream is not None:
        routes = f"""\
[[route]]
path = "/gw"
upstream = "ws://{HOST}:{upstream}/"
auth = ["key"]
{common}"""
        auths = '[auth.key]\nheader = "apikey"\nsubprotocol = "token"\n'
    else:
        routes = "".join(
            f'[[route]]\npath = "{path}"\napp = "echo"\nauth = ["{auth}"]\n{common}\n'
            for path, auth in (
                ("/anon", "anonymous"),
                ("/key", "key"),
                ("/jwt-hs", "jwt"),
                ("/jwt-es", "jwt_es"),
            )
        )
        auths = f"""\
[auth.anonymous]

[auth.key]
header = "apikey"
subprotocol = "token"

[auth.jwt]
algorithms = ["HS256"]
secret = "{JWT_SECRET}"

[auth.jwt_es]
builder = "txwssec.auth.jwt:build"
algorithms = ["ES256"]
public_key = "es256-public.pem"
"""
    gc_line = "gc_young_threshold = 0\n" if env.python_gc else ""
    return f"""\
# Written by bench/bench.py.
[server]
listen = ["{listen}"]
{gc_line}handshake_timeout = 5
max_connections = 30000
max_connections_per_ip = 0
auth_failures_per_minute = 10
ping_interval = 30
ping_timeout = 10

{tls_table}{auths}
[[consumer]]
name = "{CONSUMER}"
keys = ["{API_KEY}"]

{routes}"""


def nginx_config(
    port: int, upstream: int, prefix: Path, tls: tuple[Path, Path] | None = None
) -> str:
    """
    nginx as a WebSocket reverse proxy with an apikey check (401); with
    C{tls} (certificate, key) it terminates TLS 1.3 (session tickets on, as
    nginx's default) in front of the plain upstream.
    """
    listen = f"{HOST}:{port} backlog=1024"
    tls_lines = ""
    if tls is not None:
        listen = f"{HOST}:{port} ssl backlog=1024"
        tls_lines = (
            f"        ssl_certificate {tls[0]};\n"
            f"        ssl_certificate_key {tls[1]};\n"
            "        ssl_protocols TLSv1.3;\n"
            "        ssl_session_tickets on;\n"
        )
    return f"""\
# Written by bench/bench.py.
worker_processes 1;
worker_rlimit_nofile 20000;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
user root;

events {{
    worker_connections 16000;
}}

http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    map $http_apikey $apikey_ok {{
        default 0;
        "{API_KEY}" 1;
    }}

    server {{
        listen {listen};
{tls_lines}
        location / {{
            if ($apikey_ok = 0) {{
                return 401;
            }}
            proxy_pass http://{HOST}:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_set_header apikey "";
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


@contextlib.contextmanager
def running(*servers: ServerProcess) -> Iterator[list[int]]:
    """Wait until each server listens; stop them all afterwards."""
    try:
        for server in servers:
            server.wait_listening()
        time.sleep(0.3)
        yield [server.pid for server in servers]
    finally:
        for server in reversed(servers):
            server.stop()


def loadgen(spec: dict[str, Any], timeout: float = 400) -> dict[str, Any]:
    """Run bench/loadgen.py pinned to CPU 1 with C{spec}; its JSON result."""
    spec = {**spec, "cpu": LOADGEN_CPU}
    process = subprocess.run(
        [PYTHON, str(BENCH / "loadgen.py")],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_pinned(LOADGEN_CPU),
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"loadgen failed ({process.returncode}):\n{process.stderr[-3000:]}")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


# -- results -------------------------------------------------------------------


@dataclass
class Row:
    """One subject of one scenario: its runs, one per round."""

    scenario: str
    subject: str
    unit: str  #: "handshake", "message", "connection", "session"
    runs: list[dict[str, Any]] = field(default_factory=list)
    #: server CPU per op of each window over the baseline's window of the same cycle
    paired: list[float] = field(default_factory=list)
    note: str = ""
    missing: str = ""  #: why it was not measured

    @property
    def paired_ratio(self) -> float | None:
        """The median of the paired per-window ratios to the baseline."""
        return statistics.median(self.paired) if self.paired else None

    def total(self, key: str) -> float:
        return sum(run.get(key) or 0 for run in self.runs)

    @property
    def us_per_op(self) -> float | None:
        ops = self.total("ops")
        return self.total("server_cpu_s") / ops * 1e6 if ops else None

    def per_round(self) -> list[float]:
        return [r["server_cpu_us_per_op"] for r in self.runs if r.get("server_cpu_us_per_op")]

    def median(self, key: str) -> float | None:
        values = [r[key] for r in self.runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    def worst(self, key: str) -> float | None:
        values = [r[key] for r in self.runs if r.get(key) is not None]
        return max(values) if values else None

    def failures(self) -> collections.Counter[str]:
        total: collections.Counter[str] = collections.Counter()
        for run in self.runs:
            total.update(run.get("failures", {}))
        return total

    @property
    def kib_per_connection(self) -> float | None:
        values = [r["bytes_per_connection"] for r in self.runs if r.get("bytes_per_connection")]
        return statistics.median(values) / KIB if values else None


class Session:
    """All rows of one bench.py run, in order."""

    def __init__(self, settings: Settings, env: Environment) -> None:
        self.settings = settings
        self.env = env
        self.rows: dict[tuple[str, str], Row] = {}
        self.notes: list[str] = []
        self.profiles: dict[str, str] = {}
        self.expiry: dict[str, Any] | None = None

    def row(self, scenario: str, subject: str, unit: str) -> Row:
        key = (scenario, subject)
        if key not in self.rows:
            self.rows[key] = Row(scenario, subject, unit)
        return self.rows[key]

    def record(self, scenario: str, subject: str, unit: str, result: dict[str, Any]) -> None:
        self.row(scenario, subject, unit).runs.append(result)
        us = result.get("server_cpu_us_per_op")
        extra = ""
        if result.get("bytes_per_connection"):
            extra = f", {result['bytes_per_connection'] / KIB:.1f} KiB/conn"
        failures = result.get("failures") or {}
        print(
            f"  {scenario:9} {subject:28} {_fmt(us, 1):>8} us/{unit}"
            f"  {_fmt(result.get('ops_per_s'), 0):>7} ops/s"
            f"  loadgen {_fmt(result.get('loadgen_cpu_pct'), 0)}%{extra}"
            + (f"  failures {failures}" if failures else ""),
            flush=True,
        )

    def skip(self, scenario: str, subject: str, unit: str, why: str) -> None:
        self.row(scenario, subject, unit).missing = why
        print(f"  {scenario:9} {subject:28} not measured: {why}", flush=True)


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


# -- scenarios -------------------------------------------------------------------


def _headers(*extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [("Origin", ORIGIN), *extra]


def handshake_variants(env: Environment) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """txwssec's handshake variants: (subject, path, headers)."""
    return [
        ("txwssec no auth", "/anon", _headers()),
        ("txwssec key header", "/key", _headers(("apikey", API_KEY))),
        (
            "txwssec key subprotocol",
            "/key",
            _headers(("Sec-WebSocket-Protocol", f"token, {API_KEY}")),
        ),
        (
            "txwssec JWT HS256",
            "/jwt-hs",
            _headers(("Authorization", f"Bearer {env.token('HS256')}")),
        ),
        (
            "txwssec JWT ES256",
            "/jwt-es",
            _headers(("Authorization", f"Bearer {env.token('ES256')}")),
        ),
    ]


@dataclass(frozen=True)
class Subject:
    """One measured target: a label, a URL, its headers and server processes."""

    label: str
    url: str
    headers: list[tuple[str, str]]
    pids: list[int]
    ca: Path | None = None
    #: Through the load generator's TLS client: offer the last session
    #: (True), or always a full handshake (False); None: picows.
    resume: bool | None = None

    def spec(self) -> dict[str, Any]:
        spec = {
            "label": self.label,
            "url": self.url,
            "headers": self.headers,
            "server_pids": self.pids,
            "ca": str(self.ca) if self.ca else None,
        }
        if self.resume is not None:
            spec["resume"] = self.resume
        return spec


def handshake_spec(s: Settings, subjects: list[Subject]) -> dict[str, Any]:
    return {
        "scenario": "handshake",
        "targets": [subject.spec() for subject in subjects],
        "concurrency": s.handshake_concurrency,
        "cycles": s.cycles,
        "duration": s.duration,
        "warmup": s.warmup,
    }


def echo_spec(
    s: Settings, subjects: list[Subject], bulk: bool = False, binary: bool | None = None
) -> dict[str, Any]:
    return {
        "scenario": "echo",
        "targets": [subject.spec() for subject in subjects],
        "connections": s.bulk_connections if bulk else s.echo_connections,
        "inflight": s.bulk_inflight if bulk else s.echo_inflight,
        "size": 64 * KIB if bulk else 64,
        "binary": bulk if binary is None else binary,
        "cycles": s.cycles,
        "duration": s.duration,
        "warmup": s.warmup,
    }


def measure(
    session: Session, scenario: str, unit: str, spec: dict[str, Any], baseline: str
) -> None:
    """Run C{spec} (several targets in alternation) and record every target."""
    result = loadgen(spec)
    results: dict[str, Any] = result.get("targets") or {spec["targets"][0]["label"]: result}
    base = results.get(baseline, {}).get("windows", [])
    for label, value in results.items():
        session.record(scenario, label, unit, value)
        row = session.row(scenario, label, unit)
        for window, reference in zip(value.get("windows", []), base, strict=False):
            mine, theirs = window["server_cpu_us_per_op"], reference["server_cpu_us_per_op"]
            if mine and theirs:
                row.paired.append(mine / theirs)


#: The subjects measured next to txwssec (see bench/README.rst, "Columns").
WEBSOCKETS = "websockets (uvloop)"
NGINX = "nginx + Autobahn"
WEBSOCKETS_TLS = "websockets over TLS (uvloop)"
NGINX_TLS = "nginx TLS + Autobahn"
AUTOBAHN_TLS = "Autobahn over TLS (raw)"
TXWSSEC_TLS = "txwssec over TLS (key)"


def _nginx_binary() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )


class Stack:
    """Server processes started in order (an upstream waits until it listens)."""

    def __init__(self) -> None:
        self.servers: list[ServerProcess] = []

    def add(self, server: ServerProcess, wait: bool = False) -> ServerProcess:
        self.servers.append(server)
        if wait:
            server.wait_listening()
        return server

    def nginx(self, env: Environment, tls: bool = False) -> tuple[ServerProcess, ServerProcess]:
        """nginx in front of a raw Autobahn: (nginx, upstream)."""
        upstream = self.add(env.autobahn(), wait=True)
        return self.add(env.nginx(upstream.port, tls=tls)), upstream

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()


def run_handshake(session: Session) -> None:
    s, env = session.settings, session.env
    key = _headers(("apikey", API_KEY))
    has_nginx = _nginx_binary() is not None
    if not has_nginx:
        session.skip("handshake", NGINX, "handshake", NO_NGINX)
    for _ in range(s.rounds):
        stack = Stack()
        try:
            autobahn = stack.add(env.autobahn())
            websockets = stack.add(env.websockets())
            txwssec = stack.add(env.txwssec())
            proxy = stack.nginx(env) if has_nginx else None
        except Exception:
            stack.stop()
            raise
        with running(*stack.servers):
            subjects = [
                Subject(BASE, f"ws://{HOST}:{autobahn.port}/key", key, [autobahn.pid]),
                Subject(WEBSOCKETS, f"ws://{HOST}:{websockets.port}/key", key, [websockets.pid]),
                Subject(
                    f"{WEBSOCKETS} JWT HS256",
                    f"ws://{HOST}:{websockets.port}/jwt-hs",
                    _headers(("Authorization", f"Bearer {env.token('HS256')}")),
                    [websockets.pid],
                ),
            ]
            if proxy is not None:
                front, upstream = proxy
                subjects.append(
                    Subject(NGINX, f"ws://{HOST}:{front.port}/", key, [front.pid, upstream.pid])
                )
            subjects += [
                Subject(label, f"ws://{HOST}:{txwssec.port}{path}", headers, [txwssec.pid])
                for label, path, headers in handshake_variants(env)
            ]
            measure(session, "handshake", "handshake", handshake_spec(s, subjects), BASE)


#: The baseline subject of most scenarios.
BASE = "Autobahn (raw)"
NO_NGINX = "nginx is not installed (apt-get install nginx-light)"


def _echo_rounds(session: Session, kinds: list[tuple[str, bool, bool]]) -> None:
    """Echo scenarios (name, 64 KiB?, binary?), all subjects side by side."""
    s, env = session.settings, session.env
    key = _headers(("apikey", API_KEY))
    has_nginx = _nginx_binary() is not None
    for _ in range(s.rounds):
        stack = Stack()
        try:
            autobahn = stack.add(env.autobahn())
            websockets = stack.add(env.websockets())
            txwssec = stack.add(env.txwssec())
            proxy = stack.nginx(env) if has_nginx else None
        except Exception:
            stack.stop()
            raise
        with running(*stack.servers):
            subjects = [
                Subject(BASE, f"ws://{HOST}:{autobahn.port}/key", key, [autobahn.pid]),
                Subject(WEBSOCKETS, f"ws://{HOST}:{websockets.port}/key", key, [websockets.pid]),
                Subject(
                    "txwssec (key, all limits)",
                    f"ws://{HOST}:{txwssec.port}/key",
                    key,
                    [txwssec.pid],
                ),
            ]
            if proxy is not None:
                front, upstream = proxy
                subjects.append(
                    Subject(NGINX, f"ws://{HOST}:{front.port}/", key, [front.pid, upstream.pid])
                )
            for scenario, bulk, binary in kinds:
                if proxy is None:
                    session.skip(scenario, NGINX, "message", NO_NGINX)
                spec = echo_spec(s, subjects, bulk=bulk, binary=binary)
                measure(session, scenario, "message", spec, BASE)


def run_echo(session: Session) -> None:
    _echo_rounds(session, [("echo", False, False)])


def run_bulk(session: Session) -> None:
    _echo_rounds(session, [("bulk", True, True), ("bulk text", True, False)])


def run_idle(session: Session) -> None:
    s, env = session.settings, session.env
    key = _headers(("apikey", API_KEY))
    has_nginx = _nginx_binary() is not None
    if not has_nginx:
        session.skip("idle", NGINX, "connection", NO_NGINX)
    for _ in range(s.rounds):
        for subject in ("Autobahn (raw)", WEBSOCKETS, "txwssec (key, timers armed)", NGINX):
            stack = Stack()
            if subject == NGINX:
                if not has_nginx:
                    continue
                front, upstream = stack.nginx(env)
                port, pids = front.port, [front.pid, upstream.pid]
                url = f"ws://{HOST}:{port}/"
            else:
                make = {
                    "Autobahn (raw)": env.autobahn,
                    WEBSOCKETS: env.websockets,
                }.get(subject, env.txwssec)
                server = stack.add(make())
                pids = [server.pid]
                url = f"ws://{HOST}:{server.port}/key"
            with running(*stack.servers):
                spec = {
                    "scenario": "idle",
                    "url": url,
                    "headers": key,
                    "server_pids": pids,
                    "connections": s.idle_connections,
                    "parallel": 32,
                    "settle": 1.0,
                }
                session.record("idle", subject, "connection", loadgen(spec))


def run_tls(session: Session) -> None:
    s, env = session.settings, session.env
    key = _headers(("apikey", API_KEY))
    has_nginx = _nginx_binary() is not None
    for _ in range(s.rounds):
        stack = Stack()
        try:
            autobahn = stack.add(env.autobahn(tls=True))
            websockets = stack.add(env.websockets(tls=True))
            txwssec = stack.add(env.txwssec(tls=True, kind="txwssec-tls"))
            proxy = stack.nginx(env, tls=True) if has_nginx else None
        except Exception:
            stack.stop()
            raise
        with running(*stack.servers):
            subjects = [
                Subject(
                    AUTOBAHN_TLS, f"wss://{HOST}:{autobahn.port}/key", key, [autobahn.pid], env.ca
                ),
                Subject(
                    WEBSOCKETS_TLS,
                    f"wss://{HOST}:{websockets.port}/key",
                    key,
                    [websockets.pid],
                    env.ca,
                ),
                Subject(
                    TXWSSEC_TLS, f"wss://{HOST}:{txwssec.port}/key", key, [txwssec.pid], env.ca
                ),
            ]
            if proxy is not None:
                front, upstream = proxy
                subjects.append(
                    Subject(
                        NGINX_TLS,
                        f"wss://{HOST}:{front.port}/",
                        key,
                        [front.pid, upstream.pid],
                        env.ca,
                    )
                )
            else:
                for scenario in ("wss hs", "wss echo", "wss resumed"):
                    session.skip(scenario, NGINX_TLS, "handshake", NO_NGINX)
            measure(session, "wss hs", "handshake", handshake_spec(s, subjects), AUTOBAHN_TLS)
            measure(session, "wss echo", "message", echo_spec(s, subjects), AUTOBAHN_TLS)
            # Resumed handshakes: every subject again, through the load
            # generator's own TLS client offering the last session; the
            # baseline is txwssec's full handshake through the same client.
            resumed = [Subject(TXWSSEC_FULL, subjects[2].url, key, [txwssec.pid], env.ca, False)]
            resumed += [
                Subject(f"{subject.label}, resumed", subject.url, key, subject.pids, env.ca, True)
                for subject in subjects
            ]
            spec = handshake_spec(s, resumed)
            measure(session, "wss resumed", "handshake", spec, TXWSSEC_FULL)


#: The baseline of the resumed handshakes: a full one, same client.
TXWSSEC_FULL = "txwssec over TLS (key), full (same client)"


def run_gateway(session: Session) -> None:
    s, env = session.settings, session.env
    key = _headers(("apikey", API_KEY))
    base = NGINX
    has_nginx = _nginx_binary() is not None
    if not has_nginx:
        session.skip("gw hs", base, "handshake", NO_NGINX)
        session.skip("gw echo", base, "message", NO_NGINX)
    for _ in range(s.rounds):
        stack = Stack()
        subjects: list[Subject] = []
        try:
            if has_nginx:
                front, upstream = stack.nginx(env)
                subjects.append(
                    Subject(base, f"ws://{HOST}:{front.port}/", key, [front.pid, upstream.pid])
                )
            upstream = stack.add(env.autobahn(), wait=True)
            proxy = stack.add(env.txwssec(upstream=upstream.port, kind="txwssec-gateway"))
            subjects.append(
                Subject(
                    "txwssec gateway + Autobahn",
                    f"ws://{HOST}:{proxy.port}/gw",
                    key,
                    [proxy.pid, upstream.pid],
                )
            )
            direct = stack.add(env.autobahn())
            subjects.append(
                Subject(
                    "Autobahn (raw, no proxy)", f"ws://{HOST}:{direct.port}/", key, [direct.pid]
                )
            )
        except Exception:
            stack.stop()
            raise
        with running(*stack.servers):
            measure(session, "gw hs", "handshake", handshake_spec(s, subjects), base)
            measure(session, "gw echo", "message", echo_spec(s, subjects), base)


def run_expiry(session: Session) -> None:
    s, env = session.settings, session.env
    server = env.txwssec()
    with running(server) as pids:
        spec = {
            "scenario": "expiry",
            "url": f"ws://{HOST}:{server.port}/jwt-hs",
            "headers": _headers(),
            "server_pids": pids,
            "connections": s.expiry_connections,
            "window": s.expiry_window,
            "secret": JWT_SECRET,
            "consumer": CONSUMER,
            "parallel": 32,
            "timeout": 240,
        }
        result = loadgen(spec)
    session.expiry = result
    late = result["lateness_ms"]
    print(
        f"  expiry    {result['closed_3000']}/{result['connections']} closed 3000,"
        f" within 100 ms: {result['within_100ms']}, lateness p50 {_fmt(late['p50'], 1)} ms"
        f" p99 {_fmt(late['p99'], 1)} ms max {_fmt(late['max'], 1)} ms,"
        f" server CPU {result['server_cpu_s']:.2f} s, loadgen {result['loadgen_cpu_pct']:.0f}%",
        flush=True,
    )
    session.record("expiry", "txwssec (JWT exp spread)", "session", result)


def run_accel(session: Session) -> None:
    s, env = session.settings, session.env
    key = _headers(("apikey", API_KEY))
    base = "txwssec, NVX on"
    for _ in range(s.rounds):
        on = env.txwssec(env={"AUTOBAHN_USE_NVX": "1"})
        off = env.txwssec(env={"AUTOBAHN_USE_NVX": "0"})
        with running(on, off):
            subjects = [
                Subject(base, f"ws://{HOST}:{on.port}/key", key, [on.pid]),
                Subject("txwssec, NVX off", f"ws://{HOST}:{off.port}/key", key, [off.pid]),
            ]
            measure(session, "accel 64B", "message", echo_spec(s, subjects), base)
            measure(session, "accel 64K bin", "message", echo_spec(s, subjects, bulk=True), base)
            measure(
                session,
                "accel 64K txt",
                "message",
                echo_spec(s, subjects, bulk=True, binary=False),
                base,
            )


def run_ops(session: Session) -> None:
    """
    The cost of operations: the same server with the admin listener (so the
    metrics observer runs) and the JSON log to a file, against one without.
    """
    s, env = session.settings, session.env
    key = _headers(("apikey", API_KEY))
    base = "txwssec (no ops)"
    for _ in range(s.rounds):
        log = env.folder / f"ops-{env.counter}.json"
        extra = (
            f'\n[admin]\nlisten = ["tcp:{free_port()}:interface=127.0.0.1"]\n'
            f'\n[log]\nformat = "json"\nfile = "{log}"\n'
        )
        plain, ops = env.txwssec(), env.txwssec(kind="txwssec-ops", extra=extra)
        with running(plain, ops):
            subjects = [
                Subject(base, f"ws://{HOST}:{plain.port}/key", key, [plain.pid]),
                Subject(
                    "txwssec (metrics + JSON log)", f"ws://{HOST}:{ops.port}/key", key, [ops.pid]
                ),
            ]
            measure(session, "ops hs", "handshake", handshake_spec(s, subjects), base)
            measure(session, "ops echo", "message", echo_spec(s, subjects), base)


def run_profile(session: Session) -> None:
    s, env = session.settings, session.env
    pyspy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(pyspy).exists():
        session.notes.append(
            "profile: py-spy is not installed (pip install py-spy); no profile taken"
        )
        return
    key = _headers(("apikey", API_KEY))
    for name, make_spec in (
        ("64 B echo (key route, all limits)", echo_spec),
        ("handshake (key header)", handshake_spec),
    ):
        server = env.txwssec()
        with running(server) as pids:
            url = f"ws://{HOST}:{server.port}/key"
            spec = make_spec(s, [Subject("txwssec", url, key, pids)])
            spec.update(cycles=1, warmup=s.warmup, duration=s.profile_seconds + 2)
            out = env.folder / f"profile-{len(session.profiles)}.txt"
            process = subprocess.Popen(
                [PYTHON, str(BENCH / "loadgen.py")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=_pinned(LOADGEN_CPU),
            )
            assert process.stdin is not None
            process.stdin.write(json.dumps({**spec, "cpu": LOADGEN_CPU}))
            process.stdin.close()
            time.sleep(s.warmup + 1.0)
            spy = subprocess.run(
                [
                    pyspy,
                    "record",
                    "--pid",
                    str(server.pid),
                    "--duration",
                    str(int(s.profile_seconds)),
                    "--rate",
                    "500",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                ],
                capture_output=True,
                text=True,
                timeout=s.profile_seconds + 60,
                preexec_fn=_pinned(LOADGEN_CPU),
            )
            process.wait(120)
            if spy.returncode != 0 or not out.exists():
                session.notes.append(f"profile {name}: py-spy failed: {spy.stderr.strip()[-300:]}")
                continue
            session.profiles[name] = summarize_profile(out.read_text())
            print(f"  profile   {name}: {out}", flush=True)


def _frame_name(frame: str) -> str:
    """C{func (path:line)} -> C{func (short/path)} (no line number)."""
    match = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not match:
        return frame
    function, path = match.groups()
    for marker in ("site-packages/", "/work/main/", str(REPO) + "/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{function} ({path})"


def summarize_profile(raw: str, top: int = 20) -> str:
    """Top functions by own samples and txwssec's frames by inclusive samples."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame_name(f) for f in stack.split(";")]
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if not total:
        return "(no samples)\n"
    lines = [
        f"{total} samples (py-spy, 500 Hz, non-idle).",
        "",
        "| own % | function (file) |",
        "|---:|---|",
    ]
    for name, count in own.most_common(top):
        lines.append(f"| {count / total * 100:.1f} | `{name}` |")
    ours = [(n, c) for n, c in inclusive.most_common() if "txwssec/" in n]
    own_ours = sum(c for n, c in own.items() if "txwssec/" in n)
    lines += [
        "",
        f"txwssec's own code: {own_ours / total * 100:.1f}% of samples in txwssec frames (own "
        "time);",
        "txwssec frames by inclusive time (time in the function and everything it calls):",
        "",
        "| incl. % | own % | function (file) |",
        "|---:|---:|---|",
    ]
    for name, count in ours[:15]:
        lines.append(f"| {count / total * 100:.1f} | {own[name] / total * 100:.1f} | `{name}` |")
    return "\n".join(lines) + "\n"


RUNNERS: dict[str, Callable[[Session], None]] = {
    "handshake": run_handshake,
    "echo": run_echo,
    "bulk": run_bulk,
    "idle": run_idle,
    "tls": run_tls,
    "gateway": run_gateway,
    "expiry": run_expiry,
    "accel": run_accel,
    "ops": run_ops,
    "profile": run_profile,
}


# -- report ----------------------------------------------------------------------


def _baseline(session: Session, scenario: str, subject: str) -> Row | None:
    row = session.rows.get((scenario, subject))
    return row if row is not None and row.runs else None


BASELINES = {
    "handshake": "Autobahn (raw)",
    "echo": "Autobahn (raw)",
    "bulk": "Autobahn (raw)",
    "bulk text": "Autobahn (raw)",
    "idle": "Autobahn (raw)",
    "wss hs": "Autobahn over TLS (raw)",
    "wss echo": "Autobahn over TLS (raw)",
    "wss resumed": "txwssec over TLS (key), full (same client)",
    "gw hs": "nginx + Autobahn",
    "gw echo": "nginx + Autobahn",
    "accel 64B": "txwssec, NVX on",
    "accel 64K bin": "txwssec, NVX on",
    "accel 64K txt": "txwssec, NVX on",
    "ops hs": "txwssec (no ops)",
    "ops echo": "txwssec (no ops)",
}


#: How each scenario is shown, with its operation.
LABELS = {
    "handshake": "handshakes (µs/handshake)",
    "echo": "echo 64 B (µs/message)",
    "bulk": "echo 64 KiB binary (µs/message)",
    "bulk text": "echo 64 KiB text (µs/message)",
    "wss hs": "wss handshakes (µs/handshake)",
    "wss resumed": "wss handshakes, TLS session offered (µs/handshake)",
    "wss echo": "wss echo 64 B (µs/message)",
    "gw hs": "gateway handshakes (µs/handshake)",
    "gw echo": "gateway echo 64 B (µs/message)",
    "accel 64B": "NVX: echo 64 B text (µs/message)",
    "accel 64K bin": "NVX: echo 64 KiB binary (µs/message)",
    "accel 64K txt": "NVX: echo 64 KiB text (µs/message)",
    "ops hs": "ops: handshakes (µs/handshake)",
    "ops echo": "ops: echo 64 B (µs/message)",
}


NO_WEBSOCKETS_PROXY = "n/a (websockets is not a proxy)"
NO_NGINX_JWT = "n/a (open-source nginx checks no JWT)"

#: The comparison table: (row, scenario, txwssec, websockets, nginx, raw
#: Autobahn), each a subject of the scenario or an "n/a (why)" text.
COMPARISON: list[tuple[str, str, str, str, str, str]] = [
    ("key-auth handshake", "handshake", "txwssec key header", WEBSOCKETS, NGINX, BASE),
    (
        "JWT HS256 handshake",
        "handshake",
        "txwssec JWT HS256",
        f"{WEBSOCKETS} JWT HS256",
        NO_NGINX_JWT,
        BASE,
    ),
    ("64 B echo", "echo", "txwssec (key, all limits)", WEBSOCKETS, NGINX, BASE),
    ("64 KiB echo, text", "bulk text", "txwssec (key, all limits)", WEBSOCKETS, NGINX, BASE),
    ("64 KiB echo, binary", "bulk", "txwssec (key, all limits)", WEBSOCKETS, NGINX, BASE),
    ("wss handshake (full)", "wss hs", TXWSSEC_TLS, WEBSOCKETS_TLS, NGINX_TLS, AUTOBAHN_TLS),
    (
        "wss handshake (resumed)",
        "wss resumed",
        f"{TXWSSEC_TLS}, resumed",
        f"{WEBSOCKETS_TLS}, resumed",
        f"{NGINX_TLS}, resumed",
        f"{AUTOBAHN_TLS}, resumed",
    ),
    ("wss echo 64 B", "wss echo", TXWSSEC_TLS, WEBSOCKETS_TLS, NGINX_TLS, AUTOBAHN_TLS),
    ("idle memory per connection", "idle", "txwssec (key, timers armed)", WEBSOCKETS, NGINX, BASE),
    (
        "gateway per handshake",
        "gw hs",
        "txwssec gateway + Autobahn",
        NO_WEBSOCKETS_PROXY,
        NGINX,
        "Autobahn (raw, no proxy)",
    ),
    (
        "gateway per message",
        "gw echo",
        "txwssec gateway + Autobahn",
        NO_WEBSOCKETS_PROXY,
        NGINX,
        "Autobahn (raw, no proxy)",
    ),
]


def paired_ratio(mine: Row, theirs: Row) -> float | None:
    """
    The median over measured windows of mine/theirs, window against the
    window of the same cycle and round (None when they were not measured
    side by side).
    """
    ratios = []
    for run_a, run_b in zip(mine.runs, theirs.runs, strict=False):
        for a, b in zip(run_a.get("windows", []), run_b.get("windows", []), strict=False):
            if a["server_cpu_us_per_op"] and b["server_cpu_us_per_op"]:
                ratios.append(a["server_cpu_us_per_op"] / b["server_cpu_us_per_op"])
    return statistics.median(ratios) if ratios else None


def _value(row: Row, scenario: str) -> float | None:
    return row.kib_per_connection if scenario == "idle" else row.us_per_op


def comparison_ratio(session: Session, scenario: str, mine: str, theirs: str) -> float | None:
    """txwssec over another subject: paired median, else the ratio of totals."""
    a, b = session.rows.get((scenario, mine)), session.rows.get((scenario, theirs))
    if a is None or b is None or not a.runs or not b.runs:
        return None
    if scenario != "idle":
        paired = paired_ratio(a, b)
        if paired is not None:
            return paired
    va, vb = _value(a, scenario), _value(b, scenario)
    return va / vb if va and vb else None


def comparison_table(session: Session) -> str:
    """
    One row per txwssec scenario: txwssec's server CPU per operation (KiB
    per connection for idle memory), and websockets, nginx and raw
    Autobahn next to it with txwssec's ratio to each.
    """
    lines = [
        "| scenario | txwssec | websockets 17 on uvloop | nginx | raw Autobahn |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, scenario, mine, *others in COMPARISON:
        unit = "KiB/conn" if scenario == "idle" else "µs"
        row = session.rows.get((scenario, mine))
        if row is None or not row.runs:
            why = row.missing if row is not None and row.missing else "not measured"
            lines.append(f"| {name} | {why} | | | |")
            continue
        cells = [f"{_fmt(_value(row, scenario), 1)} {unit}"]
        for other in others:
            if other.startswith("n/a"):
                cells.append(other)
                continue
            theirs = session.rows.get((scenario, other))
            if theirs is None or not theirs.runs:
                cells.append(theirs.missing if theirs is not None and theirs.missing else "—")
                continue
            ratio = comparison_ratio(session, scenario, mine, other)
            ratio_text = f" (**{ratio:.2f}{TIMES}**)" if ratio is not None else ""
            cells.append(f"{_fmt(_value(theirs, scenario), 1)} {unit}{ratio_text}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    full = session.rows.get(("wss resumed", TXWSSEC_FULL))
    resumed = session.rows.get(("wss resumed", f"{TXWSSEC_TLS}, resumed"))
    if full is not None and resumed is not None and full.runs and resumed.runs:
        ratio = paired_ratio(resumed, full)
        lines += [
            "",
            f"txwssec's resumed wss handshake: {_fmt(resumed.us_per_op, 1)} µs against "
            f"{_fmt(full.us_per_op, 1)} µs for a full one through the same client "
            f"({_fmt(ratio, 2)}{TIMES}, paired median); "
            f"{resumed.total('resumed') / max(resumed.total('ops'), 1) * 100:.0f}% of the "
            "offered sessions were resumed.",
        ]
    return "\n".join(lines) + "\n"


def results_table(session: Session) -> str:
    lines = [
        "| scenario | server | server CPU µs/op (per round) | ratio (paired median) "
        "| ops/s | p50 ms | p99 ms | "
        "server CPU % | loadgen CPU % | failures |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (scenario, subject), row in session.rows.items():
        if scenario in ("idle", "expiry"):
            continue
        if row.missing:
            lines.append(
                f"| {LABELS.get(scenario, scenario)} | {subject} | not measured: {row.missing} | "
                "| | | | | | |"
            )
            continue
        base = _baseline(session, scenario, BASELINES.get(scenario, ""))
        ratio = ""
        if base is not None and base.us_per_op and row.us_per_op:
            ratio = f"{row.us_per_op / base.us_per_op:.2f}{TIMES}"
            if row.paired_ratio is not None and row is not base:
                ratio += f" ({row.paired_ratio:.2f}{TIMES})"
        rounds = ", ".join(f"{v:,.0f}" if v >= 100 else f"{v:.1f}" for v in row.per_round())
        us = row.us_per_op
        us_text = (f"{us:,.0f}" if us and us >= 100 else _fmt(us, 1)) + f" ({rounds})"
        lg = row.worst("loadgen_cpu_pct")
        lg_text = _fmt(lg, 0) + (" ⚠ saturated" if lg and lg > SATURATED else "")
        failures = row.failures()
        fail_text = ", ".join(f"{k} {TIMES}{v}" for k, v in failures.items()) or "0"
        if scenario == "wss resumed":
            ops = row.total("ops")
            fail_text += f"; resumed {row.total('resumed') / ops * 100 if ops else 0:.0f}%"
        lines.append(
            f"| {LABELS.get(scenario, scenario)} | {subject} | {us_text} | {ratio} "
            f"| {_fmt(row.median('ops_per_s'), 0)} | {_fmt(row.median('p50_ms'), 2)} "
            f"| {_fmt(row.median('p99_ms'), 2)} | {_fmt(row.median('server_cpu_pct'), 0)} "
            f"| {lg_text} | {fail_text} |"
        )
    return "\n".join(lines) + "\n"


def memory_table(session: Session) -> str:
    rows = [row for (scenario, _), row in session.rows.items() if scenario == "idle"]
    if not rows:
        return ""
    base = _baseline(session, "idle", "Autobahn (raw)")
    lines = [
        "| server | connections | KiB per idle connection (per round) | vs raw Autobahn | server "
        "CPU µs per handshake while opening | failures |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        kib = row.kib_per_connection
        per_round = ", ".join(
            f"{r['bytes_per_connection'] / KIB:.1f}"
            for r in row.runs
            if r.get("bytes_per_connection")
        )
        delta = ""
        if base is not None and base.kib_per_connection and kib is not None and row is not base:
            delta = f"{kib - base.kib_per_connection:+.1f} KiB"
        connections = int(row.median("connections") or 0)
        failures = ", ".join(f"{k} {TIMES}{v}" for k, v in row.failures().items()) or "0"
        lines.append(
            f"| {row.subject} | {connections:,} | {_fmt(kib, 1)} ({per_round}) | {delta} "
            f"| {_fmt(row.us_per_op, 0)} | {failures} |"
        )
    return "\n".join(lines) + "\n"


def expiry_text(session: Session) -> str:
    r = session.expiry
    if r is None:
        return ""
    late = r["lateness_ms"]
    cpu_us = r["server_cpu_s"] / r["closed_3000"] * 1e6 if r["closed_3000"] else None
    return (
        f"- {r['connections']:,} sessions opened in {r['open_s']:.1f} s (JWT HS256, `exp` spread "
        "evenly "
        f"over {session.settings.expiry_window:g} s, starting "
        f"{r['opened_before_first_deadline']:,} "
        "of them open before the first deadline).\n"
        f"- Closed with 3000: {r['closed_3000']:,}; other close codes: "
        f"{ {k: v for k, v in r['close_codes'].items() if k != '3000'} or 'none' }; never "
        f"closed: {r['not_closed']}.\n"
        f"- Close frame received after its token's `exp` (client clock = server clock): min "
        f"{_fmt(late['min'], 1)} ms, p50 {_fmt(late['p50'], 1)} ms, p99 {_fmt(late['p99'], 1)} "
        "ms, "
        f"max (the last one) {_fmt(late['max'], 1)} ms; within 100 ms: {r['within_100ms']:,}.\n"
        f"- Server CPU from 0.25 s before the first deadline until the last close: "
        f"{r['server_cpu_s']:.2f} s ({_fmt(cpu_us, 0)} µs per expired session, close handshake "
        "and "
        f"TCP close included); load generator CPU {r['loadgen_cpu_pct']:.0f}%.\n"
    )


@dataclass
class Target:
    text: str
    measured: str
    passed: bool | None  #: None: not measured


def targets(session: Session) -> list[Target]:
    found: list[Target] = []

    def ratio(scenario: str, subject: str, base: str) -> float | None:
        row, ref = session.rows.get((scenario, subject)), session.rows.get((scenario, base))
        if row is None or ref is None or not row.us_per_op or not ref.us_per_op:
            return None
        if row.paired_ratio is not None:
            return row.paired_ratio
        return row.us_per_op / ref.us_per_op

    for text, scenario, subject, base, limit in (
        (
            "handshake, key auth + Origin + limits + expiry timer ≤ 1.10x raw Autobahn",
            "handshake",
            "txwssec key header",
            "Autobahn (raw)",
            1.10,
        ),
        (
            "handshake, JWT HS256 ≤ 1.20x raw Autobahn",
            "handshake",
            "txwssec JWT HS256",
            "Autobahn (raw)",
            1.20,
        ),
        (
            "64 B echo with all limits on ≤ 1.05x raw Autobahn",
            "echo",
            "txwssec (key, all limits)",
            "Autobahn (raw)",
            1.05,
        ),
        (
            "64 KiB bulk echo ≤ 1.05x raw Autobahn",
            "bulk",
            "txwssec (key, all limits)",
            "Autobahn (raw)",
            1.05,
        ),
        (
            "gateway: server CPU per message (txwssec + upstream) ≤ 1.0x nginx + upstream",
            "gw echo",
            "txwssec gateway + Autobahn",
            "nginx + Autobahn",
            1.0,
        ),
        (
            "gateway: server CPU per handshake (txwssec + upstream) ≤ 1.5x nginx + upstream",
            "gw hs",
            "txwssec gateway + Autobahn",
            "nginx + Autobahn",
            1.5,
        ),
        (
            "ops: metrics + JSON log, per handshake ≤ 1.10x without",
            "ops hs",
            "txwssec (metrics + JSON log)",
            "txwssec (no ops)",
            1.10,
        ),
        (
            "ops: metrics + JSON log, per message ≤ 1.05x without",
            "ops echo",
            "txwssec (metrics + JSON log)",
            "txwssec (no ops)",
            1.05,
        ),
        (
            "wss: a resumed handshake ≤ 0.6x a full one (same client)",
            "wss resumed",
            f"{TXWSSEC_TLS}, resumed",
            TXWSSEC_FULL,
            0.6,
        ),
    ):
        value = ratio(scenario, subject, base)
        if value is None:
            found.append(Target(text, "not measured", None))
        else:
            found.append(Target(text, f"{value:.2f}{TIMES}", value <= limit))
    for name, scenario, mine, websockets, _nginx, _raw in COMPARISON:
        if websockets.startswith("n/a"):
            continue
        value = comparison_ratio(session, scenario, mine, websockets)
        text = f"{name} ≤ 1.0x websockets on uvloop"
        if value is None:
            found.append(Target(text, "not measured", None))
        else:
            found.append(Target(text, f"{value:.2f}{TIMES}", value <= 1.0))
    raw = session.rows.get(("idle", "Autobahn (raw)"))
    ours = session.rows.get(("idle", "txwssec (key, timers armed)"))
    if raw and ours and raw.kib_per_connection is not None and ours.kib_per_connection is not None:
        delta = ours.kib_per_connection - raw.kib_per_connection
        found.append(
            Target(
                "idle memory ≤ raw Autobahn + 2 KiB per connection",
                f"{ours.kib_per_connection:.1f} KiB vs {raw.kib_per_connection:.1f} KiB "
                f"({delta:+.1f} KiB)",
                delta <= 2.0,
            )
        )
    else:
        found.append(
            Target("idle memory ≤ raw Autobahn + 2 KiB per connection", "not measured", None)
        )
    r = session.expiry
    if r is not None:
        n = session.settings.expiry_connections
        ok = r["closed_3000"] == n and r["within_100ms"] == n
        found.append(
            Target(
                f"expiry: {n:,} sessions closed within 100 ms of their deadline",
                f"{r['within_100ms']:,}/{n:,} within 100 ms, last "
                f"{_fmt(r['lateness_ms']['max'], 1)} ms late",
                ok,
            )
        )
    else:
        found.append(
            Target(
                "expiry: 10,000 sessions closed within 100 ms of their deadline",
                "not measured",
                None,
            )
        )
    return found


def accel_text(session: Session) -> str:
    """What Autobahn's NVX acceleration buys txwssec (NVX off / NVX on)."""
    parts = []
    for scenario in ("accel 64B", "accel 64K bin", "accel 64K txt"):
        on = session.rows.get((scenario, "txwssec, NVX on"))
        off = session.rows.get((scenario, "txwssec, NVX off"))
        if on and off and on.us_per_op and off.us_per_op:
            parts.append(
                f"{LABELS[scenario].split(': ', 1)[1].split(' (')[0]}: {on.us_per_op:,.1f} µs "
                "with NVX, "
                f"{off.us_per_op:,.1f} µs without ({off.us_per_op / on.us_per_op:.2f}{TIMES})"
            )
    if not parts:
        return ""
    return (
        "Autobahn 26 accelerates UTF-8 validation and (un)masking with NVX (CFFI, built at "
        "install "
        "time); it has no wsaccel code path any more, so installing wsaccel changes nothing. "
        "NVX is on by default when built; `AUTOBAHN_USE_NVX=0` turns it off. Server CPU per "
        "echoed message, txwssec: " + "; ".join(parts) + ".\n"
    )


def targets_text(found: list[Target]) -> str:
    lines = ["| target | measured | |", "|---|---|---|"]
    for target in found:
        verdict = "—" if target.passed is None else ("PASS" if target.passed else "**MISS**")
        lines.append(f"| {target.text} | {target.measured} | {verdict} |")
    return "\n".join(lines) + "\n"


# -- the machine -------------------------------------------------------------------


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    nvx = subprocess.run(
        [
            PYTHON,
            "-c",
            "from autobahn.websocket import HAS_NVX, USES_NVX; "
            "import autobahn.websocket.utf8validator as u; "
            "print(HAS_NVX, USES_NVX, u.Utf8Validator.__module__)",
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    nginx = "not installed"
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if binary:
        nginx = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr.strip()
    autobahn_dir = None
    with contextlib.suppress(Exception):
        import autobahn

        autobahn_dir = Path(autobahn.__file__).parent
    wsaccel_ref = "unknown"
    if autobahn_dir is not None:
        wsaccel_ref = (
            "yes"
            if any("wsaccel" in p.read_text(errors="ignore") for p in autobahn_dir.rglob("*.py"))
            else "no"
        )
    import ssl as _ssl

    return {
        "nproc": str(os.cpu_count()),
        "CPU": model,
        "memory": memory,
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "Twisted": _version("twisted"),
        "Autobahn": _version("autobahn"),
        "Autobahn NVX (HAS_NVX, USES_NVX, UTF-8 validator)": nvx or "unknown",
        "wsaccel installed / referenced by Autobahn": f"{_version('wsaccel')} / {wsaccel_ref}",
        "websockets": _version("websockets"),
        "txwssec": _version("txwssec")
        if _version("txwssec") != "not installed"
        else _txwssec_version(),
        "pyOpenSSL / its OpenSSL (txwssec, Autobahn over TLS)": f"{_version('pyOpenSSL')} / "
        f"{_pyopenssl_openssl()}",
        "Python's ssl (websockets, load generator)": _ssl.OPENSSL_VERSION,
        "load generator": f"uvloop {_version('uvloop')}, picows {_version('picows')}",
        "websockets server": f"websockets {_version('websockets')} on uvloop "
        f"{_version('uvloop')} (Python's ssl: {_ssl.OPENSSL_VERSION})",
        "nginx": nginx,
    }


def _pyopenssl_openssl() -> str:
    try:
        from OpenSSL import SSL

        return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    except Exception:
        return "unknown"


def _txwssec_version() -> str:
    sys.path.insert(0, str(REPO))
    try:
        from txwssec._version import __version__

        return f"{__version__} (checkout)"
    finally:
        sys.path.pop(0)


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "unknown"


def report(session: Session, argv: list[str], took: float, load: tuple[str, str]) -> str:
    s = session.settings
    info = machine()
    out = [
        "# txwssec benchmark results",
        "",
        f"Generated by `python bench/bench.py {' '.join(argv)}` on "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC in {took / 60:.1f} min "
        f"({s.rounds} round(s) of {s.cycles} cycles, {s.duration:g} s windows). "
        "Load average (1, 5, 15 min) "
        f"before: {load[0]}; after: {load[1]}.",
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in info.items()],
        "",
        "## Method",
        "",
        f"Each server is its own process pinned to CPU {SERVER_CPU} (`os.sched_setaffinity` "
        "in the child); the load generator (`bench/loadgen.py`: uvloop + picows) is one "
        f"process pinned to CPU {LOADGEN_CPU}. **Server CPU µs/op** is the server's user + "
        "system time from `/proc/PID/stat` (summed over its descendants, i.e. nginx's worker; "
        "for the gateway rows the proxy plus its upstream) over a measured window, divided by "
        "the operations completed in it. In each round all the subjects of a scenario run at "
        "once, as fresh processes, and the load generator measures them in turn in short "
        f"windows ({s.cycles} cycles of {s.duration:g} s each, after {s.warmup:g} s of "
        "warm-up on each switch), A B C A B C; idle servers use no CPU. The first number is "
        "over all windows, the ones in brackets per round. **ratio** is to the scenario's "
        "baseline (raw Autobahn; Autobahn over TLS; nginx + Autobahn; NVX on) over all "
        "windows; in brackets, the median of the per-cycle ratios (each window against the "
        "baseline's window of the same cycle), which is what the targets use: it cancels "
        "most of the drift caused by other work on the machine. This machine was shared with "
        "other jobs while it ran, so wall-clock figures (ops/s, latency) are noisy; CPU time "
        "per operation much less so, but still about ±10-15%.",
        "",
        "- handshake: one op = TCP connect, opening handshake, closing handshake (1000, answered "
        "by the server), TCP close; "
        f"{s.handshake_concurrency} at a time; latency = connect to 101. Every request carries "
        f"`Origin: {ORIGIN}` (and the peers get the `apikey` header too, unused).",
        f"- echo: {s.echo_connections} connections {TIMES} {s.echo_inflight} messages in flight, "
        "64 B "
        f"text; bulk: {s.bulk_connections} {TIMES} {s.bulk_inflight}, 64 KiB binary. Every echo "
        "is "
        "checked against the oldest outstanding message of its connection (length, order, "
        "content).",
        f"- idle: {s.idle_connections:,} connections opened and left idle; (RSS after - RSS "
        "before) "
        "/ connections, RSS before taken after 200 warm-up connections were opened and closed.",
        "- txwssec configuration: key auth (header and `token` subprotocol), JWT HS256 and ES256, "
        "an Origin list, every route limit on with generous values (message and byte rates per "
        "connection and per consumer, connections per consumer, buffered bytes, fragments, "
        "control frames), `max_lifetime = 3600` (an expiry timer per session), "
        "`idle_timeout = 600` (an idle timer per session), auto-ping every 30 s (txwssec's "
        "default); one log line per accepted session (to a file). "
        + (
            "The cycle collector as Python sets it (`gc_young_threshold = 0`, `--python-gc`). "
            if session.env.python_gc
            else "The cycle collector tuned as `twistd wssec` does by default (young generation "
            "every 50,000 allocations, start-up objects frozen; `--python-gc` turns it off). "
        )
        + "Raw Autobahn runs with its defaults; websockets on uvloop with the routes' key, "
        'JWT, Origin and size checks (see bench/servers/ and bench/README.rst, "Columns").',
        "",
        "## txwssec next to websockets, nginx and raw Autobahn",
        "",
        "Server CPU per operation (idle memory: KiB per connection); in brackets, "
        "txwssec's ratio to that column, the median of the paired per-window ratios "
        "(measured side by side in the same session). See bench/README.rst, "
        '"Columns", for what each column runs and why some cells are n/a. '
        f"Load average before: {load[0]}; after: {load[1]}.",
        "",
        comparison_table(session),
        "## Results",
        "",
        results_table(session),
    ]
    memory = memory_table(session)
    if memory:
        out += ["### Idle memory", "", memory]
    expiry = expiry_text(session)
    if expiry:
        out += ["### Expiry of many sessions at once", "", expiry]
    out += ["## Targets", "", targets_text(targets(session))]
    accel = accel_text(session)
    if accel:
        out += ["## Autobahn's accelerations", "", accel]
    if session.profiles:
        out += ["## Profiles (txwssec server under load)", ""]
        for name, text in session.profiles.items():
            out += [f"### {name}", "", text]
    if session.notes:
        out += ["## Notes", "", *[f"- {note}" for note in session.notes], ""]
    out += ["## Commands", "", "Servers (ports and the temporary folder vary per run):", "", "```"]
    out += [f"{kind}: {command}" for kind, command in session.env.commands.items()]
    out += ["```", ""]
    for kind, config in session.env.configs.items():
        language = "nginx" if kind.startswith("nginx") else "toml"
        out += [f"{kind} configuration:", "", f"```{language}", config.rstrip(), "```", ""]
    out += [
        "Load generator: `python bench/loadgen.py < spec.json` (pinned to CPU 1), e.g.:",
        "",
        "```json",
        json.dumps(
            echo_spec(
                s,
                [
                    Subject("Autobahn (raw)", "ws://127.0.0.1:PORT1/key", _headers(), [1234]),
                    Subject(
                        "txwssec", "ws://127.0.0.1:PORT2/key", _headers(("apikey", "K")), [5678]
                    ),
                ],
            ),
            indent=None,
        ),
        "```",
        "",
    ]
    return "\n".join(out)


#: In the file written by --write, everything after this line is kept as is
#: on the next --write (the analysis, written by hand).
HAND_WRITTEN = "<!-- hand-written analysis below: kept by bench.py --write -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="short runs, fewer connections, 1 round"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per scenario (default 2; 1 with --quick)"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of: {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--write", metavar="FILE", help="also write the report (markdown) to FILE")
    parser.add_argument(
        "--python-gc",
        action="store_true",
        help="run txwssec with Python's cycle collector settings (gc_young_threshold = 0)",
    )
    args = parser.parse_args(argv)
    arguments = sys.argv[1:] if argv is None else argv
    chosen = [name.strip() for name in args.scenarios.replace(" ", ",").split(",") if name.strip()]
    unknown = [name for name in chosen if name not in RUNNERS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    if os.cpu_count() is None or (os.cpu_count() or 0) < 2:
        print("bench: needs at least 2 CPUs (server on CPU 0, load on CPU 1)", file=sys.stderr)
        return 2
    rounds = args.rounds or (1 if args.quick else 2)
    settings = Settings.quick(rounds) if args.quick else Settings.full(rounds)
    sys.path.insert(0, str(REPO))
    started = time.monotonic()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="txwssec-bench-") as folder:
        env = Environment(Path(folder))
        env.python_gc = args.python_gc
        session = Session(settings, env)
        print(
            f"bench: load average {load_before}; scenarios {', '.join(chosen)}; {rounds} round(s)",
            flush=True,
        )
        for name in chosen:
            print(f"bench: {name}", flush=True)
            try:
                RUNNERS[name](session)
            except Exception as error:  # report, go on with the next scenario
                message = f"{name}: could not run: {error}".strip()
                session.notes.append(message.splitlines()[0][:300])
                print(f"bench: {message}", file=sys.stderr, flush=True)
        took = time.monotonic() - started
        text = report(session, arguments, took, (load_before, load_average()))
    print()
    print(text)
    if args.write:
        target = Path(args.write)
        with contextlib.suppress(OSError):
            previous = target.read_text()
            if HAND_WRITTEN in previous:
                text = text.rstrip() + "\n\n" + HAND_WRITTEN + previous.split(HAND_WRITTEN, 1)[1]
        target.write_text(text)
        print(f"bench: wrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
