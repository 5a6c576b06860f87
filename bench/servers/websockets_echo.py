#!/usr/bin/env python3
"""
`websockets` echo server (asyncio, the standard event loop, or uvloop with
``--uvloop``), a peer in bench/bench.py and bench/hotpaths.py.

websockets' defaults (1 MiB max_size, pings every 20 s, permessage-deflate
offered only if the client asks, which the load generator does not).

    python bench/servers/websockets_echo.py --port 9002
    python bench/servers/websockets_echo.py --port 9002 --uvloop
    python bench/servers/websockets_echo.py --port 9443 --cert C --key K  # wss, TLS 1.3
"""

from __future__ import annotations

import argparse
import asyncio
import ssl

from websockets.asyncio.server import ServerConnection, serve


async def echo(websocket: ServerConnection) -> None:
    """Send every message back, text as text and binary as binary."""
    async for message in websocket:
        await websocket.send(message)


async def run(host: str, port: int, context: ssl.SSLContext | None = None) -> None:
    async with serve(echo, host, port, backlog=1024, ssl=context) as server:
        print(f"websockets echo listening on ws://{host}:{port}", flush=True)
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    parser.add_argument("--cert", help="PEM certificate (chain): serve wss, TLS 1.3 only")
    parser.add_argument("--key", help="PEM private key of --cert")
    args = parser.parse_args()
    context = None
    if args.cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(args.cert, args.key)
    loop_factory = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run(args.host, args.port, context))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
