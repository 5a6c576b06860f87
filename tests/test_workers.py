"""
C{[server] workers}: N worker processes under one supervisor, sharing each
listener (L{txwssec.workers}), through the real C{twistd wssec}: both workers
serve (ws and wss), the admin API covers every worker, a killed worker
loses only its connections and comes back, SIGTERM closes every session
with 1001, SIGHUP reaches every worker (and a broken file reaches none); the
C{server.workers} key; the merging of the workers' metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
from processes import TIMEOUT, WORKERS_STARTING, Process, sync_tls, twistd
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from txwssec.config import parse
from txwssec.devcert import write_dev_certificates
from txwssec.errors import ConfigError
from txwssec.workers.merge import Scrapes, merged_text
from txwssec.workers.supervisor import STEADY, Supervisor, WorkerProcess

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")

ADMIN_TOKEN = "workers-admin-token-5c1e9a"
JWT_SECRET = "workers-jwt-secret-0123456789abcdef"
TLS1_2 = ssl.TLSVersion.TLSv1_2
RESERVED = re.compile(r"wssec reserved (tcp|tls):0:interface=127\.0\.0\.1 \(127\.0\.0\.1:(\d+)\)")
STARTED = re.compile(r"wssec worker (\d) started \(pid (\d+)\)")
#: Sessions opened at first to see both workers serve (L{held_by}).
SPREAD = 16
#: The most sessions L{held_by} opens before it gives up.
MAX_SPREAD = 64

CONSUMERS = """
[[consumer]]
name = "john"
keys = ["john-key"]

[[consumer]]
name = "mary"
keys = ["mary-key", "mary-leaked-key"]
"""


def config_text(admin: int, consumers: str = CONSUMERS, workers: Any = 2) -> str:
    digest = hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()
    return f"""
[server]
listen = ["tcp:0:interface=127.0.0.1", "tls:0:interface=127.0.0.1"]
workers = {json.dumps(workers)}
shutdown_timeout = 5

[tls]
cert = "dev-certs/server.pem"
key = "dev-certs/server.key"

[admin]
listen = ["tcp:{admin}:interface=127.0.0.1"]
token = "sha256:{digest}"

[auth.key]
header = "apikey"

[auth.jwt]
secret = "{JWT_SECRET}"

{consumers}

[[route]]
path = "/echo"
app = "echo"
auth = ["key", "jwt"]
"""


class Server:
    """A C{twistd wssec} with workers: its ports, its workers' pids, its admin API."""

    def __init__(self, process: Process, admin: int) -> None:
        self.process = process
        self.admin = admin
        found = {m.group(1): int(m.group(2)) for m in map(RESERVED.search, process.lines) if m}
        self.port, self.tls_port = found["tcp"], found["tls"]

    def pids(self) -> dict[int, int]:
        """The pid of each worker, as last started."""
        return {
            int(m.group(1)): int(m.group(2)) for m in map(STARTED.search, self.process.lines) if m
        }

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=TIMEOUT) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def sessions(self) -> list[dict[str, Any]]:
        status, body = self.call("GET", "/sessions")
        assert status == 200, body
        records: list[dict[str, Any]] = json.loads(body)
        return records

    def open(self, key: str = "john-key", tls: bool = False) -> ClientConnection:
        header = (
            {"Authorization": f"Bearer {key[4:]}"} if key.startswith("jwt:") else {"apikey": key}
        )
        if tls:
            context = sync_tls(ssl.create_default_context())
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            url = f"wss://127.0.0.1:{self.tls_port}/echo"
            return connect(url, additional_headers=header, ssl=context, proxy=None)
        url = f"ws://127.0.0.1:{self.port}/echo"
        return connect(url, additional_headers=header, proxy=None, open_timeout=TIMEOUT)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[list[Process]]:
    """The twistd processes a test starts: killed, their output kept in tmp_path."""
    started: list[Process] = []
    yield started
    for index, process in enumerate(started):
        process.kill()
        (tmp_path / f"twistd-{index}.out").write_text(process.output())


