"""
Operations under C{twistd wssec}: a whole scenario (key, Basic and JWT
sessions, a refusal of each kind, a limit, a gateway session, the admin
API's listing, closing and revocation) against a real process, in the text
and in the JSON log; then every log line is searched for every secret the
scenario used. None may appear.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from processes import EXAMPLES, TIMEOUT, Process, free_port, twistd
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from txwssec.passwords import hash_password

KEY = "john-api-key-3f9a1c7e5b"
WRONG_KEY = "guessed-api-key-8d2e4f"
PASSWORD = "john-password-71c4e2a9"
WRONG_PASSWORD = "guessed-password-55ab01"
JWT_SECRET = "jwt-shared-secret-0a1b2c3d4e5f60718293a4b5"
WRONG_SECRET = "jwt-wrong-secret-ffeeddccbbaa99887766554433"
ADMIN_TOKEN = "admin-token-9e8d7c6b5a4f3e2d"
UPSTREAM_LISTENING = re.compile(r"echo upstream listening on ws://127\.0\.0\.1:(\d+)/")


def make_token(secret: str = JWT_SECRET, **claims: Any) -> str:
    payload = {"sub": "john", "exp": int(time.time()) + 600, "iat": int(time.time()) - 5}
    return jwt.encode({**payload, **claims}, secret, algorithm="HS256")


TOKEN = make_token(jti="token-one")
SECOND_TOKEN = make_token(jti="token-two")
FORGED_TOKEN = make_token(WRONG_SECRET, jti="token-forged")


def secrets() -> dict[str, str]:
    """Every secret of the scenario, and the forms it travels in."""
    basic = base64.b64encode(f"john:{PASSWORD}".encode()).decode()
    wrong_basic = base64.b64encode(f"john:{WRONG_PASSWORD}".encode()).decode()
    found = {
        "key": KEY,
        "wrong key": WRONG_KEY,
        "password": PASSWORD,
        "wrong password": WRONG_PASSWORD,
        "basic header": basic,
        "wrong basic header": wrong_basic,
        "jwt secret": JWT_SECRET,
        "wrong jwt secret": WRONG_SECRET,
        "admin token": ADMIN_TOKEN,
    }
    for name, token in (("token", TOKEN), ("second", SECOND_TOKEN), ("forged", FORGED_TOKEN)):
        found[name] = token
        found[f"{name} signature"] = token.rsplit(".", 1)[1]
    return found


def write_config(folder: Path, format: str, log_file: str, upstream: int) -> tuple[Path, int, int]:
    port, admin = free_port(), free_port()
    digest = hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()
    config = folder / "wssec.toml"
    config.write_text(
        f"""
[server]
listen = ["tcp:{port}:interface=127.0.0.1"]
health_path = "/healthz"

[admin]
listen = ["tcp:{admin}:interface=127.0.0.1"]
token = "sha256:{digest}"

[log]
format = "{format}"
file = "{log_file}"

[auth.key]
header = "apikey"

[auth.basic]

[auth.jwt]
secret = "{JWT_SECRET}"

[[consumer]]
name = "john"
keys = ["{KEY}"]
password = "{hash_password(PASSWORD, "pbkdf2-sha256")}"

[[route]]
path = "/echo"
app = "echo"
auth = ["key"]
max_message_size = 1024

[[route]]
path = "/basic"
app = "echo"
auth = ["basic"]

[[route]]
path = "/jwt"
app = "echo"
auth = ["jwt"]

