"""
Graceful stop (SIGTERM, SIGINT) and live reload (SIGHUP) through the real
C{twistd wssec} (see L{txwssec.lifecycle}), the Python API of both, and the
C{[server] shutdown_timeout} key.
"""

from __future__ import annotations

import base64
import hashlib
import signal
import socket
import ssl
import struct
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
import wsframes
from conftest import upgrade_request
from processes import TIMEOUT, Process, free_port, twistd
from twisted.internet.task import Clock

from txwssec import events
from txwssec.config import load, parse
from txwssec.consumers import Consumer, ConsumerDirectory, key_digest
from txwssec.devcert import write_dev_certificates
from txwssec.errors import ConfigError
from txwssec.lifecycle import _revoked, drain, reload
from txwssec.server import SecureServerFactory
from txwssec.types import Principal

SECRET = "s" * 32
OTHER_SECRET = "t" * 32


class Client:
    """A blocking hand-made WebSocket client (ws or wss), frames by hand."""

    def __init__(self, port: int, path: str = "/echo", *headers: str, tls: bool = False) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            sock = context.wrap_socket(sock)
        self.sock = sock
        self.buffer = b""
        if path:
            sock.sendall(upgrade_request(path, *headers))
            self.response = self.head()

    def head(self) -> bytes:
        """The response head (up to the blank line)."""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buffer += data

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        taken, self.buffer = self.buffer[:size], self.buffer[size:]
        return taken

    def frame(self) -> tuple[int, bytes]:
        """One server frame: opcode and payload."""
        first, second = self._take(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._take(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._take(8))
        return first & 0x0F, self._take(length)

    def echo(self, text: str) -> str:
        """Send a text message and return the reply's text."""
        self.sock.sendall(wsframes.frame(wsframes.TEXT, text.encode()))
        opcode, payload = self.frame()
        assert opcode == wsframes.TEXT, (opcode, payload)
        return payload.decode()

    def close_code(self, answer: bool = True) -> int:
        """Read until the server's close frame; answer it; return its code."""
        while True:
            opcode, payload = self.frame()
            if opcode == wsframes.CLOSE:
                code: int = struct.unpack("!H", payload[:2])[0]
                if answer:
                    self.sock.sendall(wsframes.close_frame(code))
                return code

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def status(client: Client) -> int:
    """The HTTP status of the response head."""
    return int(client.response.split(b" ", 2)[1])


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def config_text(
    port: int,
    *,
    consumers: str,
    tls_port: int | None = None,
    upstream_port: int | None = None,
    secret: str = SECRET,
    extra_server: str = "",
) -> str:
    """A configuration: ws (and wss), key and JWT auth, echo (and a gateway)."""
    listen = [f'"tcp:{port}:interface=127.0.0.1"']
    tls = ""
    if tls_port is not None:
        listen.append(f'"tls:{tls_port}:interface=127.0.0.1"')
        tls = '[tls]\ncert = "dev-certs/server.pem"\nkey = "dev-certs/server.key"\n'
    gateway = ""
    if upstream_port is not None:
        gateway = (
            f'[[route]]\npath = "/gw"\nupstream = "ws://127.0.0.1:{upstream_port}/echo"\n'
            'auth = ["key"]\n'
        )
    return f"""
[server]
listen = [{", ".join(listen)}]
{extra_server}
{tls}
[auth.key]
header = "apikey"

[auth.jwt]
secret = "{secret}"

{consumers}

[[route]]
path = "/echo"
app = "echo"
auth = ["key", "jwt"]

{gateway}
"""


JOHN_AND_MARY = """
[[consumer]]
name = "john"
keys = ["john-key"]

[[consumer]]
name = "mary"
keys = ["mary-key", "mary-leaked-key"]
"""


@pytest.fixture
def running(tmp_path: Path) -> Iterator[list[Process]]:
    """The twistd processes a test starts, killed if it left them running."""
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


def start(started: list[Process], config: Path) -> Process:
    process = twistd(config, config.parent)
    started.append(process)
    process.wait_for("wssec listening on")
    return process


# -- graceful stop -------------------------------------------------------------------


class Upstream(threading.Thread):
    """
    A one-connection WebSocket echo server by hand, in a thread: it records
    the close code the gateway sends it, and answers the close.
    """

    def __init__(self, hold: threading.Event | None = None) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.close_code: int | None = None
        #: Set once the gateway's request has arrived.
        self.requested = threading.Event()
        #: When given, the 101 waits until it is set.
        self.hold = hold

    def run(self) -> None:
        sock, _ = self.listener.accept()
        sock.settimeout(TIMEOUT)
        peer = Client.__new__(Client)
        peer.sock, peer.buffer = sock, b""
        request = peer.head().decode("latin-1")
        key = next(
            line.split(":", 1)[1].strip()
            for line in request.split("\r\n")
            if line.lower().startswith("sec-websocket-key:")
        )
        self.requested.set()
        if self.hold is not None:
            self.hold.wait(TIMEOUT)
        digest = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
            + base64.b64encode(digest)
            + b"\r\n\r\n"
        )
        while True:
            first, second = peer._take(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", peer._take(2))
            mask = peer._take(4)
            payload = wsframes.apply_mask(peer._take(length), mask)
            opcode = first & 0x0F
            if opcode == wsframes.CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0]
                sock.sendall(bytes([0x88, 2]) + payload[:2])
                sock.close()
                return
            if opcode == wsframes.TEXT:
                sock.sendall(bytes([0x81, len(payload)]) + payload)


