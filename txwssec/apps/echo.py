"""
The built-in echo application.
"""

from __future__ import annotations

from txwssec.server import SecureServerProtocol


class EchoProtocol(SecureServerProtocol):
    """Sends every message back, text as text and binary as binary."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)
