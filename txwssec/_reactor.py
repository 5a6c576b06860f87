"""
The global reactor, imported only when a caller did not pass one.
"""

from __future__ import annotations

from typing import Any


def default_reactor() -> Any:
    """The global reactor (imported lazily, so importing txwssec never installs one)."""
    from twisted.internet import reactor

    return reactor