def test_sigterm_closes_ws_wss_and_gateway_with_1001(
    tmp_path: Path, running: list[Process]
) -> None:
    """
    SIGTERM: ws, wss and gateway clients each get a close frame with 1001,
    and so does the gateway's upstream; once they answer, twistd exits 0.
    """
    write_dev_certificates(tmp_path / "dev-certs")
    upstream = Upstream()
    upstream.start()
    port, tls_port = free_port(), free_port()
    text = config_text(
        port, consumers=JOHN_AND_MARY, tls_port=tls_port, upstream_port=upstream.port
    )
    server = start(running, write(tmp_path / "server.toml", text))
    server.wait_for(f"127.0.0.1:{tls_port}")

    ws = Client(port, "/echo", "apikey: john-key")
    wss = Client(tls_port, "/echo", "apikey: john-key", tls=True)
    gateway = Client(port, "/gw", "apikey: john-key")
    for client in (ws, wss, gateway):
        assert status(client) == 101
        assert client.echo("hello") == "hello"

    server.process.send_signal(signal.SIGTERM)
    assert [client.close_code() for client in (ws, wss, gateway)] == [1001, 1001, 1001]
    assert server.wait() == 0
    upstream.join(TIMEOUT)
    assert upstream.close_code == 1001
    output = server.output()
    assert "wssec stopping: 3 sessions closed with 1001" in output
    assert "wssec stopped: every connection closed" in output
    assert "shutdown_timeout" not in output
    assert "Traceback" not in output


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_closes_1001_and_exits_0(
    tmp_path: Path, running: list[Process], signum: int
) -> None:
    """SIGINT behaves as SIGTERM."""
    port = free_port()
    server = start(running, write(tmp_path / "w.toml", config_text(port, consumers=JOHN_AND_MARY)))
    client = Client(port, "/echo", "apikey: mary-key")
    assert status(client) == 101
    server.process.send_signal(signum)
    assert client.close_code() == 1001
    assert server.wait() == 0


def test_client_that_never_answers_is_cut_at_shutdown_timeout(
    tmp_path: Path, running: list[Process]
) -> None:
    """
    A client that never answers the 1001 is cut once shutdown_timeout has
    passed (here below the close timeout, 1 s, which would drop it
    otherwise), and the process still exits 0.
    """
    port = free_port()
    text = config_text(port, consumers=JOHN_AND_MARY, extra_server="shutdown_timeout = 0.5")
    server = start(running, write(tmp_path / "w.toml", text))
    silent = Client(port, "/echo", "apikey: john-key")
    assert status(silent) == 101
    server.process.send_signal(signal.SIGTERM)
    assert silent.close_code(answer=False) == 1001
    assert server.wait() == 0
    output = server.output()
    assert "shutdown_timeout (0.5s) reached: 1 connections cut" in output
    assert "Traceback" not in output
    silent.close()


def test_handshake_in_flight_during_drain_gets_503(tmp_path: Path, running: list[Process]) -> None:
    """
    A handshake that arrives while the server drains is answered 503 (and
    a second SIGTERM meanwhile is only logged).
    """
    port = free_port()
    server = start(running, write(tmp_path / "w.toml", config_text(port, consumers=JOHN_AND_MARY)))
    late = Client(port, "")
    request = upgrade_request("/echo", "apikey: john-key")
    late.sock.sendall(request[:20])
    # A session opened after it: the server has accepted both connections
    # (in order), and the drain waits for the one still in its handshake.
    session = Client(port, "/echo", "apikey: john-key")
    assert status(session) == 101
    server.process.send_signal(signal.SIGTERM)
    assert session.close_code() == 1001
    server.wait_for("wssec stopping")
    server.process.send_signal(signal.SIGTERM)  # impatient: said once, changes nothing
    server.wait_for("wssec already stopping")
    late.sock.sendall(request[20:])
    head = late.head()
    assert head.startswith(b"HTTP/1.1 503 "), head
    assert server.wait() == 0
    assert "Traceback" not in server.output()


