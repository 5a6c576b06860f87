"""
A tiny upstream WebSocket server for examples/gateway.toml: the echo server
of Apache APISIX's WebSocket authentication guide, offline.

It echoes every message, text as text and binary as binary, with one
exception: the text message C{whoami} is answered with the
C{X-Consumer-Username} header of the upgrade request, which the txwssec
gateway sets to the authenticated consumer's name (C{(none)} without it).

It does no authentication of its own and listens on 127.0.0.1 only: the
gateway in front of it is the door. Run it::

    python examples/echo_upstream.py              # ws://127.0.0.1:8080/
    python examples/echo_upstream.py --port 0     # any free port (it is logged)

then the gateway, in another terminal::

    twistd -n wssec --config examples/gateway.toml

and connect through the gateway (with websocat; or see examples/gateway.toml)::

    websocat ws://127.0.0.1:9081/ws                                   # 401
    websocat -H 'apikey: this-is-jacks-key' ws://127.0.0.1:9081/ws    # echo
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import react
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

log = Logger(namespace="echo_upstream")

#: The largest message accepted (and so echoed): 1 MiB.
MAX_MESSAGE_SIZE = 1024 * 1024


class EchoUpstreamProtocol(WebSocketServerProtocol):
    """Echoes messages; answers C{whoami} with the consumer the gateway named."""

    consumer = "(none)"

    def onConnect(self, request: ConnectionRequest) -> None:
        # Autobahn lower-cases header names.
        self.consumer = request.headers.get("x-consumer-username", "(none)")
        log.info(
            "upstream connection from {peer} for {consumer}",
            peer=request.peer,
            consumer=self.consumer,
        )

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary and payload == b"whoami":
            self.sendMessage(self.consumer.encode("utf-8"), isBinary=False)
        else:
            self.sendMessage(payload, isBinary)


def make_factory() -> WebSocketServerFactory:
    """The echo server's factory, with a bounded message size."""
    factory = WebSocketServerFactory()
    factory.protocol = EchoUpstreamProtocol
    factory.setProtocolOptions(
        maxFramePayloadSize=MAX_MESSAGE_SIZE,
        maxMessagePayloadSize=MAX_MESSAGE_SIZE,
    )
    return factory


async def serve(reactor: Any, port: int, interface: str) -> None:
    """Listen, log where, and serve until the reactor stops."""
    listening = await TCP4ServerEndpoint(reactor, port, interface=interface).listen(make_factory())
    address = listening.getHost()
    log.info(
        "echo upstream listening on ws://{host}:{port}/", host=address.host, port=address.port
    )
    await Deferred()  # forever: Ctrl-C or SIGTERM stops the reactor


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the echo upstream."""
    parser = argparse.ArgumentParser(description="echo upstream for examples/gateway.toml")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (0: any free port)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to listen on")
    args = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    react(serve, (args.port, args.interface))


if __name__ == "__main__":
    main()
