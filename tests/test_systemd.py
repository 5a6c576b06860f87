"""
systemd socket activation: the real C{twistd -n wssec} started the way
systemd starts it (the listening socket as descriptor 3, C{LISTEN_FDS},
C{LISTEN_PID} set to the process's own pid, C{LISTEN_FDNAMES} or not), then
real WebSocket clients over ws:// and wss://.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import REPO, TIMEOUT, TWISTD, Process, free_port, repo_env, sync_tls
from websockets.sync.client import connect

from txwssec.config import parse
from txwssec.devcert import write_dev_certificates
from txwssec.errors import ConfigError
from txwssec.listen import InheritedSockets, _initial_environment

#: What systemd does between fork and exec: the socket becomes descriptor
#: 3 and LISTEN_PID is the pid of the process that will run (exec keeps it).
ACTIVATE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)

CONFIG = """
[server]
listen = ["{listen}"]
{server}

[auth.key]

[[consumer]]
name = "john"
keys = ["john-key"]

[[route]]
path = "/echo"
app = "echo"
auth = ["key"]
"""

TLS = """
[tls]
cert = "dev-certs/server.pem"
key = "dev-certs/server.key"
"""


def write_config(folder: Path, listen: str, server: str = "", tls: bool = False) -> Path:
    path = folder / "wssec.toml"
    text = CONFIG.format(listen=listen, server=server)
    if tls:
        write_dev_certificates(folder / "dev-certs")
        text += TLS
    path.write_text(text)
    return path


def listening_socket() -> socket.socket:
    """What a socket unit with ListenStream=127.0.0.1:PORT makes."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def activated(config: Path, sock: socket.socket, names: str | None) -> Process:
    """C{twistd -n wssec} with C{sock} passed as systemd passes it."""
    env = repo_env()
    env["LISTEN_FDS"] = "1"
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    fd = sock.fileno()
    args = [str(TWISTD), "-n", "--pidfile=", "wssec", "--config", str(config)]
    return Process(
        [sys.executable, "-c", ACTIVATE, str(fd), *args],
        cwd=config.parent,
        env=env,
        pass_fds=(fd,),
    )


@pytest.fixture
def sock() -> Iterator[socket.socket]:
    with listening_socket() as sock:
        yield sock


def echo(url: str, **options: object) -> None:
    with connect(
        url,
        open_timeout=TIMEOUT,
        proxy=None,
        additional_headers={"apikey": "john-key"},
        **options,  # type: ignore[arg-type]
    ) as ws:
        ws.send("hello")
        assert ws.recv(TIMEOUT) == "hello"


@pytest.mark.parametrize(
    ("listen", "names"),
    [
        # systemd-socket-activate without --fdname sets no LISTEN_FDNAMES:
        # Twisted's own systemd: endpoint then finds no socket.
        ("systemd:domain=INET:index=0", None),
        # systemd itself always names them (FileDescriptorName=, else the unit).
        ("systemd:domain=INET:index=0", "txwssec.socket"),
        ("systemd:domain=INET:name=txwssec.socket", "txwssec.socket"),
    ],
    ids=["index", "index-named", "name"],
)
def test_socket_activation_ws(
    tmp_path: Path, sock: socket.socket, listen: str, names: str | None
) -> None:
    port = sock.getsockname()[1]
    config = write_config(tmp_path, listen, "allow_plaintext = true")
    running = activated(config, sock, names)
    try:
        running.wait_for(f"wssec listening on {listen} (127.0.0.1:{port})")
        echo(f"ws://127.0.0.1:{port}/echo")
        assert running.stop() == 0
    finally:
        running.kill()
    assert f"(TCP Port {port} Closed)" in running.output()
    assert "Traceback" not in running.output()


def test_socket_activation_wss(tmp_path: Path, sock: socket.socket) -> None:
    """C{tls:systemd:...} serves wss:// with the [tls] table on the passed socket."""
    port = sock.getsockname()[1]
    config = write_config(tmp_path, "tls:systemd:domain=INET:index=0", tls=True)
    running = activated(config, sock, "txwssec.socket")
    try:
        running.wait_for(f"wssec listening on tls:systemd:domain=INET:index=0 (127.0.0.1:{port})")
        context = sync_tls(ssl.create_default_context(cafile=tmp_path / "dev-certs" / "ca.pem"))
        echo(f"wss://localhost:{port}/echo", ssl=context)
        # Plain HTTP on that socket gets no HTTP answer: TLS closes it.
        with socket.create_connection(("127.0.0.1", port), TIMEOUT) as raw:
            raw.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert raw.recv(5) == b""
        assert running.stop() == 0
    finally:
        running.kill()
    assert f"(TLS Port {port} Closed)" in running.output()
    assert "Traceback" not in running.output()


