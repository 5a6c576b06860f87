#!/usr/bin/env python3
"""
`websockets` echo server, a peer in bench/bench.py: the newest
``websockets`` on uvloop (``--loop asyncio`` for the standard loop), with
the security settings of txwssec's benchmark routes, checked in
``process_request`` before the upgrade:

- ``/key``: the ``apikey`` header, compared with ``hmac.compare_digest``
  (401 otherwise);
- ``/jwt-hs``: ``Authorization: Bearer <JWT>``, HS256, verified by PyJWT as
  txwssec does (401 otherwise);
- any other path: 404;
- ``Origin`` must be one of the allowed origins (403 otherwise);
- messages up to 1 MiB (``max_size``; 1009 beyond), no compression (as
  txwssec's routes by default), a ping every 30 s with a 10 s timeout (as
  txwssec's defaults).

txwssec's per-connection and per-consumer rate limits, its session timers
and its log line have no equivalent here; see bench/README.rst.

With ``--cert``/``--key`` it listens with TLS 1.3 only (Python's ``ssl``,
which sends session tickets by default).

    python bench/servers/websockets_echo.py --port 9002 [--loop asyncio]
        [--cert server.pem --key server.key]
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import http
import ssl
from typing import Any

import jwt
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

API_KEY = b"bench-key-0123456789abcdef"
JWT_SECRET = "bench-secret-0123456789abcdef0123456789"
ORIGINS = frozenset({"https://app.example.com", "https://admin.example.com"})
MAX_SIZE = 1024 * 1024


def check(connection: ServerConnection, request: Request) -> Response | None:
    """The route's checks; a refusal, or None to go on with the upgrade."""
    path = request.path.partition("?")[0]
    if request.headers.get("Origin") not in ORIGINS:
        return connection.respond(http.HTTPStatus.FORBIDDEN, "forbidden\n")
    if path == "/key":
        key = request.headers.get("apikey", "").encode()
        if hmac.compare_digest(key, API_KEY):
            return None
    elif path == "/jwt-hs":
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme == "Bearer" and token:
            try:
                jwt.decode(token, JWT_SECRET, algorithms=["HS256"])
            except jwt.InvalidTokenError:
                pass
            else:
                return None
    else:
        return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
    return connection.respond(http.HTTPStatus.UNAUTHORIZED, "unauthorized\n")


async def echo(websocket: ServerConnection) -> None:
    """Send every message back, text as text and binary as binary."""
    async for message in websocket:
        await websocket.send(message)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    return context


async def run(host: str, port: int, tls: ssl.SSLContext | None) -> None:
    options: dict[str, Any] = {}
    if tls is not None:
        options["ssl"] = tls
    async with serve(
        echo,
        host,
        port,
        backlog=1024,
        process_request=check,
        max_size=MAX_SIZE,
        compression=None,
        ping_interval=30,
        ping_timeout=10,
        **options,
    ) as server:
        scheme = "wss" if tls is not None else "ws"
        print(f"websockets echo listening on {scheme}://{host}:{port}", flush=True)
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--uvloop", dest="loop", action="store_const", const="uvloop", help="the default"
    )
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    tls = tls_context(args.cert, args.key) if args.cert else None
    main_coroutine = run(args.host, args.port, tls)
    try:
        if args.loop == "uvloop":
            import uvloop  # the bench extra; no silent fallback

            uvloop.run(main_coroutine)
        else:
            asyncio.run(main_coroutine)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
