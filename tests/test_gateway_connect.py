"""
The upstream leg's lean TCP connection (txwssec.gateway.connect), side by
side with Twisted's own TCP endpoint on the same reactor: the same
outcomes (connected, refused, timed out, cancelled, bind errors, IPv6),
with fewer system calls.

Each test runs its own epoll, poll and select reactor (not the tests'
asyncio reactor, which the gateway's own tests use), driven by
C{iterate} until the attempt has its outcome.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.pollreactor import PollReactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from txwssec.gateway.connect import LeanClient, LeanConnector, LeanTCPEndpoint, lean_tcp_endpoint

REACTORS = {"epoll": EPollReactor, "poll": PollReactor, "select": SelectReactor}


@pytest.fixture(params=sorted(REACTORS))
def reactor(request: pytest.FixtureRequest) -> Iterator[Any]:
    made = REACTORS[request.param]()
    yield made
    for selectable in made.removeAll():
        selectable.connectionLost(Failure(error.ConnectionDone()))
    made.runUntilCurrent()
    made.waker.connectionLost(None)
    poller = getattr(made, "_poller", None)
    if poller is not None and hasattr(poller, "close"):
        poller.close()


def outcome(reactor: Any, attempt: Deferred[Any], seconds: float = 5) -> Any:
    """Iterate C{reactor} until C{attempt} fires: its result or L{Failure}."""
    results: list[Any] = []
    attempt.addBoth(results.append)
    end = time.monotonic() + seconds
    while not results and time.monotonic() < end:
        reactor.iterate(0.01)
    assert results, "no outcome"
    return results[0]


def iterate_until(reactor: Any, done: Any, seconds: float = 5) -> None:
    end = time.monotonic() + seconds
    while not done() and time.monotonic() < end:
        reactor.iterate(0.01)
    assert done()


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


class Greeter(Protocol):
    """The server side: says hello, echoes, closes on "bye"."""

    def connectionMade(self) -> None:
        self.transport.write(b"hello")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if data == b"bye":
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self.transport.write(data)  # type: ignore[union-attr]


def endpoints(reactor: Any, host: str, port: int, **options: Any) -> dict[str, Any]:
    twisted = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    return {
        "twisted": twisted(reactor, host, port, **options),
        "lean": LeanTCPEndpoint(reactor, host, port, **options),
    }


def closed_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def described(failure: Any) -> tuple[type, str]:
    assert isinstance(failure, Failure), failure
    return type(failure.value), str(failure.value)


def test_connects_and_relays_like_twisted(reactor: Any) -> None:
    port = reactor.listenTCP(0, Factory.forProtocol(Greeter), interface="127.0.0.1")
    seen = {}
    for name, endpoint in endpoints(reactor, "127.0.0.1", port.getHost().port).items():
        protocol = outcome(reactor, endpoint.connect(Factory.forProtocol(Recorder)))
        assert isinstance(protocol, Recorder)
        transport = protocol.transport
        assert isinstance(transport, LeanClient) is (name == "lean")
        protocol.transport.write(b"ping")  # type: ignore[union-attr]
        iterate_until(reactor, lambda p=protocol: p.received == b"helloping")
        addresses = (
            type(transport.getPeer()),
            transport.getPeer().host,
            transport.getPeer().port,
            transport.getHost().host,
            transport.connected,
        )
        protocol.transport.write(b"bye")  # type: ignore[union-attr]
        iterate_until(reactor, lambda p=protocol: p.lost is not None)
        assert protocol.lost is not None and protocol.lost.check(error.ConnectionDone)
        seen[name] = (addresses, transport.connected, transport.disconnected)
    assert seen["lean"] == seen["twisted"]
    port.stopListening()


def test_refused_like_twisted(reactor: Any) -> None:
    port = closed_port()
    seen = {
        name: described(outcome(reactor, endpoint.connect(Factory.forProtocol(Recorder))))
        for name, endpoint in endpoints(reactor, "127.0.0.1", port).items()
    }
    assert seen["lean"] == seen["twisted"]
    assert seen["lean"][0] is error.ConnectionRefusedError


def test_refused_through_a_failed_event_like_twisted() -> None:
    """
    epoll reports a refused connection as EPOLLERR/EPOLLHUP; Twisted asked
    for reads too and reads the socket's error in doRead, the lean client
    (writes only) in connectionLost: the same error.
    """
    reactor = EPollReactor()
    try:
        factory = _Failed()
        connector = LeanConnector("127.0.0.1", closed_port(), factory, 30, None, reactor)
        connector.connect()  # connect() at once: "in progress"
        transport = connector.transport
        assert isinstance(transport, LeanClient) and transport._connecting
        time.sleep(0.05)  # the RST has come
        iterate_until(reactor, lambda: bool(factory.failed))
        assert described(factory.failed[0]) == (
            error.ConnectionRefusedError,
            "Connection was refused by other side: 111: Connection refused.",
        )
    finally:
        reactor.waker.connectionLost(None)
        reactor._poller.close()


class _Failed(ClientFactory):
    """Notes why its connection failed."""

    def __init__(self) -> None:
        self.failed: list[Failure] = []

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.failed.append(reason)


@contextmanager
def full_listener() -> Iterator[int]:
    """The port of a listener whose queue is full: it drops new SYNs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.05)
        yield int(port)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_timeout_like_twisted(reactor: Any) -> None:
    """A listener whose queue is full drops the SYNs: the connector's timeout."""
    with full_listener() as port:
        seen = {
            name: described(outcome(reactor, endpoint.connect(Factory.forProtocol(Recorder))))
            for name, endpoint in endpoints(reactor, "127.0.0.1", port, timeout=0.3).items()
        }
    assert seen["lean"] == seen["twisted"]
    assert seen["lean"][0] is error.TimeoutError