def test_not_activated(tmp_path: Path) -> None:
    """Outside socket activation: one critical line naming the listener, exit 1."""
    config = write_config(tmp_path, "systemd:domain=INET:index=0", "allow_plaintext = true")
    running = Process(
        [str(TWISTD), "-n", "--pidfile=", "wssec", "--config", str(config)], cwd=tmp_path
    )
    try:
        assert running.wait() == 1
        running.stop()
    finally:
        running.kill()
    assert (
        running.output()
        .splitlines()[-1]
        .endswith(
            "wssec cannot listen on systemd:domain=INET:index=0: "
            "no socket passed by systemd (no LISTEN_FDS and LISTEN_PID for this process)"
        )
    )
    assert "Traceback" not in running.output()


def test_wrong_name(tmp_path: Path, sock: socket.socket) -> None:
    config = write_config(tmp_path, "systemd:domain=INET:name=web", "allow_plaintext = true")
    running = activated(config, sock, "txwssec.socket")
    try:
        assert running.wait() == 1
        running.stop()
    finally:
        running.kill()
    assert (
        running.output()
        .splitlines()[-1]
        .endswith(
            "wssec cannot listen on systemd:domain=INET:name=web: "
            "no socket named 'web' passed by systemd (names: txwssec.socket)"
        )
    )


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate"
)
def test_systemd_socket_activate(tmp_path: Path) -> None:
    """
    systemd's own tool (no --fdname, so no LISTEN_FDNAMES; it starts the
    service at the first connection, which then waits in the backlog).
    """
    port = free_port()
    config = write_config(tmp_path, "systemd:domain=INET:index=0", "allow_plaintext = true")
    running = Process(
        [
            "systemd-socket-activate",
            f"--listen=127.0.0.1:{port}",
            f"--setenv=PYTHONPATH={REPO}",
            str(TWISTD),
            "-n",
            "--pidfile=",
            "wssec",
            "--config",
            str(config),
        ],
        cwd=tmp_path,
    )
    try:
        running.wait_for(f"Listening on 127.0.0.1:{port} as 3.")
        echo(f"ws://127.0.0.1:{port}/echo")
        running.wait_for(f"wssec listening on systemd:domain=INET:index=0 (127.0.0.1:{port})")
        assert running.stop() == 0
    finally:
        running.kill()


# -- configuration -----------------------------------------------------------------


def config_error(listen: str, server: str = "", tls: bool = False) -> str:
    text = CONFIG.format(listen=listen, server=server) + (TLS if tls else "")
    with pytest.raises(ConfigError) as caught:
        parse(tomllib.loads(text), base_dir=REPO / "missing")
    return str(caught.value)


def test_plain_systemd_needs_allow_plaintext() -> None:
    """The socket unit's address is not in the configuration: secure by default."""
    assert config_error("systemd:domain=INET:index=0") == (
        "server.listen[0]: 'systemd:domain=INET:index=0' is a plain-text socket whose "
        "address the socket unit chooses: use tls:systemd:..., or set "
        "server.allow_plaintext = true behind a TLS-terminating proxy"
    )


def test_unix_systemd_socket_is_local() -> None:
    text = CONFIG.format(listen="systemd:domain=UNIX:index=0", server="")
    config = parse(tomllib.loads(text))
    assert config.listen == ("systemd:domain=UNIX:index=0",)


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("systemd:domain=INET", "give exactly one of index= and name="),
        ("systemd:domain=INET:index=0:name=web", "give exactly one of index= and name="),
        ("systemd:domain=IPX:index=0", "domain must be INET, INET6 or UNIX"),
        ("systemd:index=0", "domain must be INET, INET6 or UNIX"),
        ("systemd:domain=INET:index=-1", "index must be a number from 0"),
        ("systemd:domain=INET:index=0:backlog=5", "set the backlog in the socket unit"),
        ("systemd:domain=INET:index=0:interface=::", "expected systemd:domain="),
        ("systemd:0", "expected systemd:domain="),
    ],
)
def test_bad_systemd_description(listen: str, message: str) -> None:
    error = config_error(listen, "allow_plaintext = true")
    assert error.startswith(f"server.listen[0]: invalid endpoint {listen!r}: ")
    assert message in error


def test_tls_systemd_needs_tls_table() -> None:
    error = config_error("tls:systemd:domain=INET:index=0")
    assert error.endswith("tls listeners need a [tls] table")