def start(running: list[Process], folder: Path, admin: int, **options: Any) -> Server:
    write_dev_certificates(folder / "dev-certs")
    path = folder / "wssec.toml"
    path.write_text(config_text(admin, **options))
    process = twistd(path, folder)
    running.append(process)
    process.wait_for("wssec 2 workers serving", timeout=WORKERS_STARTING)
    return Server(process, admin)


def free_admin_port() -> int:
    from processes import free_port

    return free_port()


def spread(server: Server, key: str = "john-key", tls: bool = False) -> list[ClientConnection]:
    """At least L{SPREAD} sessions, held by both workers (see L{held_by})."""
    return held_by(server, set(server.pids().values()), lambda: server.open(key, tls))


def held_by(
    server: Server, workers: set[int], opener: Callable[[], ClientConnection]
) -> list[ClientConnection]:
    """
    L{SPREAD} echoing sessions opened with C{opener}, then more, one at a
    time, until each of C{workers} (pids) holds one of them (in the
    supervisor's session list), at most L{MAX_SPREAD}.

    The kernel gives each connection to a worker by a hash of its addresses
    and ports, not in turn: all of 16 land on one of two workers once in
    2**15 (as in one CI run), all of 64 once in 2**63.
    """
    clients = [echoed(opener()) for _ in range(SPREAD)]
    while not workers <= (held := holders(server, clients)):
        assert len(clients) < MAX_SPREAD, (
            f"all {len(clients)} sessions on worker(s) {sorted(held)},"
            f" none on {sorted(workers - held)}"
        )
        clients.append(echoed(opener()))
    assert held <= set(server.pids().values())
    return clients


def holders(server: Server, clients: list[ClientConnection]) -> set[int]:
    """The workers (pids) that hold C{clients}' sessions, each listed once."""
    ports = {client.local_address[1] for client in clients}
    records = [r for r in server.sessions() if int(r["peer"].rsplit(":", 1)[1]) in ports]
    assert len(records) == len(clients), records
    return {record["worker"] for record in records}


def echoed(client: ClientConnection) -> ClientConnection:
    """C{client}, once it has an echo."""
    client.send("hi")
    assert client.recv(TIMEOUT) == "hi"
    return client


def worker_of(server: Server) -> dict[str, int]:
    """Each session's worker pid, by session id."""
    return {record["id"]: record["worker"] for record in server.sessions()}


def close_code(client: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed):
        while True:
            client.recv(TIMEOUT)
    return client.close_code


