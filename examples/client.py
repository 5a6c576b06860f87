"""
Connect to the quickstart server over wss://, verified with the development
CA, send one message and print the echo.

    python -m txwssec make-dev-cert examples/dev-certs
    twistd -n wssec --config examples/quickstart.toml &
    python examples/client.py
    python examples/client.py --via subprotocol     # Sec-WebSocket-Protocol: token, <key>

A close with 3000 (credentials expired) is reported as its own event.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred

from txwssec.client import ApiKey, ClientTLS, SecureClientFactory, SecureClientProtocol

HERE = Path(__file__).resolve().parent


class OneEcho(SecureClientProtocol):
    """Sends one message, waits for its echo, closes normally."""

    echoed: Deferred[str]

    def onOpen(self) -> None:
        self.echoed = Deferred()
        self.sendMessage(self.factory.message.encode("utf-8"))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not self.echoed.called:
            self.echoed.callback(payload.decode("utf-8"))
        self.sendClose(1000)

    def onCredentialsExpired(self) -> None:
        print("credentials expired: fetch a new key or token and reconnect", file=sys.stderr)


async def run(reactor: object, args: argparse.Namespace) -> int:
    factory = SecureClientFactory(
        args.url,
        ApiKey(args.key, via=args.via),
        tls=ClientTLS(ca_file=args.ca),
        reactor=reactor,
    )
    factory.protocol = OneEcho
    factory.message = args.message  # type: ignore[attr-defined]
    protocol = await factory.connect()
    try:
        await protocol.opened
    except ConnectionError as error:
        print(f"could not open: {error}", file=sys.stderr)
        return 1
    assert isinstance(protocol, OneEcho)
    print(await protocol.echoed)
    _was_clean, code, _reason = await protocol.closed
    return 0 if code == 1000 else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="wss://localhost:9443/echo")
    parser.add_argument("--ca", default=str(HERE / "dev-certs" / "ca.pem"))
    parser.add_argument("--key", default="john-key")
    parser.add_argument("--via", choices=("header", "subprotocol"), default="header")
    parser.add_argument("--message", default="hello over wss")
    args = parser.parse_args()

    async def exit_with_status(reactor: object) -> None:
        status = await run(reactor, args)
        if status:
            raise SystemExit(status)  # task.react exits with this status

    task.react(lambda reactor: ensureDeferred(exit_with_status(reactor)))


if __name__ == "__main__":
    main()
