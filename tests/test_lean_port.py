"""
The lean plain TCP listener (txwssec._tcpport, issue 19, round 4): the
transport each accepted connection gets, what the factory and the protocol
are given, and every accept error are Twisted's own (differential: the same
connection accepted by Twisted's tcp.Port and by LeanPort).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

import pytest
import pytest_twisted
from inline_values import OBSERVABLE, dict_materialised
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher

from txwssec._tcpport import (
    LeanPort,
    LeanTCP4ServerEndpoint,
    LeanTCP6ServerEndpoint,
    server_transport,
)
from txwssec.listen import server_endpoint


class Recorded(Protocol):
    """Keeps what it was given: the address and the transport's state."""

    def connectionMade(self) -> None:
        self.factory.made.append(self)
        waiting, self.factory.waiting = self.factory.waiting, None
        if waiting is not None:
            waiting.callback(self)


class OwnPrefix(Recorded):
    def logPrefix(self) -> str:
        return "own-prefix"


class Recording(Factory):
    def __init__(self, protocol: type[Protocol] = Recorded) -> None:
        self.protocol = protocol
        self.addresses: list[Any] = []
        self.made: list[Recorded] = []
        self.waiting: Deferred[Recorded] | None = None

    def buildProtocol(self, addr: Any) -> Protocol | None:
        self.addresses.append(addr)
        return super().buildProtocol(addr)


def _state(transport: tcp.Server, made_by: tcp.Port) -> dict[str, Any]:
    """The transport's attributes, the socket and its bound methods by kind."""
    out: dict[str, Any] = {}
    for name, value in vars(transport).items():
        if name == "socket":
            value = (value.family, value.type, value.proto, value.gettimeout())
        elif name == "fileno":
            value = ("fileno", value.__self__ is transport.socket)
        elif name == "protocol":
            value = type(value)
        elif name == "server":
            value = ("the port", value is made_by)
        elif name == "reactor":
            value = type(value)
        elif name in ("client", "hostname", "sessionno", "logstr", "repstr"):
            value = "port-specific" if name == "repstr" else value
        out[name] = value
    return out


def _accepted_by(
    port_class: type[tcp.Port], interface: str, protocol: type[Protocol] = Recorded
) -> tuple[Recording, tcp.Port, socket.socket]:
    factory = Recording(protocol)
    port = port_class(0, factory, 50, interface, reactor)
    port.startListening()
    return factory, port, port.socket


async def _one_connection(
    port_class: type[tcp.Port], interface: str, protocol: type[Protocol] = Recorded
) -> tuple[Recording, Recorded, tcp.Port]:
    factory, port, _ = _accepted_by(port_class, interface, protocol)
    factory.waiting = Deferred()
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    client = socket.socket(family)
    client.setblocking(False)
    try:
        client.connect((interface, port.getHost().port))
    except BlockingIOError:
        pass
    made = await factory.waiting
    client.close()
    return factory, made, port


@pytest.mark.parametrize("protocol", [Recorded, OwnPrefix])
@pytest.mark.parametrize("interface", ["127.0.0.1", "::1"])
@pytest_twisted.ensureDeferred
async def test_transport_is_twisteds(interface: str, protocol: type[Protocol]) -> None:
    """The same tcp.Server, attributes, address, log prefix, reading state."""
    if ":" in interface and not socket.has_ipv6:
        pytest.skip("no IPv6")
    seen = []
    for port_class in (tcp.Port, LeanPort):
        factory, made, port = await _one_connection(port_class, interface, protocol)
        transport = made.transport
        assert type(transport) is tcp.Server
        seen.append(
            {
                "state": _state(transport, port),
                "order": list(vars(transport)),
                "address": type(factory.addresses[0]),
                "peer": transport.getPeer() == factory.addresses[0],
                "host": transport.getHost(),
                "prefix": transport.logPrefix().split(",")[0],
                "repr": repr(transport).split(" on ")[0],
                "reading": transport in reactor.getReaders(),
                "blocking": transport.socket.getblocking(),
                "numberAccepts": port.numberAccepts,
            }
        )
        assert repr(transport).endswith(f" on {port.getHost().port}>")
        assert transport.logPrefix() == f"{seen[-1]['prefix']},0,{transport.client[0]}"
        transport.loseConnection()
        await port.stopListening()
    # (the client's port differs: compare everything else)
    for entry in seen:
        entry["state"].pop("client")
        entry["host"] = (entry["host"].type, entry["host"].host)
    for key in seen[0]:
        assert seen[0][key] == seen[1][key], key
    assert seen[1]["prefix"] == ("own-prefix" if protocol is OwnPrefix else protocol.__name__)


@pytest.mark.skipif(not OBSERVABLE, reason="CPython 3.11/3.12 inline values only")
@pytest.mark.parametrize("port_class", [tcp.Port, LeanPort])
@pytest_twisted.ensureDeferred
async def test_transport_keeps_inline_values(port_class: type[tcp.Port]) -> None:
    """
    The accepted transport's attributes are set as attributes, not through
    its __dict__ (round 7: a transport filled through its dict keeps a dict,
    and every attribute lookup of its read and write paths is slower), as
    Twisted's constructor does.
    """
    _factory, made, port = await _one_connection(port_class, "127.0.0.1")
    transport = made.transport
    try:
        assert transport.protocol is made
        assert not dict_materialised(transport, "protocol")
        vars(transport)
        assert dict_materialised(transport, "protocol")  # (the probe sees it)
    finally:
        transport.loseConnection()
        await port.stopListening()