def wait_until(condition: Any, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


# -- sessions on every worker (spread) --------------------------------------------


class Placed:
    """
    A stand-in for L{Server} whose kernel gives its Nth connection to the
    worker C{placement[N]} (pid 1 or 2), as SO_REUSEPORT's hash may.
    """

    def __init__(self, placement: list[int]) -> None:
        self.placement = placement
        self.records: list[dict[str, Any]] = []

    def pids(self) -> dict[int, int]:
        return {0: 1, 1: 2}

    def open(self, key: str = "john-key", tls: bool = False) -> Any:
        port = 40000 + len(self.records)
        worker = self.placement[len(self.records)]
        self.records.append({"peer": f"tcp4:127.0.0.1:{port}", "worker": worker})
        return EchoClient(("127.0.0.1", port))

    def sessions(self) -> list[dict[str, Any]]:
        return list(self.records)


class EchoClient:
    """A connected client as L{held_by} uses one: its port, and an echo."""

    def __init__(self, local_address: tuple[str, int]) -> None:
        self.local_address = local_address
        self._sent: list[str] = []

    def send(self, message: str) -> None:
        self._sent.append(message)

    def recv(self, timeout: float) -> str:
        return self._sent.pop(0)


def test_spread_opens_more_sessions_until_both_workers_hold_one() -> None:
    """All of the first 16 on one worker (as CI saw once): 3 more, the last on the other."""
    server: Any = Placed([1] * SPREAD + [1, 1, 2])
    assert len(spread(server)) == SPREAD + 3


def test_spread_gives_up_at_max_spread_naming_the_workers() -> None:
    server: Any = Placed([2] * MAX_SPREAD)
    with pytest.raises(
        AssertionError, match=r"all 64 sessions on worker\(s\) \[2\], none on \[1\]"
    ):
        spread(server)
    assert len(server.records) == MAX_SPREAD


def test_held_by_counts_only_the_sessions_it_opened() -> None:
    """Sessions opened before (another spread's) do not count for this one."""
    server: Any = Placed([1, 2] * (SPREAD // 2) + [2] * SPREAD + [2, 2, 2, 1])
    assert len(spread(server)) == SPREAD
    assert len(spread(server)) == SPREAD + 4


# -- through twistd ---------------------------------------------------------------


def listening(port: int) -> int:
    """How many sockets listen on 127.0.0.1:C{port} (Linux's /proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for row in rows if row[1] == local and row[3] == "0A")


def test_each_worker_listens_once_the_supervisor_says_serving(
    tmp_path: Path, running: list[Process]
) -> None:
    """
    A worker answers ready only once its listeners are in the kernel's
    SO_REUSEPORT group: when the supervisor says "2 workers serving", both
    workers' sockets listen on each port (the supervisor's reservation,
    bound but not listening, is not one of them).
    """
    server = start(running, tmp_path, free_admin_port())
    assert (listening(server.port), listening(server.tls_port)) == (2, 2)
    assert server.process.stop() == 0


def test_two_workers_serve_ws_and_wss_and_admin_covers_both(
    tmp_path: Path, running: list[Process]
) -> None:
    """
    Both workers serve both listeners (tcp: and tls:, on ports the
    supervisor chose for port 0); /sessions lists every worker's sessions,
    /metrics adds up the workers' counts, /readyz is ready, and DELETE
    /sessions closes the sessions of every worker.
    """
    server = start(running, tmp_path, free_admin_port())
    assert len(set(server.pids().values())) == 2
    clients = spread(server) + spread(server, tls=True)
    assert server.call("GET", "/readyz") == (200, b'{"ready":true,"reasons":[]}\n')
    status, body = server.call("GET", "/metrics")
    assert status == 200
    found = samples(body)
    assert found[
        ("wssec_handshakes_total", (("method", "key"), ("route", "/echo"), ("status", "101")))
    ] == len(clients)
    assert found[("wssec_connections_open", (("route", "/echo"),))] == len(clients)
    assert found[("wssec_workers_running", ())] == 2
    status, body = server.call("DELETE", "/sessions?consumer=john")
    assert (status, json.loads(body)) == (200, {"closed": len(clients)})
    assert [close_code(client) for client in clients] == [3003] * len(clients)
    assert server.call("DELETE", "/sessions?consumer=john&id=x")[0] == 400
    assert server.call("GET", "/sessions")[0] == 200
    no_token = urllib.request.Request(f"http://127.0.0.1:{server.admin}/sessions")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            no_token, timeout=TIMEOUT
        )
    assert refused.value.code == 401
    assert server.process.stop() == 0


def test_revocation_reaches_every_worker(tmp_path: Path, running: list[Process]) -> None:
    """
    POST /revocations of a token closes its sessions on both workers (one
    sum), and both refuse it from then on, even once started again.
    """
    server = start(running, tmp_path, free_admin_port())
    token = jwt.encode({"sub": "mary", "jti": "t-1", "exp": int(time.time()) + 600}, JWT_SECRET)
    clients = spread(server, f"jwt:{token}")
    status, body = server.call(
        "POST", "/revocations", {"jti": "t-1", "expires_at": time.time() + 600}
    )
    assert (status, json.loads(body)) == (200, {"closed": len(clients)})
    assert [close_code(client) for client in clients] == [3003] * len(clients)
    for _ in range(4):
        with pytest.raises(InvalidStatus, match="401"):
            server.open(f"jwt:{token}")
    # Workers started again after the revocation (both, in turn) refuse it too.
    for index in (0, 1):
        seen = len(server.process.lines)
        os.kill(server.pids()[index], signal.SIGKILL)
        started = re.compile(rf"wssec worker {index} started \(pid (\d+)\)")
        pid = server.process.wait_for(started, seen).group(1)
        server.process.wait_for(f"wssec worker {index} (pid {pid}) serving", seen)
    for _ in range(4):
        with pytest.raises(InvalidStatus, match="401"):
            server.open(f"jwt:{token}")
    assert server.process.stop() == 0


def test_killed_worker_loses_only_its_sessions_and_comes_back(
    tmp_path: Path, running: list[Process]
) -> None:
    """
    SIGKILL one worker: its sessions are cut, the other worker's stay; the
    supervisor logs the pid and status, starts a new worker, and it serves.
    """
    server = start(running, tmp_path, free_admin_port())
    clients = spread(server)
    placed = worker_of(server)
    by_client = [placed[_session_id(server, client)] for client in clients]
    victim = server.pids()[0]
    before = samples(server.call("GET", "/metrics")[1])
    seen = len(server.process.lines)
    os.kill(victim, signal.SIGKILL)
    server.process.wait_for(f"wssec worker 0 (pid {victim}) ended: killed by signal 9", seen)
    for client, pid in zip(clients, by_client, strict=True):
        if pid == victim:
            assert close_code(client) == 1006
        else:
            client.send("still")
            assert client.recv(TIMEOUT) == "still"
    replacement = int(
        server.process.wait_for(re.compile(r"wssec worker 0 started \(pid (\d+)\)"), seen).group(1)
    )
    server.process.wait_for(f"wssec worker 0 (pid {replacement}) serving", seen)
    assert server.call("GET", "/readyz")[0] == 200
    # The merged counters keep the killed worker's counts: none goes down.
    after = samples(server.call("GET", "/metrics")[1])
    grown = [k for k in before if k[0].endswith(("_total", "_bucket", "_sum", "_count"))]
    assert any(k[0] == "wssec_handshakes_total" for k in grown)
    assert [k for k in grown if after.get(k, -1) < before[k]] == []
    fresh = held_by(server, {replacement}, server.open)
    for client in fresh:
        client.send("new")
        assert client.recv(TIMEOUT) == "new"
    assert server.process.stop() == 0


def _session_id(server: Server, client: ClientConnection) -> str:
    """The id of a client's session: the one whose peer is its local port."""
    port = client.local_address[1]
    (record,) = [r for r in server.sessions() if r["peer"].endswith(f":{port}")]
    return str(record["id"])


def test_sigterm_closes_every_worker_session_with_1001(
    tmp_path: Path, running: list[Process]
) -> None:
    """SIGTERM to the supervisor: every client of both workers gets 1001; exit 0."""
    server = start(running, tmp_path, free_admin_port())
    clients = spread(server) + spread(server, tls=True)
    server.process.process.send_signal(signal.SIGTERM)
    assert [close_code(client) for client in clients] == [1001] * len(clients)
    assert server.process.stop() == 0
    output = server.process.output()
    assert output.count("stopped: exit status 0") == 2
    assert "Traceback" not in output, output


def test_sighup_reaches_both_workers(tmp_path: Path, running: list[Process]) -> None:
    """
    SIGHUP after removing a key: its sessions close with 3003 on both
    workers, the others stay; the removed key is refused by both.
    """
    server = start(running, tmp_path, free_admin_port())
    leaked = spread(server, "mary-leaked-key")
    kept = spread(server, "mary-key")
    path = tmp_path / "wssec.toml"
    path.write_text(path.read_text().replace(', "mary-leaked-key"', ""))
    seen = len(server.process.lines)
    server.process.process.send_signal(signal.SIGHUP)
    assert [close_code(client) for client in leaked] == [3003] * len(leaked)
    for client in kept:
        client.send("kept")
        assert client.recv(TIMEOUT) == "kept"
    wait_until(lambda: "".join(server.process.lines[seen:]).count("configuration reloaded") == 2)
    for _ in range(4):
        with pytest.raises(InvalidStatus, match="401"):
            server.open("mary-leaked-key")
    assert server.process.stop() == 0


def test_sighup_with_a_broken_file_is_refused_once(tmp_path: Path, running: list[Process]) -> None:
    """
    A broken file: the supervisor refuses it in one log line naming the key
    path, the workers are not asked and keep serving with the old file.
    """
    server = start(running, tmp_path, free_admin_port())
    clients = spread(server)
    path = tmp_path / "wssec.toml"
    good = path.read_text()
    path.write_text(good.replace('app = "echo"', 'app = "echo"\nidle = 1'))
    seen = len(server.process.lines)
    server.process.process.send_signal(signal.SIGHUP)
    line = server.process.wait_for("configuration reload failed", seen).string
    assert "route[0].idle" in line
    for client in clients:
        client.send("still")
        assert client.recv(TIMEOUT) == "still"
    # A good file then reaches both workers: the broken one reached none.
    path.write_text(good)
    server.process.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "".join(server.process.lines[seen:]).count("configuration reloaded") == 2)
    assert "".join(server.process.lines[seen:]).count("configuration reload failed") == 1
    assert server.process.stop() == 0


# -- the key ----------------------------------------------------------------------

ROUTE = {"route": [{"path": "/e", "app": "echo", "auth": ["anonymous"]}]}


def config(**server: Any) -> Any:
    return parse({"server": server, **ROUTE, "auth": {"anonymous": {}}})


def test_workers_default_auto_and_values() -> None:
    assert config().workers == 1
    assert config(workers=3).workers == 3
    assert config(workers="auto").workers == (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "server.workers: must be at least 1"),
        (-2, "server.workers: must be at least 1"),
        ("many", 'server.workers: expected an integer or "auto"'),
        (True, 'server.workers: expected an integer or "auto"'),
        (2.0, 'server.workers: expected an integer or "auto"'),
    ],
)
def test_workers_errors(value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config(workers=value)


def test_workers_share_tcp_listeners_only() -> None:
    with pytest.raises(
        ConfigError, match=r"server\.workers: .* server\.listen\[1\] 'unix:/tmp/w\.sock'"
    ):
        config(workers=2, listen=["tcp:9080:interface=127.0.0.1", "unix:/tmp/w.sock"])
    assert config(workers=1, listen=["unix:/tmp/w.sock"]).workers == 1


# -- merging the metrics ----------------------------------------------------------


def worker_metrics(handshakes: int, open_now: int, seconds: float) -> str:
    registry = CollectorRegistry()
    Counter("wssec_handshakes", "h", ["route"], registry=registry).labels("/a").inc(handshakes)
    Gauge("wssec_connections_open", "o", ["route"], registry=registry).labels('/a"b').set(open_now)
    Histogram("wssec_d", "d", ["route"], buckets=(0.1, 1.0), registry=registry).labels(
        "/a"
    ).observe(seconds)
    return generate_latest(registry).decode()


def test_merge_adds_up_samples_with_the_same_name_and_labels() -> None:
    first, second = worker_metrics(3, 2, 0.05), worker_metrics(4, 5, 0.5)
    merged = samples(merged_text([first, second]))
    assert merged[("wssec_handshakes_total", (("route", "/a"),))] == 7
    assert merged[("wssec_connections_open", (("route", '/a"b'),))] == 7
    assert merged[("wssec_d_bucket", (("le", "0.1"), ("route", "/a")))] == 1
    assert merged[("wssec_d_bucket", (("le", "1.0"), ("route", "/a")))] == 2
    assert merged[("wssec_d_count", (("route", "/a"),))] == 2
    assert merged[("wssec_d_sum", (("route", "/a"),))] == pytest.approx(0.55)
    created = [
        samples(text.encode())[("wssec_handshakes_created", (("route", "/a"),))]
        for text in (first, second)
    ]
    assert merged[("wssec_handshakes_created", (("route", "/a"),))] == min(created)


def test_merge_keeps_the_counters_of_a_worker_that_ended() -> None:
    """
    A worker that ends (not running, then a new pid in its slot) keeps its
    last counter and histogram samples in every later merge, so that no
    merged counter goes down; its gauges are not carried over.
    """
    scrapes = Scrapes()
    handshakes = ("wssec_handshakes_total", (("route", "/a"),))
    bucket = ("wssec_d_bucket", (("le", "1.0"), ("route", "/a")))
    count = ("wssec_d_count", (("route", "/a"),))
    gauge = ("wssec_connections_open", (("route", '/a"b'),))

    def scrape(*answers: tuple[int, int | None, str | None]) -> dict[Any, float]:
        return samples(merged_text(scrapes.texts(answers)))

    first = scrape((0, 10, worker_metrics(3, 2, 0.05)), (1, 11, worker_metrics(4, 5, 0.5)))
    assert (first[handshakes], first[bucket], first[count], first[gauge]) == (7, 2, 2, 7)
    dead = scrape((0, None, None), (1, 11, worker_metrics(5, 5, 0.5)))
    assert (dead[handshakes], dead[bucket], dead[count], dead[gauge]) == (8, 2, 2, 5)
    again = scrape((0, 12, worker_metrics(1, 1, 0.5)), (1, 11, worker_metrics(6, 5, 0.5)))
    assert (again[handshakes], again[bucket], again[count], again[gauge]) == (10, 3, 3, 6)
    # A running worker that does not answer stands in with its last counters.
    silent = scrape((0, 12, None), (1, 11, worker_metrics(6, 5, 0.5)))
    assert (silent[handshakes], silent[count], silent[gauge]) == (10, 3, 5)
    for name, value in first.items():
        if name[0].endswith(("_total", "_bucket", "_sum", "_count")):
            assert dead[name] >= value and again[name] >= dead[name]


# -- restarts ---------------------------------------------------------------------


def test_a_worker_that_dies_at_start_is_restarted_later_and_later() -> None:
    """
    A worker that ends within STEADY seconds of its start waits before its
    restart, twice as long each time up to MAX_DELAY; one that ran longer is
    restarted at once. Each end is logged with its pid and status.
    """
    clock = Clock()
    loaded = config(workers=2)
    supervisor = Supervisor("wssec.toml", loaded, clock)
    worker = WorkerProcess(supervisor, 0, "unused.sock")
    supervisor.workers = [worker]
    spawned: list[float] = []

    def spawn(which: WorkerProcess) -> None:
        spawned.append(clock.seconds())
        which.pid, which.started = 4242, clock.seconds()

    supervisor._spawn = spawn  # type: ignore[method-assign]
    logged: list[str] = []
    delays = []
    with capturedLogs(logged):
        for _ in range(8):
            spawn(worker)
            clock.advance(0.1)
            worker.processEnded(Failure(ProcessTerminated(exitCode=1)))
            call = supervisor._restarts[0]
            delays.append(round(call.getTime() - clock.seconds(), 3))
            clock.advance(call.getTime() - clock.seconds())
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert "wssec worker 0 (pid 4242) ended: exit status 1; starting it again in 0.5s" in logged
    spawn(worker)
    clock.advance(STEADY)
    worker.processEnded(Failure(ProcessTerminated(signal=9)))
    assert supervisor._restarts[0].getTime() == clock.seconds()


@contextmanager
def capturedLogs(lines: list[str]) -> Iterator[None]:
    def observer(event: Any) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        yield
    finally:
        globalLogPublisher.removeObserver(observer)


def reopened_by(log: Path) -> set[int]:
    """The worker pids whose "Log file reopened" line is in the JSON C{log}."""
    records = [json.loads(line) for line in log.read_text().splitlines() if line]
    return {
        r["worker_pid"]
        for r in records
        if r.get("message") == "Log file reopened on SIGUSR1" and "worker_pid" in r
    }


def test_one_json_log_for_every_worker_reopened_on_sigusr1(
    tmp_path: Path, running: list[Process]
) -> None:
    """
    With [log] format = "json" and a file, the supervisor writes every
    worker's events to the one file (each with its worker_pid) and reopens
    it on SIGUSR1; the workers ignore SIGUSR1 and keep serving.
    """
    log = tmp_path / "wssec.json"
    folder = tmp_path
    write_dev_certificates(folder / "dev-certs")
    path = folder / "wssec.toml"
    admin = free_admin_port()
    path.write_text(config_text(admin) + f'\n[log]\nformat = "json"\nfile = "{log}"\n')
    process = twistd(path, folder)
    running.append(process)
    wait_until(lambda: log.exists() and "2 workers serving" in log.read_text(), WORKERS_STARTING)
    process.lines[:] = log.read_text().splitlines(keepends=True)
    server = Server(process, admin)
    clients = spread(server)
    log.rename(tmp_path / "wssec.json.1")
    process.process.send_signal(signal.SIGUSR1)
    wait_until(log.exists)
    # Each worker says so in the new file once it writes there.
    wait_until(lambda: reopened_by(log) >= set(server.pids().values()))
    for client in clients:
        client.close()
    wait_until(lambda: log.read_text().count('"event":"session.closed"') == len(clients))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    closed = [r for r in records if r["event"] == "session.closed"]
    assert {r["worker_pid"] for r in closed} == set(server.pids().values())
    opened = (tmp_path / "wssec.json.1").read_text().count('"event":"session.opened"')
    assert opened == len(clients)
    assert process.stop() == 0


def test_workers_serve_mutual_tls(tmp_path: Path, running: list[Process]) -> None:
    """
    A tls: listener with client certificates required: both workers load the
    CA and check the client's certificate; a client without one is refused.
    """
    from test_mtls import PKI
    from test_mtls import config_text as mtls_config

    pki = PKI.create(tmp_path)
    pki.client("alice")
    admin = free_admin_port()
    digest = hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()
    text = mtls_config().replace("[server]\n", "[server]\nworkers = 2\n", 1)
    text += f'\n[admin]\nlisten = ["tcp:{admin}:interface=127.0.0.1"]\ntoken = "sha256:{digest}"\n'
    path = tmp_path / "wssec.toml"
    path.write_text(text)
    process = twistd(path, tmp_path)
    running.append(process)
    process.wait_for("wssec 2 workers serving", timeout=WORKERS_STARTING)
    port = int(process.wait_for(RESERVED).group(2))
    server = Server.__new__(Server)
    server.process, server.admin = process, admin
    url = f"wss://127.0.0.1:{port}/echo"
    # TLS 1.2: see processes.sync_tls.
    alice = pki.context("alice", TLS1_2)
    workers = set(server.pids().values())
    clients = held_by(server, workers, lambda: connect(url, ssl=alice, proxy=None))
    for client in clients:
        client.send("mutual")
        assert client.recv(TIMEOUT) == "mutual"
    records = server.sessions()
    assert {r["worker"] for r in records} == workers
    assert {r["method"] for r in records} == {"tls"}
    with pytest.raises((ssl.SSLError, OSError, EOFError, ConnectionClosed, InvalidHandshake)):
        with connect(url, ssl=pki.context(None, TLS1_2), proxy=None) as anonymous:
            anonymous.send("x")
            anonymous.recv(TIMEOUT)
    assert process.stop() == 0


# -- shared listeners -------------------------------------------------------------


def test_shared_endpoints_keep_each_listener_s_options(tmp_path: Path) -> None:
    """tcp:, tcp6: and tls: listeners become shared ones with their own options."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import UNIXServerEndpoint

    from txwssec.reuseport import shared

    write_dev_certificates(tmp_path / "dev-certs")
    loaded = parse(
        {
            "server": {
                "listen": [
                    "tcp:0:interface=127.0.0.1:backlog=7",
                    "tcp6:0:interface=\\:\\:1",
                    "tls:0:interface=127.0.0.1",
                ],
                "workers": 2,
            },
            "tls": {"cert": "dev-certs/server.pem", "key": "dev-certs/server.key"},
            **ROUTE,
            "auth": {"anonymous": {}},
        },
        base_dir=tmp_path,
    )
    found = [shared(e, reactor, 5555) for e in loaded.endpoints(reactor)]
    assert [(e.port, e.interface, e.backlog) for e in found] == [
        (5555, "127.0.0.1", 7),
        (5555, "::1", 1024),
        (5555, "127.0.0.1", 1024),
    ]
    assert [e.context is loaded.tls for e in found] == [False, False, True]
    with pytest.raises(ValueError, match="workers cannot share a UNIXServerEndpoint"):
        shared(UNIXServerEndpoint(reactor, str(tmp_path / "s")), reactor)


def test_a_taken_port_fails_the_start(tmp_path: Path, running: list[Process]) -> None:
    """A port another socket listens on (without SO_REUSEPORT): exit status 1."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        path = tmp_path / "wssec.toml"
        path.write_text(config_text(free_admin_port()).replace("tcp:0:", f"tcp:{port}:", 1))
        write_dev_certificates(tmp_path / "dev-certs")
        process = twistd(path, tmp_path)
        running.append(process)
        assert process.wait() == 1
    assert f"wssec cannot listen on tcp:{port}:interface=127.0.0.1" in process.output()
    assert "worker 0 started" not in process.output()


def test_reserve_a_port_with_connections_in_time_wait() -> None:
    """
    A port whose earlier server closed connections itself (they wait in
    TIME_WAIT) can be reserved at once, as a single process can listen on
    it: moving from one process to workers needs no pause.
    """
    from txwssec.reuseport import SharedPortEndpoint, reserve

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server closes first: its side waits in TIME_WAIT
    assert client.recv(1) == b""
    client.close()
    listener.close()
    reserved = reserve(SharedPortEndpoint(None, port, "127.0.0.1", 50))
    try:
        assert reserved.getsockname()[1] == port
    finally:
        reserved.close()


def test_ports_are_reserved_in_start_service_after_twistd_drops_privileges() -> None:
    """
    twistd calls privilegedStartService, then drops privileges (--uid,
    --gid), then startService; Linux shares a port with SO_REUSEPORT only
    between sockets of one user, so the supervisor reserves the workers'
    ports in startService, as the workers' user, not before.
    """
    loaded = config(workers=2, listen=["tcp:0:interface=127.0.0.1"])
    supervisor = Supervisor("wssec.toml", loaded, Clock())
    supervisor._spawn = lambda worker: None  # type: ignore[method-assign]
    hangup = signal.getsignal(signal.SIGHUP)
    try:
        supervisor.privilegedStartService()
        assert supervisor.ports == []
        assert supervisor._reserved == []
        supervisor.startService()
        assert len(supervisor.ports) == 1
        assert supervisor._reserved[0].getsockname()[1] == supervisor.ports[0]
    finally:
        signal.signal(signal.SIGHUP, hangup)
        for sock in supervisor._reserved:
            sock.close()
        if supervisor._directory:
            shutil.rmtree(supervisor._directory, ignore_errors=True)