def test_cancelled_like_twisted(reactor: Any) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        seen = {}
        for name, endpoint in endpoints(reactor, "127.0.0.1", listener.getsockname()[1]).items():
            attempt = endpoint.connect(Factory.forProtocol(Recorder))
            attempt.cancel()
            seen[name] = described(outcome(reactor, attempt))
    finally:
        listener.close()
    assert seen["lean"] == seen["twisted"]
    assert seen["lean"][0] is error.ConnectingCancelledError


def test_source_address_like_twisted(reactor: Any) -> None:
    port = reactor.listenTCP(0, Factory.forProtocol(Greeter), interface="127.0.0.1")
    try:
        number = port.getHost().port
        for name, endpoint in endpoints(
            reactor, "127.0.0.1", number, bindAddress=("127.0.0.2", 0)
        ).items():
            protocol = outcome(reactor, endpoint.connect(Factory.forProtocol(Recorder)))
            assert protocol.transport.getHost().host == "127.0.0.2", name
            protocol.transport.loseConnection()
        # A source port already taken: Twisted's ConnectBindError, the same.
        seen = {
            name: described(outcome(reactor, endpoint.connect(Factory.forProtocol(Recorder))))
            for name, endpoint in endpoints(
                reactor, "127.0.0.1", number, bindAddress=("127.0.0.1", number)
            ).items()
        }
        assert seen["lean"] == seen["twisted"]
        assert seen["lean"][0] is error.ConnectBindError
    finally:
        port.stopListening()


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")
def test_ipv6_like_twisted(reactor: Any) -> None:
    port = reactor.listenTCP(0, Factory.forProtocol(Greeter), interface="::1")
    try:
        seen = {}
        for name, endpoint in endpoints(reactor, "::1", port.getHost().port).items():
            protocol = outcome(reactor, endpoint.connect(Factory.forProtocol(Recorder)))
            iterate_until(reactor, lambda p=protocol: p.received == b"hello")
            peer = protocol.transport.getPeer()
            seen[name] = (type(peer), peer.host, peer.port, peer.flowInfo, peer.scopeID)
            protocol.transport.loseConnection()
        refused = {
            name: described(outcome(reactor, endpoint.connect(Factory.forProtocol(Recorder))))
            for name, endpoint in endpoints(reactor, "::1", closed_port("::1")).items()
        }
    finally:
        port.stopListening()
    assert seen["lean"] == seen["twisted"]
    assert refused["lean"] == refused["twisted"]


class CountingPoller:
    """The reactor's epoll object, counting its epoll_ctl calls."""

    def __init__(self, poller: Any, counts: Counter[str]) -> None:
        self._poller = poller
        self._counts = counts

    def register(self, fd: int, flags: int) -> None:
        self._counts["epoll_ctl"] += 1
        self._poller.register(fd, flags)

    def modify(self, fd: int, flags: int) -> None:
        self._counts["epoll_ctl"] += 1
        self._poller.modify(fd, flags)

    def unregister(self, fd: int) -> None:
        self._counts["epoll_ctl"] += 1
        self._poller.unregister(fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)


