"""
A real C{redis-server} for the tests of the Redis state store: on a free
port, in a temporary folder, persisting nothing (C{--save '' --appendonly
no}), and stopped and started again by the test that needs an outage.

The C{redis_server} fixture skips the test, with the reason, when
C{redis-server} is not installed (CI installs it: .ci/run) or the Redis
client (txredisapi, the C{redis} extra) is missing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import TIMEOUT, free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """One redis-server process, on one port for its whole life."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        #: Set before L{start}: the server asks for it (C{--requirepass}).
        self.password: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it (again) and wait until it answers PING."""
        assert self.process is None
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
                "--daemonize",
                "no",
                "--enable-debug-command",  # DEBUG SLEEP: a slow Redis
                "local",
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.command(b"PING") == b"+PONG":
                return
            time.sleep(0.02)
        raise AssertionError(f"redis-server never answered on port {self.port}")

    def stop(self) -> None:
        """Stop it (its data is gone: nothing is saved)."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(TIMEOUT)
            self.process = None

    def command(self, *args: bytes) -> bytes | None:
        """One command (inline), its first reply line; None if it does not answer."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                reader = sock.makefile("rb")
                if self.password:
                    sock.sendall(b"AUTH " + self.password.encode() + b"\r\n")
                    reader.readline()
                sock.sendall(b" ".join(args) + b"\r\n")
                return reader.readline().rstrip(b"\r\n")
        except OSError:
            return None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server of the test's own (see the module docstring)."""
    if not shutil.which("redis-server") and not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    pytest.importorskip("txredisapi", reason="txredisapi is not installed (txwssec[redis])")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
