"""
The client target: an echo client built on txwssec's SecureClientFactory /
SecureClientProtocol, driven by kosoku's fuzzingserver the way Autobahn's own
client testee is (``wstest/testee_client_tx.py``): ``/getCaseCount``, then
``/runCase?case=N&agent=AGENT`` for every case (echo every message until the
server closes), then ``/updateReports?agent=AGENT``.

permessage-deflate is offered and accepted with Autobahn's client options set
on the factory here, as Autobahn's testee does; txwssec's client code is used
as it is. The client sends an API key header, as it would to a txwssec
server (kosoku ignores it).

With ``--plain`` the same echo client is built on Autobahn's own
WebSocketClientFactory / WebSocketClientProtocol instead: the client-mode
baseline, so that txwssec's client is compared with what it builds on.

    python conformance/client_testee.py --url ws://127.0.0.1:9001 [--agent txwssec] [--plain]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import txaio

txaio.use_twisted()

from autobahn.twisted.websocket import (  # noqa: E402
    WebSocketClientFactory,
    WebSocketClientProtocol,
)
from autobahn.websocket.compress import (  # noqa: E402
    PerMessageDeflateOffer,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from twisted.internet import reactor as _reactor  # noqa: E402
from twisted.internet.defer import Deferred, ensureDeferred  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from txwssec.client import ApiKey, SecureClientFactory, SecureClientProtocol  # noqa: E402

reactor: Any = _reactor

#: Largest message accepted from the fuzzingserver (9.* sends 16 MiB).
MAX_MESSAGE_SIZE = 64 * 1024 * 1024


class EchoClientProtocol(SecureClientProtocol):
    """Sends every message back exactly: text as text, binary as binary."""

    factory: TesteeFactory

    def __init__(self) -> None:
        super().__init__()
        self.received: list[bytes] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.factory.collect:
            self.received.append(payload)
        else:
            self.sendMessage(payload, isBinary)


class TesteeFactory(SecureClientFactory):
    """A SecureClientFactory with Autobahn's client testee options."""

    protocol = EchoClientProtocol
    collect = False


class PlainEchoProtocol(WebSocketClientProtocol):
    """The same echo client on Autobahn alone (the baseline)."""

    factory: PlainFactory

    def __init__(self) -> None:
        super().__init__()
        self.received: list[bytes] = []
        self.closed: Deferred[None] = Deferred()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.factory.collect:
            self.received.append(payload)
        else:
            self.sendMessage(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.closed.called:
            self.closed.callback(None)


class PlainFactory(WebSocketClientFactory):
    """Autobahn's client factory, configured like Autobahn's client testee."""

    protocol = PlainEchoProtocol  # type: ignore[assignment]
    collect = False


def accept_deflate(response: Any) -> PerMessageDeflateResponseAccept | None:
    """Accept the server's permessage-deflate response, as Autobahn's testee does."""
    if isinstance(response, PerMessageDeflateResponse):
        return PerMessageDeflateResponseAccept(response)
    return None


def make_plain_factory(url: str, collect: bool = False) -> PlainFactory:
    """A plain Autobahn factory for one connection to C{url}."""
    factory = PlainFactory(url, reactor=reactor)
    factory.collect = collect
    factory.setProtocolOptions(
        failByDrop=False,
        perMessageCompressionOffers=[PerMessageDeflateOffer()],
        perMessageCompressionAccept=accept_deflate,
    )
    return factory


def make_factory(url: str, collect: bool = False) -> TesteeFactory:
    """A txwssec factory for one connection to C{url}."""
    factory = TesteeFactory(
        url,
        ApiKey("conformance"),
        max_message_size=MAX_MESSAGE_SIZE,
        reactor=reactor,
    )
    factory.collect = collect
    factory.setProtocolOptions(
        perMessageCompressionOffers=[PerMessageDeflateOffer()],
        perMessageCompressionAccept=accept_deflate,
    )
    return factory


async def visit(url: str, plain: bool, collect: bool = False) -> list[bytes]:
    """Connect to C{url}, echo (or collect) until closed; the messages collected."""
    protocol: Any
    if plain:
        plain_factory = make_plain_factory(url, collect)
        endpoint = TCP4ClientEndpoint(reactor, plain_factory.host, plain_factory.port)
        protocol = await endpoint.connect(plain_factory)
    else:
        protocol = await make_factory(url, collect).connect()
    await protocol.closed
    received: list[bytes] = getattr(protocol, "received", [])
    return received


async def run(base: str, agent: str, plain: bool = False) -> int:
    """Drive the whole fuzzingserver protocol; the number of cases run."""
    messages = await visit(f"{base}/getCaseCount", plain, collect=True)
    if not messages:
        raise RuntimeError("the fuzzingserver sent no case count")
    count = int(messages[0])
    print(f"running {count} cases as {agent}", flush=True)
    for case in range(1, count + 1):
        await visit(f"{base}/runCase?case={case}&agent={agent}", plain)
    await visit(f"{base}/updateReports?agent={agent}", plain)
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="txwssec client testee for kosoku")
    parser.add_argument("--url", required=True, help="fuzzingserver URL, ws://HOST:PORT")
    parser.add_argument("--agent", default="txwssec")
    parser.add_argument("--plain", action="store_true", help="Autobahn's client alone")
    options = parser.parse_args(argv)
    status = [1]

    def done(count: int) -> None:
        print(f"done: {count} cases", flush=True)
        status[0] = 0

    def failed(failure: Failure) -> None:
        print(f"client testee failed: {failure.getTraceback()}", file=sys.stderr, flush=True)

    def start() -> None:
        finished = ensureDeferred(run(options.url.rstrip("/"), options.agent, options.plain))
        finished.addCallbacks(done, failed)
        finished.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    sys.exit(status[0])


if __name__ == "__main__":
    main()
