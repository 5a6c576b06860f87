"""
A small authenticated broadcast chat, built with txwssec's Python API (no
configuration file).

Two consumers, C{alice} and C{bob}, each have an API key. Every text message
a member sends is broadcast to every member, the sender included, as JSON::

    {"from": "alice", "text": "hello"}

and members see who comes and goes::

    {"event": "join", "consumer": "bob"}
    {"event": "leave", "consumer": "bob"}

Run it::

    python examples/chat_server.py            # ws://127.0.0.1:9084/chat
    python examples/chat_server.py --port 0   # any free port (it is logged)

Connect with websocat, the key in a header (one terminal per member)::

    websocat -H 'apikey: alice-key' --protocol chat.v1 ws://127.0.0.1:9084/chat
    websocat -H 'apikey: bob-key' ws://127.0.0.1:9084/chat

or from Python with websockets::

    import asyncio, websockets

    async def main() -> None:
        async with websockets.connect(
            "ws://127.0.0.1:9084/chat",
            additional_headers={"apikey": "alice-key"},
            subprotocols=["chat.v1"],
        ) as ws:
            await ws.send("hello")
            async for message in ws:
                print(message)

    asyncio.run(main())

A browser, which cannot set headers, sends the key as a subprotocol:
C{new WebSocket(url, ["chat.v1", "token", "alice-key"])}; the server answers
C{chat.v1} and never echoes the key. Browsers are only let in from the same
origin as the server (txwssec's default Origin policy). Without a key, or
with an unknown one, the handshake is refused with 401.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure

from txwssec import (
    CloseCode,
    Consumer,
    ConsumerDirectory,
    KeyAuthenticator,
    RoutePolicy,
    SecureServerFactory,
    SecureServerProtocol,
)
from txwssec.consumers import key_digest

#: Demo consumers and their API keys. Real deployments keep keys out of the
#: source (C{sha256:} digests in a configuration file, a secrets store...).
DEMO_KEYS = {"alice": "alice-key", "bob": "bob-key"}

#: The WebSocket "unsupported data" close code: this chat is text only.
UNSUPPORTED_DATA = 1003

log = Logger(namespace="chat")


#: The chat route's path.
CHAT = "/chat"


class ChatProtocol(SecureServerProtocol):
    """
    One chat member. The handshake has already authenticated it, so
    C{self.session.consumer} is the member's name.
    """

    factory: ChatFactory
    #: Set once the member is announced (a refused handshake never joins).
    joined = False

    @property
    def consumer(self) -> str:
        """The authenticated member's name."""
        assert self.session is not None
        return self.session.consumer

    def onOpen(self) -> None:
        self.joined = True
        self.factory.join(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.closeWith(UNSUPPORTED_DATA, "text messages only")
            return
        # Autobahn has already checked that text messages are valid UTF-8.
        self.factory.announce({"from": self.consumer, "text": payload.decode("utf-8")})

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.joined:
            self.factory.leave(self)

    def closeWith(self, code: int, reason: str) -> None:
        """
        Start the closing handshake with any valid close code. Autobahn's
        C{sendClose} only takes the application codes (1000, 3000-4999);
        protocol codes such as 1001 and 1003 go through C{sendCloseFrame}.
        """
        self.sendCloseFrame(code=int(code), reasonUtf8=reason.encode("utf-8"))


class ChatFactory(SecureServerFactory):
    """
    The chat room: its members are the route's open sessions
    (C{openSessions(CHAT)}), which the factory keeps for us.
    """

    protocol = ChatProtocol

    def online(self) -> int:
        """How many members are connected (and not leaving)."""
        return len(self.openSessions(CHAT))

    def join(self, member: ChatProtocol) -> None:
        """Tell everyone, the newcomer included, that C{member} joined."""
        log.info(
            "{consumer} joined ({count} online)", consumer=member.consumer, count=self.online()
        )
        self.announce({"event": "join", "consumer": member.consumer})

    def leave(self, member: ChatProtocol) -> None:
        """Tell the others that C{member} left (it is no longer open)."""
        log.info("{consumer} left ({count} online)", consumer=member.consumer, count=self.online())
        self.announce({"event": "leave", "consumer": member.consumer})

    def announce(self, message: dict[str, str]) -> None:
        """
        Send C{message} as JSON text to every member. L{broadcast} skips
        members that are closing, so this is safe from any handler.
        """
        payload = json.dumps(message, ensure_ascii=False).encode("utf-8")
        self.broadcast(payload, isBinary=False, route=CHAT)

    def goingAway(self) -> Deferred[Any]:
        """
        Close every member with 1001 (server shutting down). The reactor
        waits for the returned Deferred before it drops the connections,
        so the close frames are sent; a member that does not answer is
        waited for at most C{close_timeout} plus one second.
        """
        closed = []
        for member in self.openSessions(CHAT):
            assert isinstance(member, ChatProtocol)
            member.closeWith(CloseCode.GOING_AWAY, "server shutting down")
            closed.append(member.is_closed)
        done = DeferredList(closed, consumeErrors=True)
        done.addTimeout(self.policy.close_timeout + 1, self.clock)
        return done.addErrback(_timed_out)


def _timed_out(failure: Failure) -> None:
    failure.trap(defer.TimeoutError)


def make_factory() -> ChatFactory:
    """The chat factory: two key-holding consumers on C{/chat}."""
    consumers = ConsumerDirectory(
        Consumer(name, (key_digest(key),)) for name, key in DEMO_KEYS.items()
    )
    route = RoutePolicy(
        CHAT,
        [KeyAuthenticator(consumers)],
        subprotocols=("chat.v1",),
        max_message_size=64 * 1024,
    )
    return ChatFactory(route)


async def serve(reactor: Any, port: int, interface: str) -> None:
    """Listen, log where, and serve until the reactor stops."""
    factory = make_factory()
    listening = await TCP4ServerEndpoint(reactor, port, interface=interface).listen(factory)
    address = listening.getHost()
    log.info("chat listening on ws://{host}:{port}/chat", host=address.host, port=address.port)
    reactor.addSystemEventTrigger("before", "shutdown", factory.goingAway)
    await Deferred()  # forever: Ctrl-C or SIGTERM stops the reactor


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chat server."""
    parser = argparse.ArgumentParser(description="txwssec broadcast chat example")
    parser.add_argument("--port", type=int, default=9084, help="TCP port (0: any free port)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to listen on")
    args = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    task.react(serve, (args.port, args.interface))


if __name__ == "__main__":
    main()
