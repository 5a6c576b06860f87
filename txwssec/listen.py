"""
Listen descriptions: Twisted server endpoint strings, plus C{tls:PORT}
which is served with the configuration's C{[tls]} table, and sockets passed
by systemd's socket activation, C{systemd:domain=INET:index=0} (ws://) or
C{tls:systemd:domain=INET:index=0} (wss://, with C{[tls]}).

Listeners get a backlog of L{DEFAULT_BACKLOG} pending connections unless
their description sets C{backlog=} itself: Twisted's default of 50 leaves
the rest of a burst of connections waiting in the kernel for retransmitted
SYNs, seconds each.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from zope.interface import implementer

from txwssec import _tlsport
from txwssec._tcpport import lean_endpoint
from txwssec._tlsport import DirectTLSPort, TLSPortEndpoint
from txwssec._tlswire import ServerTLSFactory
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

#: The options of a C{wss:} description that name files
#: (L{txwssec.tls.WSSServerEndpointParser}).
WSS_FILE_OPTIONS = ("cert", "key", "chain", "clientCA")
#: The first descriptor systemd passes (C{SD_LISTEN_FDS_START}).
LISTEN_FDS_START = 3
#: The address families a C{systemd:} description may name as C{domain=}.
SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")


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
        kind, *rest = (_BACKSLASH_ESCAPE.sub(r"\1", part) for part in _raw_parts(text))
        args = tuple(p for p in rest if "=" not in p)
        kwargs = dict(p.split("=", 1) for p in rest if "=" in p)
        return cls(text, kind.lower(), args, kwargs)

    def is_plaintext_off_loopback(self) -> bool:
        """
        Whether this is a plain TCP listener reachable from other hosts (no
        interface, or one that is not a loopback address).
        """
        if self.kind == "systemd":
            # The socket unit chooses the address, which the configuration
            # cannot see: count it as reachable (tls:systemd:... is TLS).
            return self.kwargs.get("domain") != "UNIX"
        if self.kind not in PLAINTEXT_KINDS:
            return False
        interface = self.kwargs.get("interface", "")
        if interface == "localhost":
            return False
        try:
            return not ipaddress.ip_address(interface).is_loopback
        except ValueError:
            return True


def resolve_files(text: str, base_dir: Path) -> str:
    """
    C{text} with each relative file name of a C{wss:} description
    (L{WSS_FILE_OPTIONS}) made relative to C{base_dir} (the configuration
    file's folder), as the configuration's other file names are; any other
    description, and absolute names, as they are. Twisted's own C{ssl:}
    keeps its names relative to the working directory.
    """
    parts = _raw_parts(text)
    if parts[0].lower() != "wss":
        return text
    resolved = [parts[0]]
    for raw in parts[1:]:
        name, equals, value = _BACKSLASH_ESCAPE.sub(r"\1", raw).partition("=")
        if equals and name in WSS_FILE_OPTIONS and value and not Path(value).is_absolute():
            escaped = str(base_dir / value).replace("\\", "\\\\").replace(":", "\\:")
            raw = f"{name}={escaped}"
        resolved.append(raw)
    return ":".join(resolved)


#: A backslash escape of Twisted's endpoint syntax (the character it keeps).
_BACKSLASH_ESCAPE = re.compile(r"\\(.?)", re.DOTALL)


def _raw_parts(text: str) -> list[str]:
    """C{text} split on its unescaped colons, each part with its escapes."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


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
    if parsed.kind == "systemd" or (parsed.kind == "tls" and parsed.args[:1] == ("systemd",)):
        return systemd_endpoint(reactor, parsed, tls)
    if parsed.kind in BACKLOG_KINDS and "backlog" not in parsed.kwargs:
        description += f":backlog={DEFAULT_BACKLOG}"
        parsed = Description.parse(description)
    if parsed.kind != "tls":
        endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
        return lean_endpoint(endpoint)
    if tls is None:
        raise ValueError("tls listeners need a [tls] table")
    if len(parsed.args) != 1:
        raise ValueError("expected tls:PORT[:interface=ADDR][:backlog=N]")
    unknown = set(parsed.kwargs) - set(TLS_KEYWORDS)
    if unknown:
        raise ValueError(
            f"tls listeners take only interface and backlog, not {sorted(unknown)[0]}"
        )
    return TLSPortEndpoint(
        reactor,
        int(parsed.args[0]),
        tls,
        backlog=int(parsed.kwargs["backlog"]),
        interface=parsed.kwargs.get("interface", ""),
    )


def listener_context(endpoint: IStreamServerEndpoint) -> ReloadingContextFactory | None:
    """
    The TLS context C{endpoint} serves with, when it is txwssec's (a
    C{tls:} or C{wss:} listener, alone or shared by workers), else L{None}
    (plain TCP, UNIX sockets, Twisted's C{ssl:}).
    """
    for name in ("_sslContextFactory", "context", "_context"):
        context = getattr(endpoint, name, None)
        if isinstance(context, ReloadingContextFactory):
            return context
    return None


# -- systemd socket activation ---------------------------------------------------


class SocketActivationError(Exception):
    """The socket a C{systemd:} description names was not passed."""


@dataclass(frozen=True)
class InheritedSockets:
    """
    The listening sockets systemd passed: descriptors from
    L{LISTEN_FDS_START} on, and their names (C{FileDescriptorName=}) when
    C{LISTEN_FDNAMES} gives one per descriptor.
    """

    descriptors: tuple[int, ...] = ()
    names: tuple[str, ...] = ()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], pid: int) -> InheritedSockets:
        """
        Read C{LISTEN_PID}, C{LISTEN_FDS} and C{LISTEN_FDNAMES} as
        sd_listen_fds(3) does: nothing unless C{LISTEN_PID} is C{pid};
        names are optional (C{systemd-socket-activate} sets none without
        C{--fdname}).
        """
        if environ.get("LISTEN_PID") != str(pid):
            return cls()
        try:
            count = int(environ.get("LISTEN_FDS", ""))
        except ValueError:
            return cls()
        descriptors = tuple(range(LISTEN_FDS_START, LISTEN_FDS_START + max(count, 0)))
        names = tuple(environ.get("LISTEN_FDNAMES", "").split(":"))
        return cls(descriptors, names if len(names) == len(descriptors) else ())


