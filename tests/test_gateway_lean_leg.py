"""
The gateway's upstream leg with fewer layers (issue 19, round 6,
bench/RESULTS.md "Round 6: gateway handshake"): each shortcut against the
path it replaces (Twisted's endpoint wrapper, Autobahn's frame and close
code), for normal and unhappy upstream answers.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from test_gateway_turns import accept_for
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from txwssec.client import SecureClientFactory
from txwssec.gateway.connect import LeanTCPEndpoint
from txwssec.gateway.upstream import UpstreamProtocol

# -- the connection: no endpoint wrapper ----------------------------------------------


def _outcome(reactor: Any, deferred: Deferred[Any], seconds: float = 5) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    end = time.monotonic() + seconds
    while not results and time.monotonic() < end:
        reactor.iterate(0.01)
    assert results
    return results[0]


class _Made(Protocol):
    made: list[Any]

    def connectionMade(self) -> None:
        self.made.append(self.transport)


class _Raises(Protocol):
    def connectionMade(self) -> None:
        raise RuntimeError("connectionMade failed")


class _Nothing(ClientFactory):
    def buildProtocol(self, addr: Any) -> None:
        return None


class _Broken(ClientFactory):
    def buildProtocol(self, addr: Any) -> Protocol:
        raise ValueError("no protocol today")


@pytest.fixture
def epoll() -> Any:
    reactor = EPollReactor()
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    yield reactor, port.getHost().port
    port.stopListening()
    for selectable in reactor.removeAll():
        selectable.connectionLost(Failure(error.ConnectionDone()))
    reactor.waker.connectionLost(None)


def test_the_transport_carries_the_protocol_itself(epoll: Any) -> None:
    """
    The lean endpoint's Deferred fires with the protocol, connected (made)
    first, as Twisted's wrapper fires it; the transport's protocol is that
    protocol, not a wrapper.
    """
    reactor, port = epoll
    made: list[Any] = []
    _Made.made = made
    protocol = _outcome(
        reactor, LeanTCPEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(_Made))
    )
    assert isinstance(protocol, _Made)
    assert made == [protocol.transport]
    assert protocol.transport.protocol is protocol
    protocol.transport.abortConnection()


@pytest.mark.parametrize(
    "factory",
    [Factory.forProtocol(_Raises), _Nothing(), _Broken()],
    ids=["connectionMade-raises", "no-protocol", "buildProtocol-raises"],
)
def test_failures_while_connecting_like_twisted(epoll: Any, factory: Any) -> None:
    """
    A protocol whose connectionMade raises, a factory that builds none, one
    that raises: the same outcome as through Twisted's endpoint (its
    Deferred then never fires, or fails with the same error).
    """
    reactor, port = epoll
    seen = []
    for endpoint in (
        TCP4ClientEndpoint(reactor, "127.0.0.1", port),
        LeanTCPEndpoint(reactor, "127.0.0.1", port),
    ):
        deferred = endpoint.connect(factory)
        results: list[Any] = []
        deferred.addBoth(results.append)
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            reactor.iterate(0.01)
        if results and isinstance(results[0], Failure):
            seen.append((type(results[0].value), str(results[0].value)))
        else:
            seen.append(len(results))
            if results:
                results[0].transport.abortConnection()
    assert seen[0] == seen[1]


# -- the upstream's close reply, taken at once ------------------------------------------


class ThroughAutobahn(UpstreamProtocol):
    """The upstream leg, but its close frames go through Autobahn's code."""

    def onCloseFrame(self, code: Any, reasonRaw: Any) -> bool:
        return super().onCloseFrame(code, reasonRaw)


class Downstream:
    """What the upstream leg calls of the client leg, noted."""

    state = 3  # closing: nothing more relayed to it
    STATE_CONNECTING = 0
    STATE_OPEN = 1
    transport = None

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.calls.append((name, *args))


def _open_leg(kind: type[UpstreamProtocol], clock: Clock) -> tuple[Any, StringTransport]:
    factory = SecureClientFactory("ws://127.0.0.1:9/", reactor=clock)
    factory.protocol = kind
    protocol: Any = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    accept = accept_for(protocol.websocket_key).decode()
    protocol.dataReceived(
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        ).encode()
    )
    assert protocol.state == protocol.STATE_OPEN
    protocol.startRelay()
    transport.clear()
    return protocol, transport


_SKIPPED = {"websocket_key", "http_request_data", "http_response_data", "http_headers"}


_PLAIN = (type(None), bool, int, float, str, bytes)