def test_fewer_system_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Connect, read the server's hello, the server closes: Twisted's client
    makes the socket non-blocking twice, connects twice, reads SO_ERROR
    twice, makes five epoll_ctl (and two more to end) and shuts the socket
    down before closing it; the lean one none, once, once, three (and
    one), no shutdown. (The server is a plain socket, outside the reactor.)
    """
    reactor = EPollReactor()
    counts: Counter[str] = Counter()
    for name in ("setblocking", "connect_ex", "getsockopt", "shutdown"):
        original = getattr(socket.socket, name)

        def counted(self: Any, *args: Any, _name: str = name, _original: Any = original) -> Any:
            counts[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(socket.socket, name, counted)
    reactor._poller = CountingPoller(reactor._poller, counts)  # type: ignore[assignment]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    seen = {}
    try:
        for name, endpoint in endpoints(reactor, "127.0.0.1", listener.getsockname()[1]).items():
            counts.clear()
            protocol = outcome(reactor, endpoint.connect(Factory.forProtocol(Recorder)))
            server, _ = listener.accept()
            server.sendall(b"hello")
            iterate_until(reactor, lambda p=protocol: p.received == b"hello")
            connecting = dict(counts)
            counts.clear()
            server.close()
            iterate_until(reactor, lambda p=protocol: p.lost is not None)
            seen[name] = (connecting, dict(counts))
    finally:
        listener.close()
        reactor.waker.connectionLost(None)
    assert seen["twisted"] == (
        {"setblocking": 2, "getsockopt": 2, "connect_ex": 2, "epoll_ctl": 5},
        {"epoll_ctl": 1, "shutdown": 1},
    )
    assert seen["lean"] == (
        {"getsockopt": 1, "connect_ex": 1, "epoll_ctl": 3},
        {"epoll_ctl": 1},
    )


def test_shutdown_kept_when_this_side_closes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes may still be unread: closed as Twisted closes (shutdown, close)."""
    reactor = EPollReactor()
    shutdowns: list[int] = []
    original = socket.socket.shutdown
    monkeypatch.setattr(
        socket.socket, "shutdown", lambda self, how: (shutdowns.append(how), original(self, how))
    )
    port = reactor.listenTCP(0, Factory.forProtocol(Greeter), interface="127.0.0.1")
    try:
        endpoint = LeanTCPEndpoint(reactor, "127.0.0.1", port.getHost().port)
        protocol = outcome(reactor, endpoint.connect(Factory.forProtocol(Recorder)))
        iterate_until(reactor, lambda: protocol.received == b"hello")
        protocol.transport.loseConnection()
        iterate_until(reactor, lambda: protocol.lost is not None)
        assert shutdowns[:1] == [socket.SHUT_RDWR]
    finally:
        port.stopListening()
        reactor.runUntilCurrent()
        reactor.waker.connectionLost(None)


def test_lean_only_for_ip_literals_on_twisteds_posix_reactors() -> None:
    epoll = EPollReactor()
    try:
        assert isinstance(lean_tcp_endpoint(epoll, "127.0.0.1", 80), LeanTCPEndpoint)
        assert isinstance(lean_tcp_endpoint(epoll, "::1", 80), LeanTCPEndpoint)
        assert lean_tcp_endpoint(epoll, "localhost", 80) is None
        assert lean_tcp_endpoint(Clock(), "127.0.0.1", 80) is None
    finally:
        epoll.waker.connectionLost(None)
        epoll._poller.close()


# -- the upstream leg's transport details, made when first read -----------------------


