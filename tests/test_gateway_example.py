"""
The gateway example as its readers run it: examples/echo_upstream.py and
C{twistd -n wssec --config examples/gateway.toml} as subprocesses (on free
ports), then APISIX's WebSocket authentication walkthrough: no key gives 401
with C{WWW-Authenticate}, jack's key gives an echo, and C{whoami} is answered
by the upstream with the consumer name the gateway forwarded.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from processes import EXAMPLES, TIMEOUT, Process, free_port, twistd
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

KEY = "this-is-jacks-key"

UPSTREAM_LISTENING = re.compile(r"echo upstream listening on ws://127\.0\.0\.1:(\d+)/")
GATEWAY_LISTENING = re.compile(r"wssec listening on tcp:(\d+):interface=127\.0\.0\.1")


def gateway_config(tmp_path: Path, port: int, upstream_port: int) -> Path:
    """examples/gateway.toml, listening on C{port}, relaying to C{upstream_port}."""
    text = (EXAMPLES / "gateway.toml").read_text()
    assert '"tcp:9081:interface=127.0.0.1"' in text
    assert 'upstream = "ws://127.0.0.1:8080/"' in text
    text = text.replace("tcp:9081:", f"tcp:{port}:")
    text = text.replace("ws://127.0.0.1:8080/", f"ws://127.0.0.1:{upstream_port}/")
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


@dataclass
class Example:
    upstream: Process
    gateway: Process
    url: str


@pytest.fixture
def example(tmp_path: Path) -> Iterator[Example]:
    """The echo upstream and the gateway, running; killed if a test left them."""
    upstream = Process(
        [sys.executable, str(EXAMPLES / "echo_upstream.py"), "--port", "0"], tmp_path
    )
    gateway: Process | None = None
    try:
        upstream_port = int(upstream.wait_for(UPSTREAM_LISTENING).group(1))
        port = free_port()
        config = gateway_config(tmp_path, port, upstream_port)
        gateway = twistd(config, tmp_path)
        assert int(gateway.wait_for(GATEWAY_LISTENING).group(1)) == port
        yield Example(upstream, gateway, f"ws://127.0.0.1:{port}/ws")
    finally:
        if gateway is not None:
            gateway.kill()
        upstream.kill()


def websocket(url: str, **options: Any) -> Any:
    """A websockets connection to enter as a context manager (no proxy)."""
    return connect(url, open_timeout=TIMEOUT, proxy=None, **options)


def refused(url: str, **options: Any) -> InvalidStatus:
    """The refusal of a handshake that must fail."""
    with pytest.raises(InvalidStatus) as caught, websocket(url, **options):
        pass
    return caught.value


def upstream_connections(example: Example) -> list[str]:
    """The upstream's log lines for connections it received."""
    return [line for line in example.upstream.lines if "upstream connection from" in line]


def test_apisix_walkthrough(example: Example) -> None:
    """
    The walkthrough of examples/gateway.toml's comments, against the real
    processes: 401 without a key (the upstream is never contacted), an echo
    and C{whoami -> jack} with jack's key (the key is not forwarded), and
    both processes stop cleanly on SIGTERM.
    """
    missing = refused(example.url)
    assert missing.response.status_code == 401
    assert missing.response.headers["WWW-Authenticate"] == 'ApiKey header="apikey"'
    assert missing.response.body == b"authentication required\n"

    wrong = refused(example.url, additional_headers={"apikey": "not-jacks-key"})
    assert wrong.response.status_code == 401
    assert wrong.response.body == b"authentication required\n"
    assert upstream_connections(example) == []

    with websocket(example.url, additional_headers={"apikey": KEY}) as ws:
        ws.send("hello")
        assert ws.recv(TIMEOUT) == "hello"
        ws.send(b"\x00\xff")
        assert ws.recv(TIMEOUT) == b"\x00\xff"
        ws.send("whoami")
        assert ws.recv(TIMEOUT) == "jack"
    # The upstream logged the connection before it answered the handshake,
    # but this process reads its output in a thread that may lag behind
    # (a loaded machine): wait for the line. Lines come in order, so once
    # it is read, any line of an earlier connection is read too.
    jack = example.upstream.wait_for(re.compile(r"upstream connection from \S+ for jack$"))
    assert upstream_connections(example) == [jack.string]

    # twistd ends by the signal it received (twisted.application.app
    # re-raises it); the upstream (task.react) exits 0.
    assert example.gateway.stop() == 0
    assert example.upstream.stop() == 0
    gateway_output = example.gateway.output()
    assert "accepted tcp4:127.0.0.1:" in gateway_output
    assert "on /ws as jack by key" in gateway_output
    for output in (gateway_output, example.upstream.output()):
        assert "Traceback" not in output
        assert KEY not in output
        assert "not-jacks-key" not in output


def test_upstream_down_gives_502(example: Example) -> None:
    """
    With the upstream stopped, jack's handshake is answered 502 by the
    gateway (after authentication: without a key it is still 401).
    """
    assert example.upstream.stop() == 0
    down = refused(example.url, additional_headers={"apikey": KEY})
    assert down.response.status_code == 502
    assert down.response.body == b"bad gateway\n"
    assert refused(example.url).response.status_code == 401
    assert example.gateway.stop() == 0
    assert "Traceback" not in example.gateway.output()
