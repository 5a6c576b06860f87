"""
Listen descriptions: Twisted server endpoint strings, plus C{tls:PORT}
which is served with the configuration's C{[tls]} table.

Listeners get a backlog of L{DEFAULT_BACKLOG} pending connections unless
their description sets C{backlog=} itself: Twisted's default of 50 leaves
the rest of a burst of connections waiting in the kernel for retransmitted
SYNs, seconds each.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint

from txwssec.tls import ReloadingContextFactory

#: Endpoint kinds that carry plain text over a network.
PLAINTEXT_KINDS = ("tcp", "tcp6")
#: Keyword arguments a C{tls:} description may carry (the rest is in [tls]).
TLS_KEYWORDS = ("interface", "backlog")
#: The listen backlog when a description does not set C{backlog=} (Linux
#: caps it at C{net.core.somaxconn}, 4096 by default).
DEFAULT_BACKLOG = 1024
#: Endpoint kinds that take C{backlog=}: they get L{DEFAULT_BACKLOG}.
BACKLOG_KINDS = ("tcp", "tcp6", "ssl", "unix", "wss", "tls")


@dataclass(frozen=True)
class Description:
    """
    A parsed endpoint description, C{kind:arg:name=value...}, with Twisted's
    backslash escapes undone.
    """

    text: str
    kind: str
    args: tuple[str, ...] = ()
    kwargs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Description:
        """Split C{text} on unescaped colons."""
        parts: list[str] = []
        current: list[str] = []
        chars = iter(text)
        for char in chars:
            if char == "\\":
                current.append(next(chars, ""))
            elif char == ":":
                parts.append("".join(current))
                current = []
            else:
                current.append(char)
        parts.append("".join(current))
        kind, *rest = parts
        args = tuple(p for p in rest if "=" not in p)
        kwargs = dict(p.split("=", 1) for p in rest if "=" in p)
        return cls(text, kind.lower(), args, kwargs)

    def is_plaintext_off_loopback(self) -> bool:
        """
        Whether this is a plain TCP listener reachable from other hosts (no
        interface, or one that is not a loopback address).
        """
        if self.kind not in PLAINTEXT_KINDS:
            return False
        interface = self.kwargs.get("interface", "")
        if interface == "localhost":
            return False
        try:
            return not ipaddress.ip_address(interface).is_loopback
        except ValueError:
            return True


def server_endpoint(
    reactor: Any, description: str, tls: ReloadingContextFactory | None
) -> IStreamServerEndpoint:
    """
    The endpoint for C{description}: C{tls:PORT[:interface=..][:backlog=..]}
    with the C{[tls]} context, anything else through Twisted's
    C{serverFromString} (C{tcp:}, C{unix:}, C{wss:}, C{ssl:}...). The
    kinds of L{BACKLOG_KINDS} get C{backlog=}L{DEFAULT_BACKLOG} unless the
    description sets it.
    """
    parsed = Description.parse(description)
    if parsed.kind in BACKLOG_KINDS and "backlog" not in parsed.kwargs:
        description += f":backlog={DEFAULT_BACKLOG}"
        parsed = Description.parse(description)
    if parsed.kind != "tls":
        endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
        return endpoint
    if tls is None:
        raise ValueError("tls listeners need a [tls] table")
    if len(parsed.args) != 1:
        raise ValueError("expected tls:PORT[:interface=ADDR][:backlog=N]")
    unknown = set(parsed.kwargs) - set(TLS_KEYWORDS)
    if unknown:
        raise ValueError(
            f"tls listeners take only interface and backlog, not {sorted(unknown)[0]}"
        )
    return SSL4ServerEndpoint(
        reactor,
        int(parsed.args[0]),
        tls,
        backlog=int(parsed.kwargs["backlog"]),
        interface=parsed.kwargs.get("interface", ""),
    )
