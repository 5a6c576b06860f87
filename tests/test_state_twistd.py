"""
Two C{twistd wssec} processes ("nodes") sharing their state through one
real redis-server (C{[state] backend = "redis"}): a per-consumer cap holds
across them, a ticket issued on one opens one session on the other, an
admin revocation or kick on one closes the session on the other with 3003
within a second, the failed-login lockout counts the failures of both, and
the admin session list shows both. Redis stopped: 503 for new handshakes,
C{/readyz} 503, open sessions still echo; Redis started again: service is
back without a restart of txwssec, and each change is logged once.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jwt
import pytest
from processes import TIMEOUT, Process, free_port, twistd
from redisserver import RedisServer, redis_server  # noqa: F401
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

KEY = "john-key-5d1c0e7a"
WRONG_KEY = "wrong-key-9b8a7c6d"
JWT_SECRET = "jwt-secret-for-the-state-tests-0123456789"
ADMIN_TOKEN = "admin-token-state-3c2b1a"
REDIS_PASSWORD = "redis-password-never-logged"


class Node:
    """One twistd wssec process: its WebSocket and admin ports."""

    def __init__(self, process: Process, port: int, admin: int) -> None:
        self.process, self.port, self.admin = process, port, admin

    def admin_call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
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
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def ready(self) -> int:
        return self.admin_call("GET", "/readyz")[0]

    def websocket(self, path: str = "/echo", **headers: str) -> Any:
        return connect(
            f"ws://127.0.0.1:{self.port}{path}",
            additional_headers=headers,
            open_timeout=TIMEOUT,
            proxy=None,
        )

    def status(self, path: str = "/echo", **headers: str) -> int:
        try:
            with self.websocket(path, **headers):
                return 101
        except InvalidStatus as refused:
            return refused.response.status_code

    def ticket(self) -> str:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/echo", data=b"", method="POST", headers={"apikey": KEY}
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=TIMEOUT) as response:
            assert response.status == 201
            ticket: str = json.loads(response.read())["ticket"]
            return ticket


def write_config(
    folder: Path, name: str, redis: RedisServer, failures: int
) -> tuple[Path, int, int]:
    port, admin = free_port(), free_port()
    digest = hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()
    config = folder / f"{name}.toml"
    config.write_text(
        f"""
[server]
listen = ["tcp:{port}:interface=127.0.0.1"]
auth_failures_per_minute = {failures}
max_connections_per_ip = 3

[admin]
listen = ["tcp:{admin}:interface=127.0.0.1"]
token = "sha256:{digest}"

[state]
backend = "redis"
url = "redis://:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/3"
prefix = "nodes:"
timeout = 1

[auth.key]
header = "apikey"

[auth.jwt]
secret = "{JWT_SECRET}"

[[consumer]]
name = "john"
keys = ["{KEY}"]

[[route]]
path = "/echo"
app = "echo"
auth = ["key"]
tickets = true

[route.limits]
connections_per_consumer = 2