def _comparable(protocol: Any, value: Any, name: str = "") -> Any:
    if name.endswith("Call"):  # a timer (or a deadline's handle)
        return value is not None and (not hasattr(value, "active") or value.active())
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list | tuple):
        return [_comparable(protocol, item) for item in value]
    if isinstance(value, dict):
        return {key: _comparable(protocol, item) for key, item in value.items()}
    if isinstance(value, Deferred):
        fired = getattr(value, "result", None)
        return ("Deferred", value.called, "protocol" if fired is protocol else repr(fired))
    if type(value).__name__ == "TrafficStats":
        return ("TrafficStats", vars(value))
    if type(value).__name__ == "deque":
        return ("deque", list(value))
    if type(value).__name__ == "FrameHeader":
        return ("FrameHeader", _comparable(protocol, vars(value)))
    if hasattr(value, "active") and hasattr(value, "cancel"):  # a timer
        return ("timer", value.active())
    return type(value).__name__


def _state(protocol: Any) -> dict[str, Any]:
    """The protocol's attributes, each as comparable between two protocols."""
    return {
        name: _comparable(protocol, value, name)
        for name, value in vars(protocol).items()
        if name not in _SKIPPED and name not in ("transport", "factory")
    }


def _after(kind: type[UpstreamProtocol], reads: list[bytes]) -> tuple[Any, ...]:
    """
    An open upstream leg sends its close (1000, as when the client closes),
    then reads C{reads}; then the upstream drops the connection.
    """
    clock = Clock()
    protocol, transport = _open_leg(kind, clock)
    downstream = Downstream()
    protocol.attach(downstream)
    protocol.sendCloseFrame(1000, b"bye")
    sent = transport.value()
    transport.clear()
    for data in reads:
        protocol.dataReceived(data)
    drop = protocol.serverConnectionDropTimeoutCall
    delay = None
    if drop is not None:
        delay = round(drop.getTime() - drop.seconds(), 1)
    state = _state(protocol)
    answered = transport.value()
    lost_early = transport.disconnecting
    results: list[Any] = []
    protocol.closed.addBoth(results.append)
    protocol.connectionLost(Failure(error.ConnectionDone()))
    if drop is not None and drop.active():
        drop.cancel()
    return (
        len(sent),
        sent[:2],
        state,
        answered,
        lost_early,
        delay,
        results,
        downstream.calls,
        protocol.state,
    )


def _close(code: int | None = None, reason: bytes = b"") -> bytes:
    payload = b"" if code is None else code.to_bytes(2, "big") + reason
    return bytes([0x88, len(payload)]) + payload


REPLIES = {
    "no-code": [_close()],
    "1000": [_close(1000)],
    "1000-reason": [_close(1000, b"bye")],
    "1001": [_close(1001)],
    "1011": [_close(1011)],
    "1013": [_close(1013)],
    "3000": [_close(3000)],
    "4999-reason": [_close(4999, "κόσμε".encode())],
    "longest-reason": [_close(1000, b"r" * 123)],
    # codes Autobahn refuses: its protocol violation, as before
    "999": [_close(999)],
    "1004": [_close(1004)],
    "1005": [_close(1005)],
    "1006": [_close(1006)],
    "1014": [_close(1014)],
    "1015": [_close(1015)],
    "2999": [_close(2999)],
    "5000": [_close(5000)],
    "65535": [_close(65535)],
    # reasons that are not UTF-8: Autobahn's invalid payload, as before
    "bad-utf8": [_close(1000, b"\xff")],
    "cut-utf8": [_close(1000, b"\xe2\x82")],
    "surrogate": [_close(1000, b"\xed\xa0\x80")],
    "overlong": [_close(1000, b"\xc0\xaf")],
    # in pieces, and with more behind it
    "split": [b"\x88", b"\x02\x03", b"\xe8"],
    "then-text": [_close(1000) + b"\x81\x02hi"],
    "then-garbage": [_close(1000) + b"\xff\xff\xff"],
    "then-ping": [_close(1000) + b"\x89\x00"],
    "text-first": [b"\x81\x02hi" + _close(1000)],
    "ping-first": [b"\x89\x04ping", _close(1001, b"x")],
    "fragmented-first": [b"\x01\x01a", b"\x80\x01b" + _close(1000)],
    # frames the scanner hands to Autobahn: not a close reply taken here
    "masked": [b"\x88\x82abcd" + bytes(a ^ b for a, b in zip(b"\x03\xe8", b"ab", strict=True))],
    "rsv": [b"\xc8\x02\x03\xe8"],
    "not-fin": [b"\x08\x02\x03\xe8"],
    "length-1": [b"\x88\x01\x03"],
    "nothing": [],
}


