"""
The Python examples of docs/python-api.rst run as written.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest_twisted
import websockets
from conftest import aio

ROOT = Path(__file__).resolve().parent.parent


def code_block(heading: str, page: str = "python-api.rst") -> str:
    """The first Python code block after C{heading} in docs/C{page}."""
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    start = text.index(heading)
    match = re.search(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text[start:])
    assert match is not None, f"no python block after {heading!r}"
    return "\n".join(line[4:] for line in match.group(1).splitlines())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_twisted.ensureDeferred
async def test_python_api_example_serves() -> None:
    port = free_port()
    source = code_block("Python API\n==========").replace("9090", str(port))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", source], env=env)
    try:

        async def exchange() -> str | bytes:
            for _ in range(300):  # up to 30 s for the interpreter to start under load
                try:
                    async with websockets.connect(
                        f"ws://127.0.0.1:{port}/hello", additional_headers={"apikey": "john-key"}
                    ) as ws:
                        await ws.send(b"hello")
                        return await ws.recv()
                except OSError:
                    await asyncio.sleep(0.1)
            raise AssertionError("example server never listened")

        assert await aio(exchange()) == "john: hello"
    finally:
        process.terminate()
        process.wait(10)


def test_custom_authenticator_example_registers() -> None:
    from txwssec.auth import registry

    source = code_block("Custom authentication methods")
    namespace: dict[str, object] = {}
    try:
        exec(compile(source, "docs/python-api.rst", "exec"), namespace)
        assert registry.builder_for("shared-secret") is namespace["build"]
    finally:
        registry._BUILDERS.pop("shared-secret", None)
