"""
The TLS listener's accept loop (txwssec._tlsport.DirectTLSPort, issue 19,
round 7): it accepts as the plain TCP listener's LeanPort does and fills in
a DirectTLSServer's state at once; differential against the same port
taking Twisted's accept loop and DirectTLSServer's constructor.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import test_tls_wire
from test_lean_port import Flaky, OwnPrefix, Recorded, Recording, _state
from test_tls_wire import context
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher

from txwssec import _tlsport
from txwssec._tcpport import LeanPort
from txwssec._tlsport import DirectTLSPort, DirectTLSServer
from txwssec._tlswire import ServerTLSProtocol

folder = test_tls_wire.folder


@pytest.fixture
def direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every protocol gets the direct transport (not only txwssec's)."""
    monkeypatch.setattr(_tlsport, "DIRECT_PROTOCOLS", (object,))


def _port(
    folder: Path, lean: bool, protocol: type = Recorded, interface: str = "127.0.0.1"
) -> tuple[Recording, DirectTLSPort]:
    factory = Recording(protocol)
    port = DirectTLSPort(0, factory, 50, interface, reactor, context(folder))
    if not lean:
        port._leanFor = None  # Twisted's Port.doRead, then _transport
    port.startListening()
    return factory, port


def _seen(transport: Any, port: Any) -> dict[str, Any]:
    state = _state(transport, port)
    state.pop("client")
    if "_tlsConnection" in state:
        connection = state["_tlsConnection"]
        state["_tlsConnection"] = (
            type(connection),
            connection.get_app_data() is transport,
            connection.get_context() is not None,
        )
    return {
        "type": type(transport),
        "state": state,
        "order": list(vars(transport)),
        "prefix": transport.logPrefix().split(",")[0],
        "logstr": transport.logPrefix().split(",")[1:2],
        "repr": repr(transport).split(" on ")[0],
        "reading": transport in reactor.getReaders(),
        "blocking": transport.socket.getblocking(),
        "numberAccepts": port.numberAccepts,
    }


@pytest.mark.usefixtures("direct")
@pytest.mark.parametrize("protocol", [Recorded, OwnPrefix])
@pytest.mark.parametrize("interface", ["127.0.0.1", "::1"])
@pytest_twisted.ensureDeferred
async def test_transport_is_the_constructors(folder: Path, protocol: type, interface: str) -> None:
    """The same DirectTLSServer, attributes (in order), prefix, reading state."""
    if ":" in interface and not socket.has_ipv6:
        pytest.skip("no IPv6")
    seen = []
    for lean in (False, True):
        factory, port = _port(folder, lean, protocol, interface)
        factory.waiting = Deferred()
        client = socket.create_connection((interface, port.getHost().port))
        made = await factory.waiting
        transport = made.transport
        seen.append(_seen(transport, port))
        assert repr(transport).endswith(f" on {port.getHost().port}>")
        transport.abortConnection()
        client.close()
        await port.stopListening()
    assert seen[0] == seen[1]
    assert seen[1]["type"] is DirectTLSServer
    name = "own-prefix" if protocol is OwnPrefix else protocol.__name__
    assert seen[1]["prefix"] == f"{name} (ServerTLSProtocol)"
    assert seen[1]["repr"] == f"<{protocol.__name__} #0"


@pytest_twisted.ensureDeferred
async def test_other_protocols_keep_two_layers(folder: Path) -> None:
    """A protocol that is not txwssec's: Twisted's tcp.Server under ServerTLSProtocol."""
    seen = []
    for lean in (False, True):
        factory, port = _port(folder, lean)
        factory.waiting = Deferred()
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        made = await factory.waiting
        wrapper = made.transport
        assert type(wrapper) is ServerTLSProtocol
        seen.append(_seen(wrapper.transport, port))
        wrapper.transport.abortConnection()
        client.close()
        await port.stopListening()
    for entry in seen:
        entry["state"].pop("protocol")  # ServerTLSProtocol, compared above
    assert seen[0] == seen[1]
    assert seen[1]["type"] is tcp.Server