def test_upstream_leg_makes_its_transport_details_when_first_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    On plain TCP the upstream leg's peer is Autobahn's peer2str, and its
    transport details (os.getpid and a thread id: two system calls) are
    made only when read, equal to Autobahn's.
    """
    import os

    from autobahn.twisted.util import create_transport_details, peer2str

    from txwssec.client import SecureClientFactory
    from txwssec.gateway.upstream import UpstreamProtocol

    reactor = EPollReactor()
    pids: list[int] = []
    getpid = os.getpid
    monkeypatch.setattr(os, "getpid", lambda: pids.append(1) or getpid())
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        port = listener.getsockname()[1]
        factory = SecureClientFactory(f"ws://127.0.0.1:{port}/", reactor=reactor)
        factory.protocol = UpstreamProtocol
        endpoint = LeanTCPEndpoint(reactor, "127.0.0.1", port)
        protocol = outcome(reactor, endpoint.connect(factory))
        assert isinstance(protocol, UpstreamProtocol)
        server, _ = listener.accept()
        assert protocol.peer == peer2str(protocol.transport)
        assert pids == []
        details = protocol.transport_details
        assert details is protocol.transport_details  # made once
        assert pids == [1]
        expected = create_transport_details(protocol.transport, False)
        assert details.marshal() == expected.marshal()
        protocol.transport.abortConnection()
        server.close()
        reactor.runUntilCurrent()
    finally:
        listener.close()
        reactor.waker.connectionLost(None)


def _comparable(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in state.items():
        if name == "trafficStats":
            value = ("TrafficStats", vars(value))
        elif name == "send_queue":
            value = ("deque", list(value))
        elif name == "utf8validator":
            value = type(value)
        elif name in ("openHandshakeTimeoutCall", "_cork"):
            value = value is not None
        out[name] = value
    return out


@pytest.mark.parametrize("proxy", [False, True])
@pytest.mark.parametrize("timeout", [0, 7])
def test_upstream_leg_state_is_autobahns(proxy: bool, timeout: float) -> None:
    """
    The upstream leg's _connectionMade sets what Autobahn's client
    _connectionMade sets (then sends the upgrade request, or starts the
    proxy's CONNECT), without its debug line's pformat.
    """
    from autobahn.twisted.websocket import WebSocketClientProtocol
    from autobahn.websocket.protocol import WebSocketProtocol
    from twisted.internet.testing import StringTransport

    from txwssec._autobahn import copy_options_at_once
    from txwssec.client import SecureClientFactory
    from txwssec.gateway.upstream import UpstreamProtocol

    clock = Clock()
    factory = SecureClientFactory("ws://127.0.0.1:9/", reactor=clock)
    factory.setProtocolOptions(openHandshakeTimeout=timeout)
    factory.trackTimings = True
    if proxy:
        factory.proxy = {"host": "127.0.0.1", "port": 8}
    factory.protocol = UpstreamProtocol
    states = []
    for lean in (False, True):
        protocol = factory.buildProtocol(None)
        protocol.transport = StringTransport()
        protocol.startHandshake = lambda: None
        protocol.startProxyConnect = lambda: None
        before = set(vars(protocol))
        if lean:
            protocol._connectionMade()
        else:
            copy_options_at_once(protocol, WebSocketClientProtocol.CONFIG_ATTRS)
            WebSocketProtocol._connectionMade(protocol)
        states.append(_comparable({k: v for k, v in vars(protocol).items() if k not in before}))
    assert states[0] == states[1]
    assert states[1]["openHandshakeTimeoutCall"] is bool(timeout)
    expected = (
        WebSocketProtocol.STATE_PROXY_CONNECTING if proxy else WebSocketProtocol.STATE_CONNECTING
    )
    assert states[1]["state"] == expected


def test_upstream_leg_formats_no_debug_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Autobahn formats its 23 options (pformat) for a debug line: not here."""
    import autobahn.websocket.protocol
    from twisted.internet.testing import StringTransport

    from txwssec.client import SecureClientFactory
    from txwssec.gateway.upstream import UpstreamProtocol

    formatted: list[Any] = []
    monkeypatch.setattr(
        autobahn.websocket.protocol, "pformat", lambda value: formatted.append(value) or ""
    )
    factory = SecureClientFactory("ws://127.0.0.1:9/", reactor=Clock())
    factory.protocol = UpstreamProtocol
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    assert protocol.state == protocol.STATE_CONNECTING
    assert protocol.http_request_data.startswith(b"GET / HTTP/1.1\r\n")
    assert formatted == []


def test_upstream_leg_sends_its_upgrade_request_at_once() -> None:
    """
    The upgrade request leaves when the connection is made, not held for a
    reactor turn as the leg's other writes (nothing else can join it);
    counted as Autobahn's sendData counts it.
    """
    from twisted.internet.testing import StringTransport

    from txwssec.client import SecureClientFactory
    from txwssec.gateway.upstream import UpstreamProtocol

    clock = Clock()
    factory = SecureClientFactory("ws://127.0.0.1:9/path", reactor=clock)
    factory.protocol = UpstreamProtocol
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    sent = transport.value()
    assert sent == protocol.http_request_data
    assert sent.startswith(b"GET /path HTTP/1.1\r\n") and sent.endswith(b"\r\n\r\n")
    assert protocol.trafficStats.preopenOutgoingOctetsWireLevel == len(sent)
    assert clock.getDelayedCalls() == [] or all(
        call.getTime() > 0 for call in clock.getDelayedCalls()
    )


def test_connects_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The lean connector calls connect() when asked to connect; Twisted's
    client on the next reactor turn (a callLater(0)).
    """
    reactor = EPollReactor()
    calls: list[str] = []
    original = socket.socket.connect_ex
    monkeypatch.setattr(
        socket.socket,
        "connect_ex",
        lambda self, address: calls.append("connect") or original(self, address),
    )
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        seen = {}
        for name, endpoint in endpoints(reactor, "127.0.0.1", listener.getsockname()[1]).items():
            calls.clear()
            attempt = endpoint.connect(Factory.forProtocol(Recorder))
            seen[name] = len(calls)
            protocol = outcome(reactor, attempt)
            protocol.transport.abortConnection()
            reactor.runUntilCurrent()
    finally:
        listener.close()
        reactor.waker.connectionLost(None)
    assert seen == {"twisted": 0, "lean": 1}


def test_no_connector_timer_under_a_shorter_attempt_timer() -> None:
    """
    The upstream endpoint's connector has Twisted's 30 s timeout only when
    the route's upstream_timeout is not shorter: under a shorter one the
    attempt's own timer abandons the connection first, so the connector's
    could never fire (one timer less per handshake); a connection that
    does not complete still ends in a 504 after upstream_timeout.
    """
    from txwssec.client import SecureClientFactory
    from txwssec.gateway.upstream import (
        GatewayTimeout,
        UpstreamProtocol,
        open_upstream,
        upstream_endpoint,
    )

    reactor = EPollReactor()
    # (the listen queue full: SYNs dropped)
    with full_listener() as port:
        try:
            url = f"ws://127.0.0.1:{port}/"
            factory = SecureClientFactory(url, reactor=reactor)
            factory.protocol = UpstreamProtocol
            timeouts = {
                given: upstream_endpoint(factory, given)._timeout  # type: ignore[attr-defined]
                for given in (None, 0.3, 29.9, 30, 60)
            }
            assert timeouts == {None: 30, 0.3: None, 29.9: None, 30: 30, 60: 30}
            endpoint = upstream_endpoint(factory, 0.3)
            attempt = open_upstream(factory, lambda: endpoint, 0.3, reactor)
            assert len(reactor.getDelayedCalls()) == 1  # the attempt's own timer
            failure = outcome(reactor, attempt)
            assert described(failure) == (GatewayTimeout, f"{url}: no handshake within 0.3 s")
            reactor.runUntilCurrent()
            assert reactor.getDelayedCalls() == []
        finally:
            reactor.waker.connectionLost(None)


def test_held_writes_go_straight_to_the_lean_clients_socket(reactor: Any) -> None:
    """
    The gateway's held writes (write_at_once) reach a LeanClient's socket
    in the call, as on Twisted's own TCP transports: its class is
    registered as writing as plain TCP.
    """
    from txwssec._wire import write_at_once

    port = reactor.listenTCP(0, Factory.forProtocol(Greeter), interface="127.0.0.1")
    endpoint = LeanTCPEndpoint(reactor, "127.0.0.1", port.getHost().port)
    protocol = outcome(reactor, endpoint.connect(Factory.forProtocol(Recorder)))
    transport = protocol.transport
    assert type(transport) is LeanClient
    sequences: list[list[bytes]] = []
    transport.writeSequence = sequences.append
    write_at_once(transport, [b"pi", b"ng"])
    assert sequences == []
    iterate_until(reactor, lambda: protocol.received == b"helloping")
    del transport.writeSequence
    transport.write(b"bye")
    iterate_until(reactor, lambda: protocol.lost is not None)
    port.stopListening()