@pytest.mark.parametrize("reads", list(REPLIES.values()), ids=list(REPLIES))
def test_close_reply_as_autobahn_takes_it(reads: list[bytes]) -> None:
    """
    Whatever the upstream answers to the leg's close, the leg ends in the
    same state, sends the same bytes, reports the same end to the client
    leg, and arms the same timer for the upstream's TCP close, whether it
    takes the reply itself or Autobahn does.
    """
    import txaio

    txaio.use_twisted()
    lean = _after(UpstreamProtocol, reads)
    autobahn = _after(ThroughAutobahn, reads)
    assert lean == autobahn


def test_close_reply_taken_without_autobahns_frame_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain reply (code 1000, or none) does not go through Autobahn's processData."""
    from autobahn.websocket.protocol import WebSocketProtocol

    calls: list[Any] = []
    original = WebSocketProtocol.processData

    def counted(self: Any) -> Any:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(WebSocketProtocol, "processData", counted)
    for reply in (_close(1000), _close(), _close(4000, b"done")):
        _after(UpstreamProtocol, [reply])
    assert calls == []
    _after(UpstreamProtocol, [_close(1005)])
    assert calls  # Autobahn refuses it itself


def test_close_from_the_upstream_first_still_through_autobahn() -> None:
    """
    The upstream closing first (the leg is open) is not a reply: relayed to
    the client leg and answered by Autobahn, as before.
    """
    seen = []
    for kind in (UpstreamProtocol, ThroughAutobahn):
        clock = Clock()
        protocol, transport = _open_leg(kind, clock)
        downstream = Downstream()
        downstream.state = 1
        protocol.attach(downstream)
        protocol.dataReceived(_close(4001, b"later"))
        seen.append((transport.value()[:2], downstream.calls, _state(protocol)))
        protocol.connectionLost(Failure(error.ConnectionDone()))
        drop = protocol.serverConnectionDropTimeoutCall
        if drop is not None and drop.active():
            drop.cancel()
    assert seen[0] == seen[1]
    assert seen[0][1][0] == ("closeFromUpstream", 4001, b"later")


# -- the end of the connection: is_closed not made for nothing -------------------------


def _closed_leg(read_is_closed: bool) -> tuple[Any, list[Any]]:
    protocol, _ = _open_leg(UpstreamProtocol, Clock())
    fired: list[Any] = []
    if read_is_closed:
        protocol.is_closed.addCallback(
            lambda result: fired.append(
                (result is protocol, protocol.serverConnectionDropTimeoutCall)
            )
        )
    protocol.sendCloseFrame(1000)
    protocol.dataReceived(_close(1000))
    assert protocol.serverConnectionDropTimeoutCall is not None
    results: list[Any] = []
    protocol.closed.addBoth(results.append)
    protocol.connectionLost(Failure(error.ConnectionDone()))
    assert results == [(True, 1000, None)]
    assert protocol.state == protocol.STATE_CLOSED
    return protocol, fired