def _initial_environment() -> Mapping[str, str]:
    """
    The environment this process was started with. Importing
    L{twisted.internet.endpoints} (which twistd does before any txwssec
    code runs) removes C{LISTEN_PID} and C{LISTEN_FDS} from L{os.environ},
    and Twisted's own C{systemd:} endpoint then knows the sockets only if
    C{LISTEN_FDNAMES} was set too. Linux keeps the original environment
    in C{/proc/self/environ}.
    """
    if "LISTEN_FDS" in os.environ:  # set in-process, or before Twisted's import
        return os.environ
    try:
        with open("/proc/self/environ", "rb") as environ:
            raw = environ.read()
    except OSError:
        return os.environ
    pairs = (entry.split(b"=", 1) for entry in raw.split(b"\0") if b"=" in entry)
    return {os.fsdecode(key): os.fsdecode(value) for key, value in pairs}


@functools.cache
def inherited_sockets() -> InheritedSockets:
    """
    The sockets systemd passed to this process, read once (when the
    configuration is loaded, so before twistd daemonizes).
    """
    return InheritedSockets.from_environment(_initial_environment(), os.getpid())


@implementer(IStreamServerEndpoint)
class SystemdServerEndpoint:
    """
    Listens on a socket passed by systemd. A missing socket fails in
    C{listen}, not when the description is parsed, so that C{check-config}
    works outside socket activation.
    """

    def __init__(self, reactor: Any, family: int, index: int | None, name: str | None) -> None:
        self._reactor = reactor
        self._family = family
        self._index = index
        self._name = name
        self._fileno = self._find(inherited_sockets())

    def _find(self, sockets: InheritedSockets) -> int | None:
        if self._name is not None:
            return dict(zip(sockets.names, sockets.descriptors, strict=True)).get(self._name)
        assert self._index is not None
        if self._index < len(sockets.descriptors):
            return sockets.descriptors[self._index]
        return None

    def _missing(self) -> str:
        sockets = inherited_sockets()
        if not sockets.descriptors:
            return "no socket passed by systemd (no LISTEN_FDS and LISTEN_PID for this process)"
        if self._name is not None:
            known = ", ".join(sockets.names) or "none: LISTEN_FDNAMES not set"
            return f"no socket named {self._name!r} passed by systemd (names: {known})"
        return f"no socket {self._index} passed by systemd (LISTEN_FDS={len(sockets.descriptors)})"

    def listen(self, factory: Any, tls: Any = None) -> Deferred[IListeningPort]:
        """
        Adopt the socket (the descriptor is duplicated, then closed); with
        the context C{tls}, a TCP socket as L{DirectTLSPort} (L{TLSServerEndpoint}).
        """
        if self._fileno is None:
            return fail(SocketActivationError(self._missing()))
        reactor = self._reactor if tls is None else _DirectTLSAdopter(self._reactor, tls)
        adopted = AdoptedStreamServerEndpoint(reactor, self._fileno, self._family)
        return adopted.listen(factory)  # type: ignore[no-any-return]

    def direct(self) -> bool:
        """Whether TLS on this socket can be L{DirectTLSPort} (a TCP socket)."""
        return self._family in (socket.AF_INET, socket.AF_INET6) and _tlsport.direct()


