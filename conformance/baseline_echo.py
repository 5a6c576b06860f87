"""
The baseline: a plain Autobahn|Python echo server, configured like
Autobahn's own Twisted testee (``wstest/testee_server_tx.py``): close codes
sent before closing (``failByDrop=False``), every permessage-deflate offer
accepted, and Autobahn's defaults otherwise (no size limits, no auto-ping).

It is measured directly by kosoku, and is the gateway target's upstream.

    python conformance/baseline_echo.py [--port 0]

Prints ``LISTENING <port>`` once it listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
from typing import Any

import txaio

txaio.use_twisted()

from autobahn.twisted.websocket import (  # noqa: E402
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.compress import (  # noqa: E402
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)
from listening import serve  # noqa: E402
from twisted.internet import reactor as _reactor  # noqa: E402

reactor: Any = _reactor


class EchoProtocol(WebSocketServerProtocol):
    """Sends every message back, text as text and binary as binary."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


def accept_deflate(offers: list[Any]) -> PerMessageDeflateOfferAccept | None:
    """Accept the first permessage-deflate offer, as Autobahn's testee does."""
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


def make_factory() -> WebSocketServerFactory:
    """The baseline's factory."""
    factory = WebSocketServerFactory()
    factory.protocol = EchoProtocol
    factory.setProtocolOptions(failByDrop=False, perMessageCompressionAccept=accept_deflate)
    return factory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any)")
    options = parser.parse_args(argv)

    serve(reactor, make_factory(), options.port)


if __name__ == "__main__":
    main()
