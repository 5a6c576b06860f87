"""
The real C{twistd wssec} with keys and verdicts from an identity provider:
examples/idp/run_idp.py (the test IdP, over HTTPS) and the example
configurations examples/idp/jwks.toml and introspect.toml, on free ports.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import EXAMPLES, TIMEOUT, Process, free_port, twistd
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[int]:
    """examples/idp/run_idp.py on a free port, writing into tmp_path."""
    port = free_port()
    script = EXAMPLES / "idp" / "run_idp.py"
    running = Process(
        [sys.executable, str(script), "--port", str(port), "--folder", str(tmp_path)]
    )
    try:
        running.wait_for(f"idp listening on https://127.0.0.1:{port}")
        yield port
    finally:
        running.kill()


def configured(tmp_path: Path, name: str, idp_port: int) -> tuple[Path, int]:
    """The example configuration C{name}, on a free port, using the IdP on C{idp_port}."""
    port = free_port()
    text = (EXAMPLES / "idp" / name).read_text()
    assert "127.0.0.1:9999" in text and "tcp:9080:" in text
    text = text.replace("127.0.0.1:9999", f"127.0.0.1:{idp_port}")
    path = tmp_path / name
    path.write_text(text.replace("tcp:9080:", f"tcp:{port}:"))
    return path, port


def echo(port: int, token: str) -> str:
    with connect(
        f"ws://127.0.0.1:{port}/echo",
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=TIMEOUT,
        proxy=None,
    ) as ws:
        ws.send("hello")
        return str(ws.recv(TIMEOUT))


def status_without_token(port: int) -> int:
    with pytest.raises(InvalidStatus) as caught:
        with connect(f"ws://127.0.0.1:{port}/echo", open_timeout=TIMEOUT, proxy=None):
            pass
    return caught.value.response.status_code


@pytest.mark.parametrize(
    ("config", "token_file", "loaded"),
    [
        ("jwks.toml", "jwt.txt", "auth.jwt: 1 JWKS keys loaded from https://127.0.0.1:"),
        ("introspect.toml", "opaque.txt", None),
    ],
)
def test_twistd_with_identity_provider(
    tmp_path: Path, idp: int, config: str, token_file: str, loaded: str | None
) -> None:
    path, port = configured(tmp_path, config, idp)
    running = twistd(path, tmp_path)
    try:
        running.wait_for("wssec listening on")
        if loaded:  # the keys load at start-up, before any handshake
            running.wait_for(loaded)
        token = (tmp_path / token_file).read_text().strip()
        assert echo(port, token) == "hello"
        assert status_without_token(port) == 401
        assert running.stop() == 0  # a graceful stop (see tests/test_lifecycle.py)
    finally:
        running.kill()
    output = running.output()
    assert token not in output
    assert "s3cret" not in output
