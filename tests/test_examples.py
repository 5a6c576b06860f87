"""
examples/chat_server.py, run as its users run it: a subprocess on a free
port, real websockets clients holding different keys.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from processes import EXAMPLES, TIMEOUT, Process
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

_LISTENING = re.compile(r"chat listening on ws://127\.0\.0\.1:(\d+)/chat")


class ChatServer(Process):
    """examples/chat_server.py on a free port, its output collected."""

    def __init__(self) -> None:
        super().__init__([sys.executable, str(EXAMPLES / "chat_server.py"), "--port", "0"])
        try:
            self.port = int(self.wait_for(_LISTENING).group(1))
        except AssertionError:
            self.kill()
            raise

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/chat"


@pytest.fixture
def chat() -> Iterator[ChatServer]:
    server = ChatServer()
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(TIMEOUT)


def member(server: ChatServer, key: str | None, *subprotocols: str) -> Any:
    """A connection (to enter as a context manager) with C{key} in C{apikey}."""
    return connect(
        server.url,
        additional_headers={"apikey": key} if key is not None else None,
        subprotocols=[Subprotocol(s) for s in subprotocols] or None,
        open_timeout=TIMEOUT,
        proxy=None,
    )


def receive(ws: ClientConnection) -> Any:
    message = ws.recv(TIMEOUT)
    assert isinstance(message, str)
    return json.loads(message)


def refused(server: ChatServer, key: str | None) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as caught, member(server, key):
        pass
    return caught.value


def test_chat(chat: ChatServer) -> None:
    """
    Two members with different keys: joins are announced, a message from
    either reaches both with the right "from", leaving is announced, and a
    missing or unknown key is refused with 401. SIGTERM closes the members
    still there with 1001 and stops the server.
    """
    with ExitStack() as stack:
        alice: ClientConnection = stack.enter_context(member(chat, "alice-key", "chat.v1"))
        assert alice.subprotocol == "chat.v1"
        assert receive(alice) == {"event": "join", "consumer": "alice"}

        bob: ClientConnection = stack.enter_context(member(chat, "bob-key"))
        assert bob.subprotocol is None
        assert receive(bob) == {"event": "join", "consumer": "bob"}
        assert receive(alice) == {"event": "join", "consumer": "bob"}

        alice.send("hello bob")
        assert receive(alice) == {"from": "alice", "text": "hello bob"}
        assert receive(bob) == {"from": "alice", "text": "hello bob"}

        bob.send('hi alice ✓ {"from": "mallory"}')
        expected = {"from": "bob", "text": 'hi alice ✓ {"from": "mallory"}'}
        assert receive(bob) == expected
        assert receive(alice) == expected

        # the browser way: the key as a subprotocol, never echoed back
        with member(chat, None, "chat.v1", "token", "bob-key") as browser:
            assert browser.subprotocol == "chat.v1"
            assert browser.response is not None
            assert browser.response.headers.get_all("Sec-WebSocket-Protocol") == ["chat.v1"]
            assert receive(browser) == {"event": "join", "consumer": "bob"}
            assert receive(alice) == {"event": "join", "consumer": "bob"}
            assert receive(bob) == {"event": "join", "consumer": "bob"}
        assert receive(alice) == {"event": "leave", "consumer": "bob"}
        assert receive(bob) == {"event": "leave", "consumer": "bob"}

        missing = refused(chat, None)
        assert missing.response.status_code == 401
        assert missing.response.body == b"authentication required\n"
        assert missing.response.headers["WWW-Authenticate"] == 'ApiKey header="apikey"'

        unknown = refused(chat, "mallory-key")
        assert unknown.response.status_code == 401
        assert unknown.response.body == b"authentication required\n"

        # binary is not chat: that member is closed with 1003, the others stay
        bob.send(b"\x00\x01")
        with pytest.raises(ConnectionClosed) as binary:
            bob.recv(TIMEOUT)
        assert binary.value.rcvd is not None
        assert (binary.value.rcvd.code, binary.value.rcvd.reason) == (1003, "text messages only")
        assert receive(alice) == {"event": "leave", "consumer": "bob"}

        alice.send("anyone?")
        assert receive(alice) == {"from": "alice", "text": "anyone?"}

        bob = stack.enter_context(member(chat, "bob-key"))
        assert receive(bob) == {"event": "join", "consumer": "bob"}
        assert receive(alice) == {"event": "join", "consumer": "bob"}

        # shutting down closes everyone still there with 1001 (and the leave
        # notices of closing members are not sent to members already closing)
        assert chat.stop() == 0
        for ws in (alice, bob):
            with pytest.raises(ConnectionClosed) as shutdown:
                ws.recv(TIMEOUT)
            assert shutdown.value.rcvd is not None
            assert (shutdown.value.rcvd.code, shutdown.value.rcvd.reason) == (
                1001,
                "server shutting down",
            )

    output = chat.output()
    assert "Traceback" not in output
    assert "alice joined (1 online)" in output
    assert "bob left (1 online)" in output
    assert "Disconnected" not in output
    for key in ("alice-key", "bob-key", "mallory-key"):
        assert key not in output
