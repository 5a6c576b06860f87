"""
The application that C{bench/stress.py} runs under C{twistd wssec}: an echo
that can also be asked to send a lot, to play the slow-reader attack.

Configure it as a route's app::

    [[route]]
    path = "/echo"
    app = "bench.stress_app:FloodProtocol"
"""

from __future__ import annotations

import random

from txwssec.server import SecureServerProtocol

#: The text message that starts a flood.
FLOOD_COMMAND = b"flood"
#: Binary messages sent per flood.
FLOOD_COUNT = 200
#: Size of each of them (incompressible, in case the peer negotiated
#: permessage-deflate).
FLOOD_SIZE = 64 * 1024
#: Seconds between two of them: the application paces itself but ignores
#: back-pressure, so a peer that reads keeps up and one that does not read
#: makes unsent data pile up on the server (until C{max_buffered_bytes}).
FLOOD_INTERVAL = 0.002

_CHUNK = random.Random(0x5EED).randbytes(FLOOD_SIZE)


class FloodProtocol(SecureServerProtocol):
    """
    Echoes every message, except the text message C{flood}, which makes it
    send L{FLOOD_COUNT} binary messages of L{FLOOD_SIZE} bytes, one every
    L{FLOOD_INTERVAL} seconds, for as long as the connection is open.
    """

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary and payload == FLOOD_COMMAND:
            self._flood(FLOOD_COUNT)
        else:
            self.sendMessage(payload, isBinary)

    def _flood(self, remaining: int) -> None:
        if remaining <= 0 or self.state != self.STATE_OPEN:
            return
        self.sendMessage(_CHUNK, isBinary=True)
        self.factory.clock.callLater(FLOOD_INTERVAL, self._flood, remaining - 1)
