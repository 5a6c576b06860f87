"""
Message validation through the real C{twistd wssec}, with the shipped
example (examples/messages.toml and its schema): an application route and a
gateway route (to a plain echo route of the same process), each refusal
with its close code, valid messages echoed unchanged.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import EXAMPLES, TIMEOUT, TWISTD, Process, free_port, repo_env, twistd
from test_readme import code_block
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Process, int]]:
    port = free_port()
    text = (EXAMPLES / "messages.toml").read_text()
    assert text.count("9083") == 4  # the comments, the listener, the upstream
    (tmp_path / "messages.toml").write_text(text.replace("9083", str(port)))
    shutil.copy(EXAMPLES / "chat.schema.json", tmp_path)
    running = twistd(tmp_path / "messages.toml", tmp_path)
    try:
        running.wait_for("wssec listening on")
        yield running, port
    finally:
        running.kill()


def closed_by(url: str, message: str | bytes) -> tuple[int | None, str | None]:
    """Send one message: the close code and reason the server answers with."""
    with connect(url, open_timeout=TIMEOUT, proxy=None) as ws:
        ws.send(message)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=TIMEOUT)
        return ws.close_code, ws.close_reason


def echoed(url: str, *messages: str, **options: Any) -> list[str | bytes]:
    with connect(url, open_timeout=TIMEOUT, proxy=None, **options) as ws:
        back = []
        for message in messages:
            ws.send(message)
            back.append(ws.recv(timeout=TIMEOUT))
        return back


def test_example_routes(server: tuple[Process, int]) -> None:
    running, port = server
    chat = f"ws://127.0.0.1:{port}/chat"
    gateway = f"ws://127.0.0.1:{port}/gateway"
    say = json.dumps({"type": "say", "room": "lobby", "text": "hello", "tags": ["x"]})
    join = '{"type":"join","room":"lobby"}'

    assert echoed(chat, say, join) == [say, join]
    assert echoed(chat, say, compression="deflate") == [say]
    assert closed_by(chat, b"\x00\x01") == (1003, "binary messages not accepted")
    assert closed_by(chat, "hello") == (1007, "invalid JSON")
    assert closed_by(chat, '{"type": "shout", "room": "lobby"}') == (
        1007,
        "message does not match schema",
    )
    assert closed_by(chat, "[" * 9 + "]" * 9) == (1007, "JSON too deep")
    assert closed_by(chat, '{"type":"say","room":"a","n":' + "1" * 5000 + "}") == (
        1007,
        "invalid JSON",
    )

    assert echoed(gateway, join, say) == [join, say]
    assert closed_by(gateway, "not json") == (1007, "invalid JSON")
    # valid JSON for the client side, but the upstream's echo breaks the
    # upstream schema: the client gets 1014
    assert closed_by(gateway, '{"type": "shout"}') == (1014, "upstream failed")

    running.wait_for("message refused (schema, from upstream)")
    output = running.output()
    assert "message refused (binary, from client)" in output
    assert "message refused (schema, from client)" in output
    assert "at /type: properties/type/enum" in output
    assert "shout" not in output  # the log names where, never the values


def test_missing_schema_is_a_one_line_error(tmp_path: Path) -> None:
    """The example without its schema file: one line naming key path and file."""
    path = tmp_path / "messages.toml"
    path.write_text((EXAMPLES / "messages.toml").read_text().replace("9083", str(free_port())))
    done = subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "wssec", "--config", str(path)],
        cwd=tmp_path,
        env=repo_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 1
    assert done.stdout == (
        f"{path}: route[0].messages.schema: {tmp_path / 'chat.schema.json'}: "
        "cannot read: No such file or directory\n"
    )


def test_readme_python_example() -> None:
    """The user guide's Python example of message rules runs as written."""
    port = free_port()
    source = code_block("Message validation\n==================", "guide.rst").replace(
        "9091", str(port)
    )
    assert str(port) in source
    running = Process([sys.executable, "-c", source])
    try:
        url = f"ws://127.0.0.1:{port}/chat"
        for _ in range(300):  # the interpreter may take a while to start under load
            try:
                assert echoed(url, '{"type": "hi"}') == ['{"type": "hi"}']
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("the example never listened")
        assert closed_by(url, '{"kind": "hi"}') == (1007, "message does not match schema")
        assert closed_by(url, b"\x00") == (1003, "binary messages not accepted")
    finally:
        running.kill()