# -- reload --------------------------------------------------------------------------


def token(secret: str, sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, secret, algorithm="HS256")


def sighup(server: Process, wanted: str) -> None:
    seen = len(server.lines)
    server.process.send_signal(signal.SIGHUP)
    server.wait_for(wanted, after=seen)


def test_sighup_adds_and_removes_consumers_and_keys(
    tmp_path: Path, running: list[Process]
) -> None:
    """
    On a tcp-only server, SIGHUP applies the new file: a new consumer's key
    works; the sessions of a removed consumer, and those opened with a
    removed key, close with 3003; every other session stays open.
    """
    port = free_port()
    path = write(tmp_path / "w.toml", config_text(port, consumers=JOHN_AND_MARY))
    server = start(running, path)
    john = Client(port, "/echo", "apikey: john-key")
    mary = Client(port, "/echo", "apikey: mary-key")
    leaked = Client(port, "/echo", "apikey: mary-leaked-key")
    mary_jwt = Client(port, "/echo", f"Authorization: Bearer {token(SECRET, 'mary')}")
    assert [status(c) for c in (john, mary, leaked, mary_jwt)] == [101] * 4
    assert status(Client(port, "/echo", "apikey: bob-key")) == 401

    consumers = """
[[consumer]]
name = "mary"
keys = ["mary-key"]

[[consumer]]
name = "bob"
keys = ["bob-key"]
"""
    write(path, config_text(port, consumers=consumers))
    sighup(server, "configuration reloaded")
    assert john.close_code() == 3003
    assert leaked.close_code() == 3003
    assert mary.echo("still here") == "still here"
    assert mary_jwt.echo("me too") == "me too"
    bob = Client(port, "/echo", "apikey: bob-key")
    assert status(bob) == 101
    assert bob.echo("new") == "new"
    assert status(Client(port, "/echo", "apikey: john-key")) == 401
    assert status(Client(port, "/echo", "apikey: mary-leaked-key")) == 401
    output = server.output()
    assert "2 sessions revoked" in output
    assert "mary-leaked-key" not in output
    assert server.stop() == 0


def test_sighup_during_a_handshake_applies_when_it_opens(
    tmp_path: Path, running: list[Process]
) -> None:
    """
    A handshake that started before the reload (a gateway waiting for its
    upstream) finishes with the configuration it started with, and its
    session is then checked against the new one: a removed consumer's
    session closes with 3003 as soon as it opens.
    """
    hold = threading.Event()
    upstream = Upstream(hold)
    upstream.start()
    port = free_port()
    text = config_text(port, consumers=JOHN_AND_MARY, upstream_port=upstream.port)
    path = write(tmp_path / "w.toml", text)
    server = start(running, path)
    late = Client(port, "")
    late.sock.sendall(upgrade_request("/gw", "apikey: john-key"))
    assert upstream.requested.wait(TIMEOUT)
    mary_only = '[[consumer]]\nname = "mary"\nkeys = ["mary-key"]\n'
    write(path, config_text(port, consumers=mary_only, upstream_port=upstream.port))
    sighup(server, "configuration reloaded")
    hold.set()
    assert late.head().startswith(b"HTTP/1.1 101 ")
    assert late.close_code() == 3003
    upstream.join(TIMEOUT)
    assert upstream.close_code == 1001
    assert server.stop() == 0


def test_sighup_with_a_new_jwt_secret_closes_its_sessions(
    tmp_path: Path, running: list[Process]
) -> None:
    """
    Sessions opened with a token verified by a secret that a reload
    removed close with 3003; key sessions stay; new tokens use the new one.
    """
    port = free_port()
    path = write(tmp_path / "w.toml", config_text(port, consumers=JOHN_AND_MARY))
    server = start(running, path)
    old = Client(port, "/echo", f"Authorization: Bearer {token(SECRET, 'john')}")
    key = Client(port, "/echo", "apikey: john-key")
    assert [status(old), status(key)] == [101, 101]
    write(path, config_text(port, consumers=JOHN_AND_MARY, secret=OTHER_SECRET))
    sighup(server, "configuration reloaded")
    assert old.close_code() == 3003
    assert key.echo("kept") == "kept"
    new = Client(port, "/echo", f"Authorization: Bearer {token(OTHER_SECRET, 'john')}")
    assert status(new) == 101
    again = Client(port, "/echo", f"Authorization: Bearer {token(SECRET, 'john')}")
    assert status(again) == 401
    assert server.stop() == 0


