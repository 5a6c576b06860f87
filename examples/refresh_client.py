"""
A Python client that refreshes its session in-band, for
examples/identity.toml: it connects with a JWT valid 4 seconds, and each
time the server sends C{wssec.expiring} (2 s before the expiry) the
C{refresh} callback mints a new 4-second token, which the client sends in a
C{wssec.refresh} message. After three refreshes (about 6 s, past the first
token's expiry) it sends a message, prints the echo, and closes.

In production the callback asks your identity provider for a new token
(an OAuth refresh token grant, say), and the tokens live minutes, not
seconds: the mechanism is the same.

    python examples/refresh_client.py [ws://127.0.0.1:9082/echo]
"""

from __future__ import annotations

import sys
import time

import jwt
from twisted.internet.defer import Deferred
from twisted.internet.task import react

from txwssec.client import BearerToken, SecureClientFactory, SecureClientProtocol

SECRET = "identity-example-secret-change-me-0123456789"  # examples/identity.toml's


def new_token(lifetime: int = 4) -> str:
    """A JWT for john, valid C{lifetime} seconds (your identity provider's job)."""
    return jwt.encode({"sub": "john", "exp": int(time.time()) + lifetime}, SECRET, "HS256")


FIRST = new_token()
FIRST_EXP = jwt.decode(FIRST, options={"verify_signature": False})["exp"]


class Client(SecureClientProtocol):
    refreshes = 0

    def onRefreshed(self, expires_at: float | None) -> None:
        self.refreshes += 1
        print(f"refreshed until {expires_at}", flush=True)
        if self.refreshes == 3:
            past = time.time() - FIRST_EXP
            print(f"first token expired {past:.1f} s ago", flush=True)
            self.sendMessage(b"still here after three refreshes")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        print(f"echo: {payload.decode()}", flush=True)
        self.sendClose(1000)


async def main(reactor: object, url: str) -> None:
    async def refresh() -> str:
        return new_token()

    factory = SecureClientFactory(url, BearerToken(FIRST), refresh=refresh)
    factory.protocol = Client
    protocol = await factory.connect()
    await protocol.opened
    _, code, _ = await protocol.closed
    print(f"closed {code}", flush=True)


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:9082/echo"

    def run(reactor: object) -> Deferred[None]:
        return Deferred.fromCoroutine(main(reactor, url))

    react(run)