def test_check_config_outside_activation(tmp_path: Path) -> None:
    """check-config checks the description, not whether a socket was passed."""
    config = write_config(tmp_path, "systemd:domain=INET:index=0", "allow_plaintext = true")
    done = Process([sys.executable, "-m", "txwssec", "check-config", str(config)])
    assert done.wait() == 0
    done.stop()
    assert done.output() == f"{config}: ok (1 routes, 1 consumers)\n"


# -- reading the environment ---------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, InheritedSockets()),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "2"}, InheritedSockets((3, 4))),
        ({"LISTEN_PID": "8", "LISTEN_FDS": "2"}, InheritedSockets()),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "x"}, InheritedSockets()),
        (
            {"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"},
            InheritedSockets((3, 4), ("a", "b")),
        ),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"}, InheritedSockets((3, 4))),
    ],
    ids=["none", "no-names", "other-pid", "bad-count", "names", "names-mismatch"],
)
def test_inherited_sockets(environ: dict[str, str], expected: InheritedSockets) -> None:
    assert InheritedSockets.from_environment(environ, 7) == expected


# -- examples/systemd ---------------------------------------------------------------

UNITS = REPO / "examples" / "systemd"


def unit_values(name: str, key: str) -> list[str]:
    """The values of C{key=} lines in unit file C{name}."""
    lines = (UNITS / name).read_text().splitlines()
    return [line.split("=", 1)[1] for line in lines if line.startswith(f"{key}=")]


def example_config(folder: Path) -> Path:
    """examples/systemd/wssec.toml with development certificates of its own."""
    write_dev_certificates(folder / "dev-certs")
    text = (UNITS / "wssec.toml").read_text()
    for old, new in [
        ("/etc/txwssec/tls/fullchain.pem", "dev-certs/server.pem"),
        ("/etc/txwssec/tls/privkey.pem", "dev-certs/server.key"),
    ]:
        assert old in text
        text = text.replace(old, new)
    path = folder / "wssec.toml"
    path.write_text(text)
    return path


def test_example_units(tmp_path: Path) -> None:
    """
    The example's twistd command, configuration and socket unit together:
    an IPv6 socket named as FileDescriptorName= says, wss:// with the key
    whose digest the example holds; SIGTERM ends it the way systemd counts
    as a clean stop.
    """
    (name,) = unit_values("txwssec.socket", "FileDescriptorName")
    assert unit_values("txwssec.socket", "ListenStream") == ["443"]  # IPv6 socket, dual stack
    (exec_start,) = unit_values("txwssec.service", "ExecStart")
    twistd, *args = exec_start.split()
    assert twistd == "/opt/txwssec/venv/bin/twistd"
    assert args == ["-n", "--pidfile=", "wssec", "--config", "/etc/txwssec/wssec.toml"]
    config = example_config(tmp_path)

    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        env = repo_env()
        env.update(LISTEN_FDS="1", LISTEN_FDNAMES=name)
        command = [str(TWISTD), *args[:-1], str(config)]
        running = Process(
            [sys.executable, "-c", ACTIVATE, str(sock.fileno()), *command],
            cwd=tmp_path,
            env=env,
            pass_fds=(sock.fileno(),),
        )
    try:
        running.wait_for(f"wssec listening on tls:systemd:domain=INET6:name={name} (::1:{port})")
        context = sync_tls(ssl.create_default_context(cafile=tmp_path / "dev-certs" / "ca.pem"))
        echo(f"wss://[::1]:{port}/echo", ssl=context)
        assert running.stop() == 0
    finally:
        running.kill()
    assert "Traceback" not in running.output()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_example_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify finds nothing wrong (with a twistd that exists)."""
    for unit in ("txwssec.socket", "txwssec.service"):
        text = (UNITS / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/opt/txwssec/venv/bin/twistd", str(TWISTD)))
    done = Process(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            str(tmp_path / "txwssec.socket"),
            str(tmp_path / "txwssec.service"),
        ],
        cwd=tmp_path,
    )
    assert done.wait() == 0
    done.stop()
    assert done.output() == ""


def test_initial_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The environment the process started with (Twisted's import removed
    LISTEN_FDS from os.environ), unless LISTEN_FDS is still in os.environ.
    """
    monkeypatch.setenv("TXWSSEC_LATER", "1")
    assert "TXWSSEC_LATER" not in _initial_environment()
    assert "PATH" in _initial_environment()
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert _initial_environment()["TXWSSEC_LATER"] == "1"
