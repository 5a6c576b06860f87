#!/usr/bin/env python3
"""
Raw Autobahn echo server (Twisted), the baseline of bench/bench.py.

Autobahn's defaults, no txwssec code: every message is sent back as it came
(text as text, binary as binary). With --cert/--key it listens with TLS 1.3
only (Twisted's CertificateOptions defaults otherwise), the same certificate
txwssec uses in the wss:// scenario.

    python bench/servers/autobahn_echo.py --port 9001 [--cert server.pem --key server.key]
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import epollreactor

epollreactor.install()

from autobahn.twisted.websocket import (  # noqa: E402
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet import reactor, ssl  # noqa: E402


class EchoProtocol(WebSocketServerProtocol):
    """Sends every message back."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


def tls_options(cert: str, key: str) -> ssl.CertificateOptions:
    """TLS 1.3 only, with the given PEM certificate and key."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from OpenSSL.crypto import X509, PKey

    with open(cert, "rb") as handle:
        certificate = x509.load_pem_x509_certificate(handle.read())
    with open(key, "rb") as handle:
        private_key = load_pem_private_key(handle.read(), password=None)
    return ssl.CertificateOptions(
        privateKey=PKey.from_cryptography_key(private_key),  # type: ignore[arg-type]
        certificate=X509.from_cryptography(certificate),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    scheme = "wss" if args.cert else "ws"
    factory = WebSocketServerFactory(f"{scheme}://{args.host}:{args.port}")
    factory.protocol = EchoProtocol
    if args.cert:
        reactor.listenSSL(  # type: ignore[attr-defined]
            args.port,
            factory,
            tls_options(args.cert, args.key),
            backlog=1024,
            interface=args.host,
        )
    else:
        reactor.listenTCP(args.port, factory, backlog=1024, interface=args.host)
    print(f"autobahn echo listening on {scheme}://{args.host}:{args.port}", flush=True)
    reactor.run()
    sys.exit(0)


if __name__ == "__main__":
    main()