def test_sighup_with_an_invalid_file_keeps_serving(tmp_path: Path, running: list[Process]) -> None:
    """
    An invalid file: one log line names the key path, the old configuration
    stays (sessions and keys), and the server goes on serving.
    """
    port = free_port()
    path = write(tmp_path / "w.toml", config_text(port, consumers=JOHN_AND_MARY))
    server = start(running, path)
    john = Client(port, "/echo", "apikey: john-key")
    assert status(john) == 101
    broken = config_text(port, consumers="").replace('app = "echo"', 'app = "echo"\nidle = 1')
    write(path, broken)
    sighup(server, "configuration reload failed")
    line = server.wait_for("configuration reload failed").string
    assert "route[0].idle" in line
    assert john.echo("still") == "still"
    other = Client(port, "/echo", "apikey: mary-key")
    assert status(other) == 101
    assert "revoked" not in server.output()
    assert server.stop() == 0


def test_sighup_with_an_unreadable_certificate_keeps_the_old_one(
    tmp_path: Path, running: list[Process]
) -> None:
    """
    A certificate file that no longer loads fails the whole reload: one line
    naming tls.cert, and wss:// goes on with the old certificate.
    """
    write_dev_certificates(tmp_path / "dev-certs")
    port, tls_port = free_port(), free_port()
    text = config_text(port, consumers=JOHN_AND_MARY, tls_port=tls_port)
    server = start(running, write(tmp_path / "w.toml", text))
    server.wait_for(f"127.0.0.1:{tls_port}")
    (tmp_path / "dev-certs" / "server.pem").write_text("not a certificate\n")
    sighup(server, "configuration reload failed")
    assert "w.toml: tls.cert" in server.wait_for("configuration reload failed").string
    wss = Client(tls_port, "/echo", "apikey: john-key", tls=True)
    assert status(wss) == 101
    assert wss.echo("old certificate") == "old certificate"
    assert server.stop() == 0


def test_sighup_with_other_listeners_keeps_the_old_ones(
    tmp_path: Path, running: list[Process]
) -> None:
    """A changed [server] listen needs a restart: said once, old listener kept."""
    port = free_port()
    path = write(tmp_path / "w.toml", config_text(port, consumers=JOHN_AND_MARY))
    server = start(running, path)
    write(path, config_text(free_port(), consumers=JOHN_AND_MARY))
    sighup(server, "listeners are unchanged until a restart")
    assert status(Client(port, "/echo", "apikey: john-key")) == 101
    assert server.stop() == 0


# -- the Python API ------------------------------------------------------------------


def test_reload_emits_events_and_swaps_the_policy(tmp_path: Path) -> None:
    """
    L{reload} swaps the factory's policy and emits config.reloaded; an
    invalid file emits config.reload_failed and changes nothing.
    """
    path = write(tmp_path / "w.toml", config_text(9, consumers=JOHN_AND_MARY))
    current = load(path)
    factory = SecureServerFactory(current.policy, reactor=Clock())
    seen: list[tuple[str, dict[str, Any]]] = []
    factory.events.add(lambda name, fields: seen.append((name, dict(fields))))

    write(path, config_text(9, consumers=JOHN_AND_MARY).replace("/echo", "/other"))
    new = reload(path, [factory], current)
    assert factory.policy is new.policy
    assert [route.path for route in factory.policy.routes] == ["/other"]
    assert seen[-1][0] == events.CONFIG_RELOADED
    assert seen[-1][1]["revoked"] == 0

    write(path, "[server]\nlisten = 1\n")
    assert reload(path, [factory], new) is new
    assert factory.policy is new.policy
    assert seen[-1] == (
        events.CONFIG_RELOAD_FAILED,
        {"path": str(path), "error": "server.listen: expected array"},
    )


def test_drain_without_sessions_fires_at_once() -> None:
    """L{drain}: nothing open, nothing to wait for; handshakes get 503 from now on."""
    clock = Clock()
    factory = SecureServerFactory(
        parse({"route": [{"path": "/", "app": "echo", "auth": ["anonymous"]}]}).policy,
        reactor=clock,
    )
    done = drain([factory], 10, clock)
    assert factory.stopping
    assert done.called


# -- [server] shutdown_timeout -------------------------------------------------------