@pytest.mark.usefixtures("direct")
def test_accepts_with_the_lean_loop(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The lean loop runs (no Twisted accept loop, no DirectTLSServer
    constructor) for a protocol whose log prefix is its class name.
    """
    calls: list[str] = []
    monkeypatch.setattr(tcp.Port, "doRead", lambda self: calls.append("Port.doRead"))
    original = DirectTLSServer.__init__

    def spy(self: Any, *args: Any) -> None:
        calls.append("DirectTLSServer.__init__")
        original(self, *args)

    monkeypatch.setattr(DirectTLSServer, "__init__", spy)
    factory, port = _port(folder, True)
    assert isinstance(port, LeanPort)
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        port.doRead()
        assert len(factory.made) == 1 and calls == []
        assert type(factory.made[0].transport) is DirectTLSServer
        # a protocol with its own prefix: the constructor
        factory.protocol = OwnPrefix
        other = socket.create_connection(("127.0.0.1", port.getHost().port))
        try:
            port.doRead()
            assert len(factory.made) == 2 and calls == ["DirectTLSServer.__init__"]
        finally:
            other.close()
    finally:
        for made in factory.made:
            made.transport.abortConnection()
        client.close()
        port.stopListening()


@pytest.mark.usefixtures("direct")
@pytest.mark.parametrize(
    "errors", [[errno.ECONNABORTED], [errno.EPERM, errno.ENOMEM], [errno.EMFILE], [errno.EBADF]]
)
def test_accept_errors_are_twisteds(folder: Path, errors: list[int]) -> None:
    """Each error: the same log events, accepts, port state and transports."""
    results = []
    for lean in (False, True):
        factory, port = _port(folder, lean)
        listener = port.socket
        clients = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(2)]
        port.socket = Flaky(listener, list(errors))  # type: ignore[assignment]
        events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any], events: list[dict[str, Any]] = events) -> None:
            events.append(
                {
                    key: value
                    for key, value in event.items()
                    if key in ("log_format", "log_namespace", "log_level", "isError", "why")
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
                "accepted": [type(made.transport) for made in factory.made],
                "sessions": [made.transport.sessionno for made in factory.made],
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
    assert results[0]["events"] or errors == [errno.EPERM, errno.ENOMEM]


class InstancePrefix(Recording):
    """A factory that gives each protocol a log prefix of its own (an instance attribute)."""

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        protocol.logPrefix = lambda: "instance-prefix"  # type: ignore[union-attr,method-assign]
        return protocol


@pytest.mark.usefixtures("direct")
@pytest_twisted.ensureDeferred
async def test_a_protocols_own_prefix_set_on_the_instance(folder: Path) -> None:
    """
    A log prefix set on the protocol itself (not its class) is Twisted's
    transport's prefix, on the TLS listener and on the plain one alike.
    """
    prefixes = []
    for lean in (False, True):
        factory = InstancePrefix()
        port = DirectTLSPort(0, factory, 50, "127.0.0.1", reactor, context(folder))
        if not lean:
            port._leanFor = None
        port.startListening()
        factory.waiting = Deferred()
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        made = await factory.waiting
        prefixes.append(made.transport.logPrefix().split(",")[0])
        made.transport.abortConnection()
        client.close()
        await port.stopListening()
    assert prefixes == ["instance-prefix (ServerTLSProtocol)"] * 2
    plain = []
    for kind in (tcp.Port, LeanPort):
        factory = InstancePrefix()
        tcp_port = kind(0, factory, 50, "127.0.0.1", reactor)
        tcp_port.startListening()
        factory.waiting = Deferred()
        client = socket.create_connection(("127.0.0.1", tcp_port.getHost().port))
        made = await factory.waiting
        plain.append(made.transport.logPrefix().split(",")[0])
        made.transport.abortConnection()
        client.close()
        await tcp_port.stopListening()
    assert plain == ["instance-prefix"] * 2


class DirectlyProvided(Recording):
    """A factory whose protocols declare an interface of their own (zope's directlyProvides)."""

    def buildProtocol(self, addr: Any) -> Any:
        from twisted.internet.interfaces import IHalfCloseableProtocol
        from zope.interface import directlyProvides

        protocol = super().buildProtocol(addr)
        directlyProvides(protocol, IHalfCloseableProtocol)
        return protocol


@pytest.mark.usefixtures("direct")
@pytest_twisted.ensureDeferred
async def test_directly_provided_protocols_take_the_constructor(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A protocol with interfaces of its own (its prefix could come from
    them): DirectTLSServer's constructor, and the same transport as
    Twisted's accept loop makes.
    """
    calls = []
    original = DirectTLSServer.__init__

    def spy(self: Any, *args: Any) -> None:
        calls.append("DirectTLSServer.__init__")
        original(self, *args)

    monkeypatch.setattr(DirectTLSServer, "__init__", spy)
    seen = []
    for lean in (False, True):
        factory = DirectlyProvided()
        port = DirectTLSPort(0, factory, 50, "127.0.0.1", reactor, context(folder))
        if not lean:
            port._leanFor = None
        port.startListening()
        factory.waiting = Deferred()
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        made = await factory.waiting
        seen.append(_seen(made.transport, port))
        made.transport.abortConnection()
        client.close()
        await port.stopListening()
    assert calls == ["DirectTLSServer.__init__"] * 2
    assert seen[0] == seen[1]
    assert seen[1]["prefix"] == "Recorded (ServerTLSProtocol)"