def test_is_closed_not_made_when_nothing_read_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Autobahn's _connectionLost resolves is_closed, which made it (a
    Deferred fired for nobody): it is left released, and reads as fired.
    """
    import txaio

    txaio.use_twisted()
    resolved: list[Any] = []
    resolve = txaio.resolve
    monkeypatch.setattr(txaio, "resolve", lambda *args: resolved.append(args) or resolve(*args))
    protocol, _ = _closed_leg(read_is_closed=False)
    assert resolved == []
    assert protocol.__dict__["_is_closed_deferred"] is None
    seen: list[Any] = []
    protocol.is_closed.addCallback(seen.append)
    assert seen == [protocol]


def test_is_closed_read_before_fires_in_autobahns_order() -> None:
    """Made before, it fires with the protocol once Autobahn has cancelled its timers."""
    import txaio

    txaio.use_twisted()
    _, fired = _closed_leg(read_is_closed=True)
    assert fired == [(True, None)]


# -- the upstream's FIN read with its close reply -----------------------------------------


def _real_upstream(reactor: Any, answer: bytes, close: bool) -> tuple[Any, Any]:
    """
    A raw upstream: answers the upgrade request with a 101; to a close frame
    it answers C{answer} (and, with C{close}, drops the connection at once).
    """

    class Raw(Protocol):
        buffer = b""

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            if b"\r\n\r\n" in self.buffer and not getattr(self, "upgraded", False):
                self.upgraded = True
                head = self.buffer.split(b"\r\n\r\n")[0].decode()
                key = next(
                    line.split(":", 1)[1].strip()
                    for line in head.split("\r\n")
                    if line.lower().startswith("sec-websocket-key:")
                )
                accept = accept_for(key.encode()).decode()
                assert self.transport is not None
                self.transport.write(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n".encode()
                )
                self.buffer = b""
            elif self.buffer[:1] == b"\x88":
                assert self.transport is not None
                self.transport.write(answer)
                if close:
                    self.transport.loseConnection()

    port = reactor.listenTCP(0, Factory.forProtocol(Raw), interface="127.0.0.1")
    return port, port.getHost().port


@pytest.mark.parametrize(
    ("answer", "close"),
    [
        (_close(1000), True),  # the usual: reply and FIN together
        (_close(1000), False),  # no FIN yet: the leg waits (its drop timer)
        (_close(1000) + b"\x81\x02hi", True),  # data after the close, then the FIN
        (_close(1005), True),  # a code Autobahn refuses: its path, no read ahead
    ],
    ids=["reply-and-fin", "reply-only", "reply-data-fin", "refused-code"],
)
def test_the_end_read_with_the_close_reply(answer: bytes, close: bool) -> None:
    """
    Over a real socket: the leg's end is the same whether the upstream's
    FIN is read in the close reply's event or in the next; with no FIN the
    leg is still open (its drop timer armed), and closes once it comes.
    """
    import txaio

    outcomes = []
    for kind in (UpstreamProtocol, ThroughAutobahn):
        reactor = EPollReactor()
        txaio.config.loop = reactor
        port, number = _real_upstream(reactor, answer, close)
        try:
            factory = SecureClientFactory(f"ws://127.0.0.1:{number}/", reactor=reactor)
            factory.protocol = kind
            protocol = _outcome(
                reactor, LeanTCPEndpoint(reactor, "127.0.0.1", number).connect(factory)
            )
            _outcome(reactor, protocol.opened)
            protocol.startRelay()
            protocol.sendCloseFrame(1000)
            results: list[Any] = []
            protocol.closed.addBoth(results.append)
            end = time.monotonic() + 0.5
            while not results and time.monotonic() < end:
                reactor.iterate(0.01)
            waiting = (
                protocol.state,
                protocol.serverConnectionDropTimeoutCall is not None,
                bool(results),
            )
            if not results:
                reactor.removeAll()  # (the upstream's connections, both ends)
                protocol.transport.connectionLost(Failure(error.ConnectionDone()))
            outcomes.append((waiting, results, protocol.remoteCloseCode, protocol.wasClean))
            drop = protocol.serverConnectionDropTimeoutCall
            if drop is not None and drop.active():
                drop.cancel()
        finally:
            port.stopListening()
            for selectable in reactor.removeAll():
                selectable.connectionLost(Failure(error.ConnectionDone()))
            reactor.waker.connectionLost(None)
    txaio.config.loop = None
    assert outcomes[0] == outcomes[1]
    if close:
        assert outcomes[0][1], outcomes


def test_the_end_read_in_the_close_replys_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The upstream's reply and FIN together: the leg ends in the event that
    read the reply (one reactor event less), not in the next, and arms no
    timer for an upstream that does not drop the connection.
    """
    import txaio

    from txwssec.gateway.connect import LeanClient

    reactor = EPollReactor()
    txaio.config.loop = reactor
    port, number = _real_upstream(reactor, _close(1000), True)
    reads: list[Any] = []
    do_read = LeanClient.doRead

    def counted(self: Any) -> Any:
        reads.append(self)
        return do_read(self)

    monkeypatch.setattr(LeanClient, "doRead", counted)
    armed: list[Any] = []
    await_drop = UpstreamProtocol._awaitServerDrop
    monkeypatch.setattr(
        UpstreamProtocol, "_awaitServerDrop", lambda self: armed.append(1) or await_drop(self)
    )
    try:
        factory = SecureClientFactory(f"ws://127.0.0.1:{number}/", reactor=reactor)
        factory.protocol = UpstreamProtocol
        protocol = _outcome(
            reactor, LeanTCPEndpoint(reactor, "127.0.0.1", number).connect(factory)
        )
        _outcome(reactor, protocol.opened)
        protocol.startRelay()
        reads.clear()
        protocol.sendCloseFrame(1000)
        time.sleep(0.05)  # the reply and the FIN have come
        results: list[Any] = []
        protocol.closed.addBoth(results.append)
        end = time.monotonic() + 2
        while not results and time.monotonic() < end:
            reactor.iterate(0.01)
        assert results == [(True, 1000, None)]
        assert len(reads) == 1
        assert armed == []  # no timer for an upstream that would not close
    finally:
        txaio.config.loop = None
        port.stopListening()
        for selectable in reactor.removeAll():
            selectable.connectionLost(Failure(error.ConnectionDone()))
        reactor.waker.connectionLost(None)
