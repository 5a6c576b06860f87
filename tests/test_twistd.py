"""
The real C{twistd wssec}, run as a subprocess: it starts from the shipped
example configuration, serves real clients, stops cleanly on SIGTERM, and
refuses bad configurations with one line naming the key path, before
listening and without a traceback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import TIMEOUT, TWISTD, Process, free_port, quickstart, repo_env, twistd
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin, Subprotocol


def twistd_command(*args: str) -> list[str]:
    return [str(TWISTD), *args]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Process, int]]:
    """twistd serving the quickstart example; killed if a test left it running."""
    port = free_port()
    running = twistd(quickstart(tmp_path, port), tmp_path)
    try:
        running.wait_for("wssec listening on")
        yield running, port
    finally:
        running.kill()


def websocket(url: str, **options: Any) -> Any:
    """A websockets connection to enter as a context manager (no proxy)."""
    return connect(url, open_timeout=TIMEOUT, proxy=None, **options)


def refused(url: str, **options: Any) -> InvalidStatus:
    """The refusal of a handshake that must fail."""
    with pytest.raises(InvalidStatus) as caught, websocket(url, **options):
        pass
    return caught.value


def test_serves_quickstart_and_stops_on_sigterm(server: tuple[Process, int]) -> None:
    """
    One run of the real process: where it listens is logged, the API key
    works in a header and in Sec-WebSocket-Protocol, missing and wrong keys
    get 401, a foreign Origin 403, an unknown path 404; SIGTERM shuts it
    down cleanly, and the key never appears in the log.
    """
    running, port = server
    url = f"ws://127.0.0.1:{port}/echo"
    assert f"wssec listening on tcp:{port}:interface=127.0.0.1 (127.0.0.1:{port})" in (
        running.output()
    )
    assert "wssec garbage collector: young generation every 50000 allocations, " in (
        running.output()
    )

    with websocket(url, additional_headers={"apikey": "john-key"}) as ws:
        assert ws.subprotocol is None
        ws.send("hello")
        assert ws.recv(TIMEOUT) == "hello"
        ws.send(b"\x00\xff")
        assert ws.recv(TIMEOUT) == b"\x00\xff"

    offered = [Subprotocol("token"), Subprotocol("john-key")]
    with websocket(url, subprotocols=offered) as ws:
        assert ws.subprotocol == "token"
        assert ws.response is not None
        assert ws.response.headers.get_all("Sec-WebSocket-Protocol") == ["token"]
        ws.send("via subprotocol")
        assert ws.recv(TIMEOUT) == "via subprotocol"

    missing = refused(url)
    assert missing.response.status_code == 401
    assert missing.response.body == b"authentication required\n"
    assert missing.response.headers["WWW-Authenticate"] == 'ApiKey header="apikey"'

    wrong = refused(url, additional_headers={"apikey": "jane-key"})
    assert wrong.response.status_code == 401
    assert wrong.response.body == b"authentication required\n"

    foreign = refused(
        url, additional_headers={"apikey": "john-key"}, origin=Origin("https://evil.example")
    )
    assert foreign.response.status_code == 403
    assert foreign.response.body == b"forbidden\n"

    with websocket(
        url, additional_headers={"apikey": "john-key"}, origin=Origin("http://localhost:8000")
    ) as ws:
        ws.send("allowed origin")
        assert ws.recv(TIMEOUT) == "allowed origin"

    unknown = refused(f"ws://127.0.0.1:{port}/nope", additional_headers={"apikey": "john-key"})
    assert unknown.response.status_code == 404
    assert unknown.response.body == b"not found\n"

    # A graceful stop (txwssec.lifecycle) that closed every session exits 0,
    # rather than by the signal twistd would re-raise.
    assert running.stop() == 0
    output = running.output()
    assert "Received SIGTERM, shutting down." in output
    assert f"(TCP Port {port} Closed)" in output
    assert last_line(output).endswith("Server Shut Down.")
    assert "Traceback" not in output
    assert "accepted tcp4:127.0.0.1:" in output
    assert "on /echo as john by key" in output
    assert "john-key" not in output
    assert "jane-key" not in output


# -- refusals before listening -------------------------------------------------------


def run_twistd(*args: str, cwd: Path) -> tuple[int, str]:
    """Run twistd to completion; its exit status and combined output."""
    done = subprocess.run(
        twistd_command(*args),
        cwd=cwd,
        env=repo_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT,
    )
    return done.returncode, done.stdout


def last_line(output: str) -> str:
    return [line for line in output.splitlines() if line.strip()][-1]


GOOD = """
[server]
listen = ["tcp:{port}:interface=127.0.0.1"]

