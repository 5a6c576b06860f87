"""
Built-in applications, usable as C{app = "NAME"} in a route.
"""

from __future__ import annotations

from txwssec.apps.echo import EchoProtocol

#: Built-in application names and their protocol classes.
BUILTIN_APPS = {"echo": EchoProtocol}

__all__ = ["BUILTIN_APPS", "EchoProtocol"]
