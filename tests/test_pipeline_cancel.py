"""
A client that leaves while its handshake waits (here: a password check
queued behind another) has that step cancelled: the queued check is never
hashed, and nothing is logged as an internal error.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest_twisted
from conftest import CapturedLog, aio, upgrade_request
from test_hardening_basic import ManualHasher

from txwssec import (
    BasicAuthenticator,
    Consumer,
    ConsumerDirectory,
    RoutePolicy,
    SecureServerFactory,
    ServerPolicy,
)
from txwssec.apps.echo import EchoProtocol
from txwssec.passwords import hash_password

STORED = hash_password("john-password", "pbkdf2-sha256")


def basic_header(password: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"john:{password}".encode()).decode()


async def eventually(check: Any) -> None:
    """Wait (bounded) on the reactor until C{check()} is true."""
    for _ in range(200):
        if check():
            return
        await aio(asyncio.sleep(0.01))
    raise AssertionError("condition not reached")


@pytest_twisted.ensureDeferred
async def test_queued_password_check_of_a_departed_client_is_never_hashed(
    serve: Any, captured_log: CapturedLog
) -> None:
    """
    A client that leaves (or that the handshake timeout drops) while its
    check waits in the queue: the check is cancelled, never hashed.
    """
    hasher = ManualHasher()
    method = BasicAuthenticator(
        ConsumerDirectory([Consumer("john", password=STORED)]), verify=hasher, max_running=1
    )
    routes = (RoutePolicy("/echo", [method], protocol=EchoProtocol),)
    factory = SecureServerFactory(ServerPolicy(routes, handshake_timeout=0.5))
    port = serve(factory)

    # A: its check runs (the hasher holds it). B: queued behind it, then gone.
    _, a_writer = await aio(asyncio.open_connection("127.0.0.1", port))
    a_writer.write(upgrade_request("/echo", basic_header("wrong-a")))
    await eventually(lambda: len(hasher.started) == 1)
    _, b_writer = await aio(asyncio.open_connection("127.0.0.1", port))
    b_writer.write(upgrade_request("/echo", basic_header("wrong-b")))
    await eventually(lambda: len(method._queue) == 1)
    b_writer.close()
    a_writer.close()

    # Both dropped by the handshake timeout: B's check leaves the queue.
    await eventually(lambda: factory.countConnections == 0)
    assert len(method._queue) == 0
    hasher.finish(0)  # A's hash ends (it kept its slot); its result goes nowhere
    assert [password for password, _ in hasher.started] == ["wrong-a"]
    # A departure is no internal error.
    assert not [e for e in captured_log.events if e.get("log_failure") is not None]