[auth.key]

[[consumer]]
name = "john"
keys = ["john-key"]

[[route]]
path = "/echo"
app = "echo"
auth = ["key"]
"""


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("[server]", "[server]\nbogus = 1", "server.bogus: unknown key"),
        (
            'auth = ["key"]',
            'auth = ["key", "kerberos"]',
            'route[0].auth[1]: unknown method "kerberos"'
            " (known: anonymous, basic, introspect, jwt, key, tls)",
        ),
        ('auth = ["key"]', "", "route[0].auth: is required"),
        (
            'keys = ["john-key"]',
            'keys = ["john-key"]\n[[consumer]]\nname = "jane"\nkeys = ["john-key"]',
            'consumer[1].keys[0]: key already belongs to consumer "john"',
        ),
        ("[auth.key]", "[auth.key]\n[auth.jwt]", "auth.jwt: configured but used by no route"),
        ('app = "echo"', 'app = "chat"', 'route[0].app: unknown app "chat"'),
        (
            'listen = ["tcp:{port}:interface=127.0.0.1"]',
            'listen = "tcp:{port}"',
            "server.listen: expected array",
        ),
        (
            'listen = ["tcp:{port}:interface=127.0.0.1"]',
            'listen = ["tcp:{port}:interface=127.0.0.1", "nonsense:1"]',
            "server.listen[1]: invalid endpoint 'nonsense:1'",
        ),
        (
            'listen = ["tcp:{port}:interface=127.0.0.1"]',
            'listen = ["tcp:notaport"]',
            "server.listen[0]: invalid endpoint 'tcp:notaport'",
        ),
        ("[server]", "[server", "invalid TOML"),
    ],
    ids=[
        "unknown-key",
        "unknown-method",
        "no-auth",
        "key-reused",
        "unused-auth",
        "unknown-app",
        "listen-type",
        "bad-endpoint",
        "bad-port",
        "toml",
    ],
)
def test_bad_config_exits_before_listening(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    port = free_port()
    assert old in GOOD
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace(old, new).replace("{port}", str(port)))

    status, output = run_twistd("-n", "--pidfile=", "wssec", "--config", str(path), cwd=tmp_path)

    assert status == 1
    assert f"{path}: " in last_line(output)
    assert message in last_line(output)
    assert "Traceback" not in output
    assert "listening" not in output


def test_invalid_endpoint_line(tmp_path: Path) -> None:
    """The whole line for an endpoint Twisted does not know."""
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace("tcp:{port}:interface=127.0.0.1", "nonsense:1"))
    status, output = run_twistd("-n", "--pidfile=", "wssec", "--config", str(path), cwd=tmp_path)
    assert status == 1
    assert output == (
        f"{path}: server.listen[0]: invalid endpoint 'nonsense:1': "
        "Unknown endpoint type: 'nonsense'\n"
    )


def test_missing_config_option(tmp_path: Path) -> None:
    status, output = run_twistd("-n", "--pidfile=", "wssec", cwd=tmp_path)
    assert status == 1
    assert last_line(output).endswith("--config FILE is required")
    assert "Traceback" not in output


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    status, output = run_twistd("-n", "--pidfile=", "wssec", "--config", str(path), cwd=tmp_path)
    assert status == 1
    assert last_line(output).endswith(f"{path}: cannot read: No such file or directory")
    assert "Traceback" not in output


def test_port_taken(tmp_path: Path) -> None:
    """A taken port is fatal: one critical line, non-zero exit, no traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = tmp_path / "c.toml"
        path.write_text(GOOD.replace("{port}", str(port)))
        status, output = run_twistd(
            "-n", "--pidfile=", "wssec", "--config", str(path), cwd=tmp_path
        )
    assert status == 1
    line = last_line(output)
    assert f"wssec cannot listen on tcp:{port}:interface=127.0.0.1: " in line
    assert "Address already in use" in line
    assert "Traceback" not in output
    assert "wssec listening" not in output