class _DirectTLSAdopter:
    """
    The reactor as Twisted's C{AdoptedStreamServerEndpoint} calls it, whose
    C{adoptStreamPort} makes a L{DirectTLSPort} with C{context}.
    """

    def __init__(self, reactor: Any, context: ReloadingContextFactory) -> None:
        self._reactor = reactor
        self._context = context

    def adoptStreamPort(self, fileno: int, family: int, factory: Any) -> IListeningPort:
        return DirectTLSPort.adopt(self._reactor, fileno, family, factory, self._context)


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """
    TLS over another server endpoint, as C{reactor.listenSSL} does over
    TCP: each connection is wrapped in Twisted's memory-BIO TLS protocol
    (txwssec's leaner subclass, L{txwssec._tlswire.ServerTLSProtocol}); on
    systemd's TCP sockets L{DirectTLSPort}, as C{tls:PORT} listeners.
    """

    def __init__(self, wrapped: IStreamServerEndpoint, context: ReloadingContextFactory) -> None:
        self._wrapped = wrapped
        self._context = context

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        """Listen with C{factory} behind TLS."""
        wrapped = self._wrapped
        if isinstance(wrapped, SystemdServerEndpoint) and wrapped.direct():
            return wrapped.listen(factory, self._context)
        listening = wrapped.listen(ServerTLSFactory(self._context, False, factory))

        def named(port: IListeningPort) -> IListeningPort:
            port._type = "TLS"  # type: ignore[attr-defined]  # "(TLS Port N Closed)"
            return port

        return listening.addCallback(named)


def systemd_endpoint(
    reactor: Any, parsed: Description, tls: ReloadingContextFactory | None
) -> IStreamServerEndpoint:
    """
    The endpoint for C{systemd:domain=D:index=N} or C{systemd:domain=D:name=NAME}
    (Twisted's syntax), or the same after C{tls:} for TLS with C{[tls]}.
    The socket unit sets the address and the backlog (C{Backlog=}).
    """
    wrap = parsed.kind == "tls"
    args = parsed.args[1:] if wrap else parsed.args
    usage = (
        f"expected {'tls:' if wrap else ''}systemd:domain=INET|INET6|UNIX:index=N (or :name=NAME)"
    )
    keywords = {"domain", "index", "name"}
    if args or not set(parsed.kwargs) <= keywords:
        extra = sorted(set(parsed.kwargs) - keywords)
        if "backlog" in extra:
            raise ValueError("set the backlog in the socket unit (Backlog=), not here")
        raise ValueError(usage)
    domain = parsed.kwargs.get("domain", "")
    if domain not in SYSTEMD_DOMAINS:
        raise ValueError(f"domain must be INET, INET6 or UNIX: {usage}")
    if ("index" in parsed.kwargs) == ("name" in parsed.kwargs):
        raise ValueError(f"give exactly one of index= and name=: {usage}")
    index = None
    if "index" in parsed.kwargs:
        if not parsed.kwargs["index"].isdigit():
            raise ValueError(f"index must be a number from 0: {usage}")
        index = int(parsed.kwargs["index"])
    if wrap and tls is None:
        raise ValueError("tls listeners need a [tls] table")
    family = getattr(socket, f"AF_{domain}")
    endpoint: IStreamServerEndpoint = SystemdServerEndpoint(
        reactor, family, index, parsed.kwargs.get("name")
    )
    if wrap:
        assert tls is not None
        endpoint = TLSServerEndpoint(endpoint, tls)
    return endpoint
