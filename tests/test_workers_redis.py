"""
C{[server] workers = 2} with C{[state] backend = "redis"}, through the real
C{twistd wssec} and one real redis-server: a per-consumer cap holds across
the two workers, a ticket issued by one worker opens once on the other, and
the supervisor's admin API counts and lists each session once (the workers
read one shared session list, and a close told to every worker is also
broadcast by each over Redis PUB/SUB).
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jwt
import pytest
from processes import TIMEOUT, WORKERS_STARTING, Process, free_port, twistd
from redisserver import RedisServer, redis_server  # noqa: F401
from test_workers import JWT_SECRET, Server, close_code, config_text, echoed, wait_until
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")

ISSUED = re.compile(r"worker=(\d) pid=(\d+)\].*ticket")


def redis_config(admin: int, redis: RedisServer, cap: int) -> str:
    routes = (
        "" if not cap else f"tickets = true\n\n[route.limits]\nconnections_per_consumer = {cap}\n"
    )
    return (
        config_text(admin)
        + routes
        + f"""
[state]
backend = "redis"
url = "redis://127.0.0.1:{redis.port}/2"
prefix = "workers:"
timeout = 1
"""
    )


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Process]]:
    processes: list[Process] = []
    yield processes
    for index, process in enumerate(processes):
        process.kill()
        (tmp_path / f"twistd-{index}.out").write_text(process.output())


def start(
    started: list[Process],
    folder: Path,
    redis: RedisServer,
    cap: int = 2,
) -> Server:
    from txwssec.devcert import write_dev_certificates

    write_dev_certificates(folder / "dev-certs")
    admin = free_port()
    path = folder / "wssec.toml"
    path.write_text(redis_config(admin, redis, cap))
    process = twistd(path, folder)
    started.append(process)
    process.wait_for("wssec 2 workers serving", timeout=WORKERS_STARTING)
    return Server(process, admin)


def listed(server: Server, count: int) -> list[dict[str, Any]]:
    """The session list, once it has C{count} sessions (each worker writes within 50 ms)."""
    wait_until(lambda: len(server.sessions()) == count)
    return server.sessions()


def status(server: Server, key: str = "john-key", query: str = "") -> int:
    try:
        with server.open(key) if not query else _ticketed(server, query):
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


def _ticketed(server: Server, query: str) -> ClientConnection:
    from websockets.sync.client import connect

    url = f"ws://127.0.0.1:{server.port}/echo?{query}"
    return connect(url, proxy=None, open_timeout=TIMEOUT)


def test_connections_per_consumer_hold_across_two_workers(
    tmp_path: Path,
    started: list[Process],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    server = start(started, tmp_path, redis_server)
    pids = set(server.pids().values())
    with ExitStack() as stack:
        stack.enter_context(echoed(server.open()))
        # A second session on the other worker: sessions are spread by the
        # kernel (a hash of the client's port); one on the same worker is
        # closed and opened again.
        for _ in range(40):
            second = echoed(server.open())
            records = listed(server, 2)
            if {r["worker"] for r in records} == pids:
                stack.enter_context(second)
                break
            second.close()
            wait_until(lambda: len(server.sessions()) == 1)
        else:
            pytest.fail("the second session never went to the other worker")
        # The cap (2) is reached across both workers: a third is refused
        # whichever worker takes it (tried often enough to reach both).
        assert [status(server) for _ in range(8)] == [429] * 8
        # mary has her own count.
        with server.open("mary-key") as mary:
            echoed(mary)
    # Both released: room again.
    wait_until(lambda: status(server) == 101)
    assert server.process.stop() == 0


def _ticket(server: Server) -> tuple[str, int]:
    """A ticket issued through the admin-less HTTP POST, and the worker pid that issued it."""
    seen = len(server.process.lines)
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/echo",
        data=b"",
        method="POST",
        headers={"apikey": "mary-key"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=TIMEOUT) as response:
        assert response.status == 201
        ticket: str = json.loads(response.read())["ticket"]
    return ticket, int(server.process.wait_for(ISSUED, seen).group(2))


def test_a_ticket_of_one_worker_opens_once_on_the_other(
    tmp_path: Path,
    started: list[Process],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    server = start(started, tmp_path, redis_server)
    for _ in range(40):
        ticket, issuer = _ticket(server)
        with _ticketed(server, f"ticket={ticket}") as client:
            echoed(client)
            (record,) = listed(server, 1)
        wait_until(lambda: server.sessions() == [])
        if record["worker"] != issuer:
            break
    else:
        pytest.fail("a ticket was never used on the other worker")
    # Used once: refused by both workers from then on.
    assert [status(server, query=f"ticket={ticket}") for _ in range(8)] == [401] * 8
    assert server.process.stop() == 0


def _spread(server: Server, key: str, count: int = 8) -> list[ClientConnection]:
    """
    At least C{count} sessions of C{key}, held by both workers: the kernel
    spreads SO_REUSEPORT connections by a hash of their addresses, so all
    of a few can land on one worker (8 of them about once in 128): open
    more until both hold some.
    """
    workers = set(server.pids().values())
    clients = [echoed(server.open(key)) for _ in range(count)]
    while {r["worker"] for r in listed(server, len(clients))} != workers:
        assert len(clients) < 64, "SO_REUSEPORT gave every connection to one worker"
        clients.append(echoed(server.open(key)))
    return clients


def test_admin_counts_and_lists_each_session_once(
    tmp_path: Path,
    started: list[Process],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    server = start(started, tmp_path, redis_server, cap=0)
    expires = int(time.time()) + 600
    for round in range(3):
        claims = {"sub": "mary", "jti": f"t-{round}", "exp": expires}
        token = jwt.encode(claims, JWT_SECRET)
        johns = _spread(server, "john-key")
        marys = [echoed(server.open("mary-key")) for _ in range(3)]
        jwts = [echoed(server.open(f"jwt:{token}")) for _ in range(2)]
        # Each session listed once, with the worker that holds it.
        records = listed(server, len(johns) + 5)
        assert len({r["id"] for r in records}) == len(johns) + 5
        assert {r["worker"] for r in records} <= set(server.pids().values())
        status, body = server.call("DELETE", "/sessions?consumer=john")
        assert (status, json.loads(body)) == (200, {"closed": len(johns)})
        assert [close_code(c) for c in johns] == [3003] * len(johns)
        revocation = {"jti": f"t-{round}", "expires_at": expires}
        status, body = server.call("POST", "/revocations", revocation)
        assert (status, json.loads(body)) == (200, {"closed": 2})
        assert [close_code(c) for c in jwts] == [3003] * 2
        status, body = server.call("DELETE", "/sessions?consumer=mary")
        assert (status, json.loads(body)) == (200, {"closed": 3})
        assert [close_code(c) for c in marys] == [3003] * 3
        wait_until(lambda: server.sessions() == [])
    assert server.process.stop() == 0