def test_second_listener_port_taken(tmp_path: Path) -> None:
    """The process fails even when an earlier listener could start."""
    free = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        path = tmp_path / "c.toml"
        path.write_text(
            GOOD.replace(
                '"tcp:{port}:interface=127.0.0.1"',
                f'"tcp:{free}:interface=127.0.0.1", "tcp:{taken}:interface=127.0.0.1"',
            )
        )
        status, output = run_twistd(
            "-n", "--pidfile=", "wssec", "--config", str(path), cwd=tmp_path
        )
    assert status == 1
    assert f"wssec cannot listen on tcp:{taken}:interface=127.0.0.1: " in last_line(output)
    assert "Traceback" not in output


def test_help_lists_wssec(tmp_path: Path) -> None:
    status, output = run_twistd("--help", cwd=tmp_path)
    assert status == 0
    (line,) = [line for line in output.splitlines() if line.split()[:1] == ["wssec"]]
    assert "Secure WebSocket server" in line


def test_wssec_help(tmp_path: Path) -> None:
    status, output = run_twistd("wssec", "--help", cwd=tmp_path)
    assert status == 0
    assert "--config=" in output


def test_endpoint_file_missing(tmp_path: Path) -> None:
    """An endpoint whose parsing reads a file fails as a config error."""
    key = tmp_path / "missing-key.pem"
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace("tcp:{port}:interface=127.0.0.1", f"ssl:0:privateKey={key}"))
    status, output = run_twistd("-n", "--pidfile=", "wssec", "--config", str(path), cwd=tmp_path)
    assert status == 1
    line = last_line(output)
    assert f"{path}: server.listen[0]: invalid endpoint 'ssl:0:privateKey={key}': " in line
    assert "No such file or directory" in line
    assert "Traceback" not in output


def test_port_out_of_range(tmp_path: Path) -> None:
    """A port the socket layer rejects at bind time is fatal too, in one line."""
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace("tcp:{port}:", "tcp:99999:"))
    status, output = run_twistd("-n", "--pidfile=", "wssec", "--config", str(path), cwd=tmp_path)
    assert status == 1
    assert "wssec cannot listen on tcp:99999:interface=127.0.0.1: " in last_line(output)
    assert "Traceback" not in output
    assert "wssec listening" not in output


def test_port_taken_daemon(tmp_path: Path) -> None:
    """
    Daemonized (no -n), the waiting parent learns of the failure and exits
    1 (not hanging), the PID file is removed and the log has the one line.
    """
    pidfile = tmp_path / "twistd.pid"
    logfile = tmp_path / "twistd.log"
    try:
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            path = tmp_path / "c.toml"
            path.write_text(GOOD.replace("{port}", str(port)))
            status, output = run_twistd(
                f"--pidfile={pidfile}",
                f"--logfile={logfile}",
                "wssec",
                "--config",
                str(path),
                cwd=tmp_path,
            )
        assert status == 1
        assert f"cannot listen on tcp:{port}:interface=127.0.0.1" in output
        # The parent exits as soon as the daemon reports the failure; the
        # daemon then removes its PID file on its way out.
        deadline = time.monotonic() + TIMEOUT
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pidfile.exists()
        log = logfile.read_text()
        assert f"wssec cannot listen on tcp:{port}:interface=127.0.0.1: " in last_line(log)
        assert "Traceback" not in log
    finally:
        if pidfile.exists():  # only if the test failed: stop the daemon
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
