"""
An application for the browser tests' server (C{app = "browser_apps:Faulty"}):
an echo whose C{onMessage} raises on the text message C{raise}, as a buggy
application would. The browser must see close 1011, cleanly.
"""

from __future__ import annotations

from txwssec import SecureServerProtocol


class Faulty(SecureServerProtocol):
    """Echoes messages, and fails on C{raise}."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if payload == b"raise":
            raise RuntimeError("a bug in the application")
        self.sendMessage(payload, isBinary)
