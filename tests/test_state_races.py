"""
Races of the Redis state store's leases against real C{twistd wssec} nodes
and a real redis-server (as tests/test_state_twistd.py): a connection that
ends while another connection's lease is being asked of Redis must not
leave a lease behind for ever (renewed by the node's heartbeat, it would
hold a place of the consumer's cap on every node until the node stops).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import twistd
from redisserver import RedisServer, redis_server  # noqa: F401
from test_state_twistd import KEY, REDIS_PASSWORD, Node, echo, write_config

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
