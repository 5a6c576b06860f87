#!/usr/bin/env python3
"""
`websockets` echo server (asyncio, the standard event loop), a peer in
bench/bench.py.

websockets' defaults (1 MiB max_size, pings every 20 s, permessage-deflate
offered only if the client asks, which the load generator does not).

    python bench/servers/websockets_echo.py --port 9002
"""

from __future__ import annotations

import argparse
import asyncio

from websockets.asyncio.server import ServerConnection, serve


async def echo(websocket: ServerConnection) -> None:
    """Send every message back, text as text and binary as binary."""
    async for message in websocket:
        await websocket.send(message)


async def run(host: str, port: int) -> None:
    async with serve(echo, host, port, backlog=1024) as server:
        print(f"websockets echo listening on ws://{host}:{port}", flush=True)
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    try:
        asyncio.run(run(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