[[route]]
path = "/gw"
upstream = "ws://127.0.0.1:{upstream}/"
auth = ["key"]
"""
    )
    return config, port, admin


def admin_call(admin: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin}{path}",
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def websocket(port: int, path: str, **headers: str) -> Any:
    return connect(
        f"ws://127.0.0.1:{port}{path}",
        additional_headers=headers,
        open_timeout=TIMEOUT,
        proxy=None,
    )


def refused(port: int, path: str, **headers: str) -> int:
    with pytest.raises(InvalidStatus) as caught, websocket(port, path, **headers):
        pass
    return caught.value.response.status_code


def raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def wait_until(condition: Any) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def scenario(port: int, admin: int) -> None:
    """Everything the log must tell, without a secret."""
    # Sessions by each method, and a gateway session.
    with websocket(port, "/echo", apikey=KEY) as ws:
        ws.send("hello")
        assert ws.recv(TIMEOUT) == "hello"
    basic = base64.b64encode(f"john:{PASSWORD}".encode()).decode()
    with websocket(port, "/basic", Authorization=f"Basic {basic}") as ws:
        ws.send("hi")
        assert ws.recv(TIMEOUT) == "hi"
    with websocket(port, "/gw", apikey=KEY) as ws:
        ws.send("through")
        assert ws.recv(TIMEOUT) == "through"
    # Refusals of each kind.
    wrong_basic = base64.b64encode(f"john:{WRONG_PASSWORD}".encode()).decode()
    assert refused(port, "/echo", apikey=WRONG_KEY) == 401
    assert refused(port, "/basic", Authorization=f"Basic {wrong_basic}") == 401
    assert refused(port, "/jwt", Authorization=f"Bearer {FORGED_TOKEN}") == 401
    assert refused(port, "/echo", apikey=KEY, Origin="https://evil.example") == 403
    assert refused(port, "/nowhere", apikey=KEY) == 404
    assert raw(port, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 426 ")
    assert raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").endswith(b"\r\n\r\nok\n")
    # A limit (1009).
    with websocket(port, "/echo", apikey=KEY) as ws:
        ws.send("x" * 2048)
        with pytest.raises(ConnectionClosed):
            ws.recv(TIMEOUT)
        assert ws.close_code == 1009
    # The admin API: list, close, revoke.
    with websocket(port, "/jwt", Authorization=f"Bearer {TOKEN}") as jwt_ws:
        with websocket(port, "/echo", apikey=KEY) as key_ws:
            status, body = admin_call(admin, "GET", "/sessions")
            assert status == 200
            assert sorted(r["route"] for r in json.loads(body)) == ["/echo", "/jwt"]
            assert admin_call(admin, "DELETE", "/sessions?consumer=john&id=x")[0] == 400
            status, body = admin_call(
                admin,
                "POST",
                "/revocations",
                {"jti": "token-one", "expires_at": time.time() + 600},
            )
            assert (status, json.loads(body)) == (200, {"closed": 1})
            with pytest.raises(ConnectionClosed):
                jwt_ws.recv(TIMEOUT)
            assert jwt_ws.close_code == 3003
            status, body = admin_call(admin, "DELETE", "/sessions?consumer=john")
            assert (status, json.loads(body)) == (200, {"closed": 1})
            with pytest.raises(ConnectionClosed):
                key_ws.recv(TIMEOUT)
            assert key_ws.close_code == 3003
    assert refused(port, "/jwt", Authorization=f"Bearer {TOKEN}") == 401
    with websocket(port, "/jwt", Authorization=f"Bearer {SECOND_TOKEN}") as ws:
        ws.send("still")
        assert ws.recv(TIMEOUT) == "still"
    status, body = admin_call(admin, "GET", "/metrics")
    assert status == 200
    assert b'wssec_sessions_closed_total{code="3003",route="/jwt"} 1.0' in body
    assert admin_call(admin, "GET", "/readyz")[0] == 200


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[int]:
    process = Process(
        [sys.executable, str(EXAMPLES / "echo_upstream.py"), "--port", "0"], tmp_path
    )
    try:
        yield int(process.wait_for(UPSTREAM_LISTENING).group(1))
    finally:
        process.kill()


def assert_no_secret(text: str, where: str) -> None:
    for name, secret in secrets().items():
        assert secret not in text, f"the {name} is in {where}"


def test_text_log_has_no_secret(tmp_path: Path, upstream: int) -> None:
    config, port, admin = write_config(tmp_path, "text", "-", upstream)
    server = twistd(config, tmp_path)
    try:
        server.wait_for(f"wssec listening on admin tcp:{admin}")
        server.wait_for(f"wssec listening on tcp:{port}")
        scenario(port, admin)
        wait_until(lambda: "session revoked" in server.output())
    finally:
        server.stop()
    output = server.output()
    assert "refused" in output and "limit limit.max_message_size" in output
    assert_no_secret(output, "the text log")


def test_json_log_has_no_secret(tmp_path: Path, upstream: int) -> None:
    log = tmp_path / "wssec.json"
    config, port, admin = write_config(tmp_path, "json", str(log), upstream)
    server = twistd(config, tmp_path)
    try:
        wait_until(lambda: log.exists() and f"tcp:{port}" in log.read_text())
        scenario(port, admin)
        wait_until(lambda: '"event":"session.revoked"' in log.read_text())
        # SIGUSR1 reopens the file: logrotate moves it, then signals.
        log.rename(tmp_path / "wssec.json.1")
        server.process.send_signal(signal.SIGUSR1)
        wait_until(log.exists)
        assert refused(port, "/echo", apikey=WRONG_KEY) == 401
        wait_until(lambda: '"event":"handshake.refused"' in log.read_text())
    finally:
        server.stop()
    assert_no_secret(server.output(), "twistd's output")
    lines = (tmp_path / "wssec.json.1").read_text().splitlines() + log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert list(record)[:4] == ["time", "level", "event", "namespace"]
    assert_no_secret("\n".join(lines), "the JSON log")
    by_event: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_event.setdefault(record["event"], []).append(record)
    for event in ("handshake.refused", "session.opened", "session.closed", "limit.exceeded"):
        assert event in by_event, event
    assert {r["status"] for r in by_event["handshake.refused"]} >= {401, 403, 404, 426}
    revoked = by_event["session.revoked"]
    assert {(r["route"], r["code"]) for r in revoked} == {("/jwt", 3003), ("/echo", 3003)}
    closed = {(r["route"], r["initiator"], r["code"]) for r in by_event["session.closed"]}
    assert ("/echo", "server", 1009) in closed and ("/jwt", "server", 3003) in closed
    (echo,) = [
        r for r in by_event["session.closed"] if r["messages_in"] == 1 and r["route"] == "/echo"
    ]
    assert set(echo) >= {"duration_s", "messages_out", "bytes_in", "bytes_out", "peer", "consumer"}
    assert (echo["initiator"], echo["messages_out"]) == ("peer", 1)
    # A gateway session's traffic from the client: "through" (6 bytes of
    # header, 7 of payload) and the close frame (8).
    (gateway,) = [r for r in by_event["session.closed"] if r["route"] == "/gw"]
    assert (gateway["messages_in"], gateway["bytes_in"]) == (1, 21)


def readme_block(heading: str) -> str:
    """The first Python code block after C{heading} in docs/operations.rst."""
    readme = (EXAMPLES.parent / "docs" / "operations.rst").read_text(encoding="utf-8")
    start = readme.index(heading)
    match = re.search(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", readme[start:])
    assert match is not None
    return "\n".join(line[4:] for line in match.group(1).splitlines())


def test_readme_admin_python_example(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    source = readme_block("Admin API\n=========").replace("9080", str(port))
    process = Process([sys.executable, "-c", source.replace("9900", str(admin))], tmp_path)
    try:
        wait_until(lambda: _answers(admin))
        with websocket(port, "/echo", apikey="john-key") as ws:
            ws.send("x")
            assert ws.recv(TIMEOUT) == "x"
        request = urllib.request.Request(
            f"http://127.0.0.1:{admin}/sessions",
            headers={"Authorization": "Bearer change-me-admin-token"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=TIMEOUT) as response:
            assert json.loads(response.read()) == []
        assert (
            b'wssec_handshakes_total{method="key",route="/echo",status="101"} 1.0'
            in (admin_call(admin, "GET", "/metrics")[1])
        )
    finally:
        process.kill()


def _answers(port: int) -> bool:
    try:
        return admin_call(port, "GET", "/healthz")[0] == 200
    except OSError:
        return False


def test_admin_example_config(tmp_path: Path) -> None:
    """examples/admin.toml as its comments run it (on free ports)."""
    port, admin = free_port(), free_port()
    text = (EXAMPLES / "admin.toml").read_text()
    assert "tcp:9080:" in text and "tcp:9900:" in text
    config = tmp_path / "admin.toml"
    config.write_text(
        text.replace("tcp:9080:", f"tcp:{port}:").replace("tcp:9900:", f"tcp:{admin}:")
    )
    server = twistd(config, tmp_path)
    try:
        server.wait_for(f"tcp:{admin}")
        assert raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").endswith(b"\r\n\r\nok\n")
        assert admin_call(admin, "GET", "/readyz") == (200, b'{"ready":true,"reasons":[]}\n')
        with websocket(port, "/echo", apikey="john-key") as ws:
            wait_until(lambda: b"john" in _sessions(admin, "change-me-admin-token"))
            status, body = _delete(admin, "change-me-admin-token", "/sessions?consumer=john")
            assert (status, json.loads(body)) == (200, {"closed": 1})
            with pytest.raises(ConnectionClosed):
                ws.recv(TIMEOUT)
            assert ws.close_code == 3003
    finally:
        server.stop()
    assert '"event":"session.closed"' in server.output()


def _sessions(admin: int, token: str) -> bytes:
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin}/sessions", headers={"Authorization": f"Bearer {token}"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=TIMEOUT) as response:
        return bytes(response.read())


def _delete(admin: int, token: str, path: str) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin}{path}",
        method="DELETE",
        headers={"Authorization": f"Bearer {token}"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=TIMEOUT) as response:
        return response.status, bytes(response.read())
