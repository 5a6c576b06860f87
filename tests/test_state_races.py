"""
Attacks on the Redis state store against real C{twistd wssec} nodes and a
real redis-server (as tests/test_state_twistd.py): a connection that ends
while another connection's lease is being asked of Redis must not leave a
lease behind for ever (renewed by the node's heartbeat, it would hold a
place of the consumer's cap on every node until the node stops); a
revocation must outlive a restart of a Redis that persists nothing, as the
documentation allows.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import jwt
import pytest
from processes import TIMEOUT, WORKERS_STARTING, free_port, twistd
from redisserver import RedisServer, redis_server  # noqa: F401
from test_state_twistd import (  # noqa: F401
    JWT_SECRET,
    KEY,
    REDIS_PASSWORD,
    Node,
    echo,
    two_nodes,
    wait_until,
    write_config,
)

from txwssec.devcert import write_dev_certificates

#: How long Redis is kept busy (DEBUG SLEEP) while a handshake waits for it;
#: under the nodes' [state] timeout below, so the handshake gets Redis's answer.
SLOW = 1.5


@pytest.fixture
def slow_node(redis_server: RedisServer, tmp_path: Path) -> Iterator[Node]:  # noqa: F811
    redis_server.command(b"CONFIG", b"SET", b"requirepass", REDIS_PASSWORD.encode())
    redis_server.password = REDIS_PASSWORD
    config, port, admin = write_config(tmp_path, "a", redis_server, 10)
    config.write_text(config.read_text().replace("timeout = 1\n", "timeout = 10\n"))
    process = twistd(config, tmp_path)
    try:
        process.wait_for("wssec state store ready")
        process.wait_for(f"wssec listening on admin tcp:{admin}")
        yield Node(process, port, admin)
    finally:
        process.kill()


def test_a_release_during_a_pending_acquire_leaks_no_lease(
    slow_node: Node,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    node = slow_node
    results: dict[str, Any] = {}
    with node.websocket(apikey=KEY) as first:
        echo(first, "one")
        with node.websocket(apikey=KEY) as second:
            echo(second, "two")
            # Redis busy: the third handshake's lease waits for it, while the
            # second connection ends (its lease is not given back then: the
            # node counts three connections for two leases).
            sleeper = threading.Thread(
                target=redis_server.command, args=(b"DEBUG", b"SLEEP", str(SLOW).encode())
            )
            sleeper.start()
            time.sleep(0.2)
            third = threading.Thread(
                target=lambda: results.setdefault("status", node.status(apikey=KEY))
            )
            third.start()
            time.sleep(0.2)
        third.join()
        sleeper.join()
        # Both leases were still there when Redis ran the third's script.
        assert results["status"] == 429
    # Every connection ended: the consumer has its two places again.
    with node.websocket(apikey=KEY) as one, node.websocket(apikey=KEY) as two:
        echo(one, "three")
        echo(two, "four")


def test_a_revocation_outlives_a_restart_of_redis_without_persistence(
    two_nodes: list[Node],  # noqa: F811
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    # The documented setup ("nothing in it needs to survive a restart of
    # Redis: run it without persistence"): Redis restarts empty while the
    # nodes that know the revocation run; a node that starts afterwards
    # must refuse the revoked token too.
    a, b = two_nodes
    now = int(time.time())
    token = jwt.encode(
        {"sub": "john", "exp": now + 600, "iat": now - 5, "jti": "kept-1"}, JWT_SECRET, "HS256"
    )
    bearer = {"Authorization": f"Bearer {token}"}
    assert a.admin_call("POST", "/revocations", {"jti": "kept-1", "expires_at": now + 600}) == (
        200,
        {"closed": 0},
    )
    assert b.status("/jwt", **bearer) == 401
    redis_server.stop()
    wait_until(lambda: a.ready() == 503 and b.ready() == 503)
    redis_server.start()
    wait_until(lambda: a.ready() == 200 and b.ready() == 200)
    config, port, admin = write_config(tmp_path, "c", redis_server, 10)
    process = twistd(config, tmp_path)
    try:
        process.wait_for("wssec state store ready")
        process.wait_for(f"wssec listening on admin tcp:{admin}")
        c = Node(process, port, admin)
        assert c.status("/jwt", **bearer) == 401
    finally:
        process.kill()


def test_a_worker_started_again_applies_the_kept_revocations_quietly(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    # workers = 2 with Redis: the supervisor keeps the revocations for the
    # workers it starts later, which apply them before their store is
    # connected: no "Unhandled error in Deferred" (a critical log line).
    from test_workers import Server, config_text

    write_dev_certificates(tmp_path / "dev-certs")
    admin = free_port()
    config = tmp_path / "wssec.toml"
    config.write_text(
        config_text(admin)
        + f'\n[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:{redis_server.port}/0"\n'
    )
    process = twistd(config, tmp_path)
    try:
        process.wait_for("wssec 2 workers serving", timeout=WORKERS_STARTING)
        server = Server(process, admin)
        revoked = {"jti": "t-1", "expires_at": time.time() + 600}
        assert server.call("POST", "/revocations", revoked) == (200, b'{"closed":0}\n')
        seen = len(process.lines)
        os.kill(server.pids()[0], signal.SIGKILL)
        process.wait_for(re.compile(r"wssec worker 0 \(pid \d+\) serving"), seen)
        assert process.stop() == 0
        assert "Unhandled error" not in process.output()
    finally:
        process.kill()


def test_a_handshake_dropped_while_its_lease_is_asked_leaks_no_lease(
    slow_node: Node,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    node = slow_node
    request = (
        "GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\napikey: {KEY}\r\n\r\n"
    ).encode()
    sleeper = threading.Thread(
        target=redis_server.command, args=(b"DEBUG", b"SLEEP", str(SLOW).encode())
    )
    sleeper.start()
    time.sleep(0.2)
    # Two handshakes wait for their leases; their clients go away meanwhile.
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", node.port)) as dropped:
            dropped.sendall(request)
            time.sleep(0.1)
    sleeper.join()
    # Their leases are given back as soon as Redis answers (a handshake
    # sent at that very moment may still find them: hence the wait).
    wait_until(lambda: node.status(apikey=KEY) == 101)
    with node.websocket(apikey=KEY) as one, node.websocket(apikey=KEY) as two:
        echo(one, "one")
        echo(two, "two")


class HoldingProxy:
    """
    A TCP proxy in front of Redis that can hold Redis's answers to the
    connection that subscribes (the node's PUB/SUB connection) while set.
    """

    def __init__(self, port: int) -> None:
        self.target = port
        self.hold = threading.Event()
        self.released = threading.Event()
        self.subscribing = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            state = {"subscriber": False}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(self, source: socket.socket, sink: socket.socket, state: dict[str, bool]) -> None:
        with source, sink:
            while data := _recv(source):
                if b"SUBSCRIBE" in data.upper():
                    state["subscriber"] = True
                    if self.hold.is_set():
                        self.subscribing.set()
                sink.sendall(data)
            _shut(source, sink)

    def _down(self, source: socket.socket, sink: socket.socket, state: dict[str, bool]) -> None:
        with source, sink:
            while data := _recv(source):
                if state["subscriber"] and self.hold.is_set():
                    self.released.wait()
                sink.sendall(data)
            _shut(source, sink)

    def close(self) -> None:
        self.released.set()
        self.listener.close()


def client_ids(redis: RedisServer) -> list[bytes]:
    """The ids of the connections to C{redis} that are not subscribed, but this one."""
    with socket.create_connection(("127.0.0.1", redis.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"CLIENT LIST TYPE normal\r\n")
        reader = sock.makefile("rb")
        size = int(reader.readline()[1:])
        listed = reader.read(size + 2).decode()
    lines = [line for line in listed.splitlines() if line and "cmd=client|list" not in line]
    return [line.split()[0].removeprefix("id=").encode() for line in lines]


def _shut(*socks: socket.socket) -> None:
    # (close() alone sends no FIN while the other thread waits in recv.)
    for sock in socks:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def test_the_commands_lost_while_subscribing_again_do_not_leave_the_node_unready(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    # The PUB/SUB connection is made again; while its SUBSCRIBE waits for
    # Redis, the command connection is lost too (a timeout, a network
    # blip). Once both are back the node must be ready again, not 503
    # for ever.
    proxy = HoldingProxy(redis_server.port)
    config, port, admin = write_config(tmp_path, "a", redis_server, 10)
    config.write_text(config.read_text().replace(f":{redis_server.port}/", f":{proxy.port}/"))
    config.write_text(config.read_text().replace(f"redis://:{REDIS_PASSWORD}@", "redis://"))
    process = twistd(config, tmp_path)
    try:
        process.wait_for("wssec state store ready")
        process.wait_for(f"wssec listening on admin tcp:{admin}")
        node = Node(process, port, admin)
        assert node.ready() == 200
        commands = client_ids(redis_server)
        proxy.hold.set()
        assert redis_server.command(b"CLIENT", b"KILL", b"TYPE", b"pubsub") == b":1"
        assert proxy.subscribing.wait(TIMEOUT), process.output()
        assert redis_server.command(b"CLIENT", b"KILL", b"ID", commands[0]) == b":1"
        time.sleep(1)  # the command connection is made again meanwhile
        proxy.released.set()
        wait_until(lambda: node.ready() == 200)
    finally:
        proxy.close()
        process.kill()
