"""
In-band refresh and one-time tickets through the real C{twistd wssec}:
examples/identity.toml (an application route and a gateway route in front
of examples/echo_upstream.py), examples/refresh_client.py refreshing on its
own, on free ports. The tokens live seconds (4 s, refreshed 2 s before
their expiry), not minutes: the mechanism is the same.
"""

from __future__ import annotations

import http.client
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from processes import EXAMPLES, TIMEOUT, Process, free_port, twistd
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

SECRET = "identity-example-secret-change-me-0123456789"
UPSTREAM_LISTENING = re.compile(r"echo upstream listening on ws://127\.0\.0\.1:(\d+)/")


@dataclass
class Running:
    port: int
    server: Process


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    """examples/identity.toml under twistd, its gateway route's upstream running."""
    upstream = Process(
        [sys.executable, str(EXAMPLES / "echo_upstream.py"), "--port", "0"], tmp_path
    )
    server: Process | None = None
    try:
        upstream_port = int(upstream.wait_for(UPSTREAM_LISTENING).group(1))
        port = free_port()
        text = (EXAMPLES / "identity.toml").read_text()
        assert "tcp:9082:" in text and "ws://127.0.0.1:8080/" in text
        text = text.replace("tcp:9082:", f"tcp:{port}:")
        text = text.replace("ws://127.0.0.1:8080/", f"ws://127.0.0.1:{upstream_port}/")
        config = tmp_path / "identity.toml"
        config.write_text(text)
        server = twistd(config, tmp_path)
        server.wait_for(f"wssec listening on tcp:{port}:")
        yield Running(port, server)
    finally:
        if server is not None:
            server.kill()
        upstream.kill()


def test_refreshed_three_times_through_twistd(running: Running) -> None:
    """
    examples/refresh_client.py, on the application route and on the gateway
    route at once: each session is refreshed three times (by the client on
    its own, on wssec.expiring), outlives its first token, echoes, and
    closes 1000. On the gateway route the only echo is that message: the
    upstream (which echoes everything) never saw a refresh message.
    """
    clients = [
        Process([sys.executable, str(EXAMPLES / "refresh_client.py"), url], EXAMPLES.parent)
        for url in (
            f"ws://127.0.0.1:{running.port}/echo",
            f"ws://127.0.0.1:{running.port}/ws",
        )
    ]
    try:
        for client in clients:
            client.wait_for("closed 1000")
            output = client.output()
            assert len(re.findall(r"^refreshed until \d+", output, re.M)) == 3, output
            past = re.search(r"first token expired (\S+) s ago", output)
            assert past is not None and float(past.group(1)) > 0, output
            assert re.findall(r"^echo: .*", output, re.M) == [
                "echo: still here after three refreshes"
            ], output
    finally:
        for client in clients:
            client.kill()
    log = running.server.output()
    assert log.count("session refreshed") == 6, log


def post_ticket(port: int, token: str) -> tuple[int, dict[str, object]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("POST", "/echo", headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def test_ticket_once_through_twistd(running: Running) -> None:
    """POST /echo with a JWT: 201 and a ticket, which opens one session; then 401."""
    token = jwt.encode({"sub": "john", "exp": int(time.time()) + 60}, SECRET, "HS256")
    status, answer = post_ticket(running.port, token)
    assert status == 201
    assert set(answer) == {"ticket", "expires_in"} and answer["expires_in"] == 30
    url = f"ws://127.0.0.1:{running.port}/echo?ticket={answer['ticket']}"
    with connect(url, open_timeout=TIMEOUT, proxy=None) as ws:
        ws.send("with a ticket")
        assert ws.recv(TIMEOUT) == "with a ticket"
    with pytest.raises(InvalidStatus) as refused:
        with connect(url, open_timeout=TIMEOUT, proxy=None):
            pass
    assert refused.value.response.status_code == 401
    log = running.server.output()
    assert str(answer["ticket"]) not in log and token not in log