def test_systemd_example_leaves_time_for_the_drain() -> None:
    """
    The example unit reloads with SIGHUP and lets a stop take longer than
    the example configuration's shutdown_timeout (or systemd would SIGKILL).
    """
    systemd = Path(__file__).resolve().parent.parent / "examples" / "systemd"
    unit = dict(
        line.split("=", 1)
        for line in (systemd / "txwssec.service").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert unit["KillSignal"] == "SIGTERM"
    config = tomllib.loads((systemd / "wssec.toml").read_text())
    assert float(unit["TimeoutStopSec"]) > config["server"]["shutdown_timeout"]


def minimal(server: dict[str, Any]) -> dict[str, Any]:
    return {"server": server, "route": [{"path": "/", "app": "echo", "auth": ["anonymous"]}]}


def test_shutdown_timeout_default_and_value() -> None:
    """10 seconds by default; any number at least 0."""
    assert parse(minimal({})).shutdown_timeout == 10
    assert parse(minimal({"shutdown_timeout": 2.5})).shutdown_timeout == 2.5
    assert parse(minimal({"shutdown_timeout": 0})).shutdown_timeout == 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10", "server.shutdown_timeout: expected number"),
        (-1, "server.shutdown_timeout: must be at least 0"),
    ],
)
def test_shutdown_timeout_errors(value: Any, message: str) -> None:
    """A wrong type or a negative value names the key path."""
    with pytest.raises(ConfigError) as caught:
        parse(minimal({"shutdown_timeout": value}))
    assert str(caught.value).startswith(message)


# -- which sessions a reload closes --------------------------------------------------


def directory(*consumers: Consumer) -> ConsumerDirectory:
    return ConsumerDirectory(consumers)


JOHN = Consumer("john", key_digests=(key_digest("k1"), key_digest("k2")), password="hash-1")


@pytest.mark.parametrize(
    ("principal", "new", "keys", "closed"),
    [
        # consumer removed: whatever the method
        (Principal("john", "basic", key=key_digest("hash-1")), directory(), frozenset(), True),
        (Principal("john", "tls"), directory(), frozenset(), True),
        # API keys: only the sessions opened with the removed key
        (
            Principal("john", "key", key=key_digest("k2")),
            directory(replace(JOHN, key_digests=(key_digest("k1"),))),
            frozenset(),
            True,
        ),
        (
            Principal("john", "key", key=key_digest("k1")),
            directory(replace(JOHN, key_digests=(key_digest("k1"),))),
            frozenset(),
            False,
        ),
        # the key moved to another consumer: john's session with it closes
        (
            Principal("john", "key", key=key_digest("k2")),
            directory(replace(JOHN, key_digests=()), Consumer("ann", (key_digest("k2"),))),
            frozenset(),
            True,
        ),
        # Basic: a changed password closes, an unchanged one does not
        (
            Principal("john", "basic", key=key_digest("hash-1")),
            directory(replace(JOHN, password="hash-2")),
            frozenset(),
            True,
        ),
        (
            Principal("john", "basic", key=key_digest("hash-1")),
            directory(JOHN),
            frozenset(),
            False,
        ),
        # JWT: the verification key
        (
            Principal("john", "jwt", key=b"old"),
            directory(JOHN),
            frozenset({b"new"}),
            True,
        ),
        (
            Principal("john", "jwt", key=b"same"),
            directory(JOHN),
            frozenset({b"same"}),
            False,
        ),
        # a ticket's session: that of the credential it was issued to
        (
            Principal("john", "ticket", key=key_digest("k2"), issued_by="key"),
            directory(replace(JOHN, key_digests=(key_digest("k1"),))),
            frozenset(),
            True,
        ),
        (
            Principal("john", "ticket", key=key_digest("k1"), issued_by="key"),
            directory(replace(JOHN, key_digests=(key_digest("k1"),))),
            frozenset(),
            False,
        ),
        (
            Principal("john", "ticket", key=key_digest("hash-1"), issued_by="basic"),
            directory(replace(JOHN, password="hash-2")),
            frozenset(),
            True,
        ),
        (
            Principal("john", "ticket", key=b"old", issued_by="jwt"),
            directory(JOHN),
            frozenset({b"new"}),
            True,
        ),
        (Principal("john", "ticket", issued_by="tls"), directory(), frozenset(), True),
        # names that never were consumers (anonymous, a custom method's)
        (Principal("anonymous", "anonymous"), directory(), frozenset(), False),
        (Principal("robot-7", "custom"), directory(), frozenset(), False),
    ],
)
def test_revoked_on_reload(
    principal: Principal, new: ConsumerDirectory, keys: frozenset[bytes], closed: bool
) -> None:
    """The rule a reload applies to each open session (L{_revoked})."""
    assert _revoked(principal, directory(JOHN), new, keys) is closed