[[route]]
path = "/jwt"
app = "echo"
auth = ["jwt"]
"""
    )
    return config, port, admin


def wait_until(condition: Any, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


@pytest.fixture
def two_nodes(redis_server: RedisServer, tmp_path: Path, request: Any) -> Iterator[list[Node]]:  # noqa: F811
    failures = getattr(request, "param", 10)
    redis_server.command(b"CONFIG", b"SET", b"requirepass", REDIS_PASSWORD.encode())
    redis_server.password = REDIS_PASSWORD
    nodes = []
    try:
        for name in ("a", "b"):
            config, port, admin = write_config(tmp_path, name, redis_server, failures)
            process = twistd(config, tmp_path)
            node = Node(process, port, admin)
            nodes.append(node)
            process.wait_for("wssec state store ready")
            process.wait_for(f"wssec listening on admin tcp:{admin}")
        yield nodes
    finally:
        for node in nodes:
            node.process.kill()
    for node in nodes:
        assert REDIS_PASSWORD not in node.process.output()


def echo(ws: Any, text: str) -> None:
    ws.send(text)
    assert ws.recv(TIMEOUT) == text


def closed_code(ws: Any, timeout: float) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout)
    return closed.value.rcvd.code if closed.value.rcvd else None


def test_connections_per_consumer_hold_across_nodes(two_nodes: list[Node]) -> None:
    a, b = two_nodes
    assert a.ready() == b.ready() == 200
    with a.websocket(apikey=KEY) as first, b.websocket(apikey=KEY) as second:
        echo(first, "one")
        echo(second, "two")
        assert a.status(apikey=KEY) == 429
        assert b.status(apikey=KEY) == 429
        # The admin list of either node shows both sessions (each node sends
        # its records within 50 ms).
        wait_until(lambda: len(a.admin_call("GET", "/sessions")[1]) == 2)
        status, listed = a.admin_call("GET", "/sessions")
        assert status == 200
        assert [s["consumer"] for s in listed] == ["john", "john"]
        assert {s["route"] for s in listed} == {"/echo"}
    # Released on both: room again.
    wait_until(lambda: b.status(apikey=KEY) == 101)


def test_max_connections_per_ip_holds_across_nodes(two_nodes: list[Node]) -> None:
    a, b = two_nodes
    now = int(time.time())
    token = jwt.encode({"sub": "john", "exp": now + 600, "iat": now - 5}, JWT_SECRET, "HS256")
    bearer = {"Authorization": f"Bearer {token}"}
    with a.websocket("/jwt", **bearer) as one, b.websocket("/jwt", **bearer) as two:
        with a.websocket(apikey=KEY) as three:
            for ws in (one, two, three):
                echo(ws, "hello")
            # A fourth from 127.0.0.1, on either node (/jwt has no consumer cap).
            assert b.status("/jwt", **bearer) == 429
            assert a.status("/jwt", **bearer) == 429
        wait_until(lambda: b.status("/jwt", **bearer) == 101)


def test_a_ticket_of_one_node_opens_once_on_the_other(two_nodes: list[Node]) -> None:
    a, b = two_nodes
    ticket = a.ticket()
    with b.websocket(f"/echo?ticket={ticket}") as ws:
        echo(ws, "ticketed")
    assert a.status(f"/echo?ticket={ticket}") == 401
    assert b.status(f"/echo?ticket={ticket}") == 401


def test_a_revocation_on_one_node_closes_the_session_on_the_other(
    two_nodes: list[Node],
) -> None:
    a, b = two_nodes
    now = int(time.time())
    token = jwt.encode(
        {"sub": "john", "exp": now + 600, "iat": now - 5, "jti": "t-1"}, JWT_SECRET, "HS256"
    )
    bearer = {"Authorization": f"Bearer {token}"}
    with b.websocket("/jwt", **bearer) as ws:
        echo(ws, "before")
        status, answer = a.admin_call(
            "POST", "/revocations", {"consumer": "john", "issued_before": now}
        )
        assert (status, answer) == (200, {"closed": 0})
        started = time.monotonic()
        assert closed_code(ws, 1.0) == 3003
        assert time.monotonic() - started < 1.0
    assert b.status("/jwt", **bearer) == 401
    assert a.status("/jwt", **bearer) == 401
    # A kick by consumer on one node closes the key session on the other.
    with a.websocket(apikey=KEY) as ws:
        echo(ws, "kick me")
        assert b.admin_call("DELETE", "/sessions?consumer=john") == (200, {"closed": 0})
        assert closed_code(ws, 1.0) == 3003
    # And by id, listed by the other node.
    with b.websocket(apikey=KEY) as ws:
        echo(ws, "and me")
        wait_until(lambda: len(a.admin_call("GET", "/sessions")[1]) == 1)
        status, listed = a.admin_call("GET", "/sessions")
        assert status == 200 and len(listed) == 1
        assert a.admin_call("DELETE", f"/sessions?id={listed[0]['id']}") == (200, {"closed": 0})
        assert closed_code(ws, 1.0) == 3003


@pytest.mark.parametrize("two_nodes", [3], indirect=True)
def test_the_lockout_counts_failures_on_both_nodes(two_nodes: list[Node]) -> None:
    a, b = two_nodes
    assert a.status(apikey=WRONG_KEY) == 401
    assert b.status(apikey=WRONG_KEY) == 401
    assert a.status(apikey=WRONG_KEY) == 401
    # Three failures in the minute, on two nodes: locked out on both (told
    # through Redis, at once; a moment is allowed for the message to arrive).
    wait_until(lambda: b.status(apikey=KEY) == 429)
    assert a.status(apikey=KEY) == 429


def test_redis_away_gives_503_and_open_sessions_carry_on(
    two_nodes: list[Node],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    a, b = two_nodes
    ticket = a.ticket()
    with a.websocket(apikey=KEY) as ws:
        echo(ws, "before")
        redis_server.stop()
        wait_until(lambda: a.ready() == 503 and b.ready() == 503)
        _, body = a.admin_call("GET", "/readyz")
        assert json.loads(body)["reasons"][0].startswith("state: redis: ")
        assert a.status(apikey=KEY) == 503
        assert b.status(apikey=KEY) == 503
        assert b.status(f"/echo?ticket={ticket}") == 503
        echo(ws, "during")  # the open session carries on
        # A few attempts to connect again (0.2 s, then doubling up to 2 s):
        # none is logged, only the loss and the restoration, once each.
        time.sleep(2.5)
        redis_server.start()
        wait_until(lambda: a.ready() == 200 and b.ready() == 200)
        echo(ws, "after")
        # Redis lost everything (nothing is saved): the ticket is gone, never used twice.
        assert b.status(f"/echo?ticket={ticket}") == 401
        with b.websocket(apikey=KEY) as second:
            echo(second, "back")
            # The open session's lease was written again: the cap still holds.
            assert a.status(apikey=KEY) == 429
    for node in two_nodes:
        output = node.process.output()
        assert output.count("wssec state store lost") == 1, output
        assert output.count("wssec state store restored") == 1, output
        assert "Scheduling retry" not in output, output


def test_a_node_that_stops_gives_its_places_back_at_once(two_nodes: list[Node]) -> None:
    a, b = two_nodes
    with ExitStack() as stack:
        first = stack.enter_context(a.websocket(apikey=KEY))
        second = stack.enter_context(a.websocket(apikey=KEY))
        echo(first, "one")
        echo(second, "two")
        assert b.status(apikey=KEY) == 429
        # SIGTERM: 1001 to both, their leases given back before the node leaves
        # (not 30 s later, when they would expire).
        assert a.process.stop() == 0
    with b.websocket(apikey=KEY) as ws, b.websocket(apikey=KEY) as ws2:
        echo(ws, "three")
        echo(ws2, "four")