def test_server_transport_falls_back() -> None:
    """A protocol with its own prefix, or a declaration of its own: Twisted's constructor."""
    left, right = socket.socketpair()
    try:
        made = []
        original = tcp.Server.__init__

        def spy(self: Any, *args: Any) -> None:
            made.append(args)
            original(self, *args)

        tcp.Server.__init__ = spy  # type: ignore[method-assign]
        try:
            server_transport(left, OwnPrefix(), ("127.0.0.1", 1), None, 3, reactor)
        finally:
            tcp.Server.__init__ = original  # type: ignore[method-assign]
        assert len(made) == 1
    finally:
        reactor.removeAll()
        left.close()
        right.close()


class Flaky:
    """A listening socket whose next accepts fail with C{errors} first."""

    def __init__(self, sock: socket.socket, errors: list[int]) -> None:
        self._sock = sock
        self.errors = errors

    def _fail(self) -> None:
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))

    def _accept(self) -> Any:
        self._fail()
        return self._sock._accept()  # type: ignore[attr-defined]

    def accept(self) -> Any:
        self._fail()
        return self._sock.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.mark.parametrize(
    "errors",
    [
        [errno.ECONNABORTED],
        [errno.ENOBUFS],
        [errno.EPERM],
        [errno.EPERM, errno.ENOMEM],
        [errno.EMFILE],
        [errno.EBADF],
    ],
)
def test_accept_errors_are_twisteds(errors: list[int]) -> None:
    """Each error: the same log events, accepts, port state and connections."""
    results = []
    for port_class in (tcp.Port, LeanPort):
        factory, port, listener = _accepted_by(port_class, "127.0.0.1")
        clients = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(2)]
        port.socket = Flaky(listener, list(errors))  # type: ignore[assignment]
        events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any], events: list[dict[str, Any]] = events) -> None:
            events.append(
                {
                    key: value
                    for key, value in event.items()
                    if key in ("log_format", "log_namespace", "log_level", "acceptError")
                    or key in ("isError", "why", "message")
                }
                | {"failure": type(event["log_failure"].value) if "log_failure" in event else None}
            )

        globalLogPublisher.addObserver(observe)
        try:
            port.doRead()
        finally:
            globalLogPublisher.removeObserver(observe)
        results.append(
            {
                "events": events,
                "accepted": len(factory.made),
                "numberAccepts": port.numberAccepts,
                "errors left": port.socket.errors,  # type: ignore[attr-defined]
            }
        )
        for made in factory.made:
            made.transport.abortConnection()
        for client in clients:
            client.close()
        port.socket = listener
        port.stopListening()
    assert results[0] == results[1]
    assert results[0]["events"] or errors == [errno.EPERM]


def test_many_pending_scale_as_twisted() -> None:
    """Pending connections, several reads: the same accepts per read."""
    counts = []
    for port_class in (tcp.Port, LeanPort):
        factory, port, _ = _accepted_by(port_class, "127.0.0.1")
        port.numberAccepts = 2
        clients = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(5)]
        trace = []
        for _ in range(4):
            port.doRead()
            trace.append((len(factory.made), port.numberAccepts))
        counts.append(trace)
        for made in factory.made:
            made.transport.abortConnection()
        for client in clients:
            client.close()
        port.stopListening()
    assert counts[0] == counts[1]


def test_refused_protocol_closes_socket() -> None:
    """buildProtocol returns None: the socket is closed, the next one taken."""

    class Refusing(Recording):
        def buildProtocol(self, addr: Any) -> Protocol | None:
            self.addresses.append(addr)
            return None if len(self.addresses) == 1 else Factory.buildProtocol(self, addr)

    factory = Refusing()
    port = LeanPort(0, factory, 50, "127.0.0.1", reactor)
    port.startListening()
    first = socket.create_connection(("127.0.0.1", port.getHost().port))
    second = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        port.doRead()
        assert len(factory.addresses) == 2 and len(factory.made) == 1
        assert factory.made[0].transport.sessionno == 0
        first.settimeout(5)
        assert first.recv(1) == b""
    finally:
        for made in factory.made:
            made.transport.abortConnection()
        first.close()
        second.close()
        port.stopListening()


@pytest.mark.parametrize(
    ("description", "kind"),
    [
        ("tcp:0:interface=127.0.0.1", LeanTCP4ServerEndpoint),
        ("tcp6:0:interface=\\:\\:1", LeanTCP6ServerEndpoint),
    ],
)
@pytest_twisted.ensureDeferred
async def test_endpoints_listen_with_lean_port(description: str, kind: type) -> None:
    """tcp: and tcp6: listeners: Twisted's endpoint attributes, a LeanPort."""
    if description.startswith("tcp6") and not socket.has_ipv6:
        pytest.skip("no IPv6")
    endpoint = server_endpoint(reactor, description, None)
    assert type(endpoint) is kind
    assert (endpoint._port, endpoint._backlog) == (0, 1024)  # type: ignore[attr-defined]
    port = await endpoint.listen(Recording())
    try:
        assert type(port) is LeanPort
        assert port.backlog == 1024
    finally:
        await port.stopListening()
