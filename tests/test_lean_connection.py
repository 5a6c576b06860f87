"""
The lean server connection set-up and tear-down (issue 19, round 3,
bench/RESULTS.md "Round 3: server handshake"): the state a new connection
gets is Autobahn's, and what the applications read of it (the peer, the
transport details, the options) is the same as Autobahn's own set-up gives.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.util import create_transport_details, peer2str
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.wamp.types import TransportDetails
from autobahn.websocket.protocol import WebSocketProtocol
from conftest import aio
from test_upgrade_reader import BYE, factory, request
from twisted.internet.defer import Deferred

import txwssec._wire
from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec._autobahn import copy_options, copy_options_at_once
from txwssec._wire import Utf8Validator, open_state
from txwssec.apps.echo import EchoProtocol

#: What each connection saw at onOpen.
OPENED: list[dict[str, Any]] = []


class Seen(EchoProtocol):
    def onOpen(self) -> None:
        details = self.transport_details
        made = create_transport_details(self.transport, True)
        made.channel_framing = TransportDetails.CHANNEL_FRAMING_WEBSOCKET
        OPENED.append(
            {
                "peer": self.peer,
                "peer2str": peer2str(self.transport),
                "details": details.marshal(),
                "made": made.marshal(),
                "options": {
                    name: getattr(self, name) for name in WebSocketServerProtocol.CONFIG_ATTRS
                },
            }
        )
        super().onOpen()


def _comparable(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in state.items():
        if name == "trafficStats":
            value = ("TrafficStats", vars(value))
        elif name == "send_queue":
            value = ("deque", list(value))
        elif name == "utf8validator":
            value = type(value).__name__
        elif name == "openHandshakeTimeoutCall":
            value = value is not None
        out[name] = value
    return out


def test_open_state_is_autobahns() -> None:
    """open_state() and the timer: what Autobahn's _connectionMade sets."""
    made = factory()
    made.setProtocolOptions(openHandshakeTimeout=7)
    made.trackTimings = True
    autobahn = made.buildProtocol(None)
    lean = made.buildProtocol(None)
    copy_options(autobahn, WebSocketServerProtocol.CONFIG_ATTRS)
    copy_options(lean, WebSocketServerProtocol.CONFIG_ATTRS)
    before = set(vars(autobahn))
    WebSocketProtocol._connectionMade(autobahn)
    set_by_autobahn = {k: v for k, v in vars(autobahn).items() if k not in before}
    before = set(vars(lean))
    state = open_state()
    vars(lean).update(state)
    lean.openHandshakeTimeoutCall = made._batched_timer.call_later(7, lean.onOpenHandshakeTimeout)
    lean.utf8validator = Utf8Validator()
    set_lean = {k: v for k, v in vars(lean).items() if k not in before}
    try:
        assert _comparable(set_by_autobahn) | {"utf8validator": "Utf8Validator"} == _comparable(
            set_lean
        )
        # Each connection its own objects.
        assert open_state()["trafficStats"] is not state["trafficStats"]
        assert open_state()["send_queue"] is not state["send_queue"]
    finally:
        autobahn.openHandshakeTimeoutCall.cancel()
        lean.openHandshakeTimeoutCall.cancel()


def _options(protocol: Any, names: Any) -> dict[str, Any]:
    """The options set on the instance itself."""
    return {name: value for name, value in vars(protocol).items() if name in names}


def test_options_copied_at_once_as_copy_options() -> None:
    made = factory()
    made.setProtocolOptions(autoPingInterval=3, maxFramePayloadSize=77)

    class OwnOption(EchoProtocol):
        autoPingInterval = 9

    for cls in (EchoProtocol, OwnOption):
        slow, fast = cls(), cls()
        slow.factory = fast.factory = made
        slow.maxFramePayloadSize = fast.maxFramePayloadSize = 5  # the instance's wins
        names = WebSocketServerProtocol.CONFIG_ATTRS
        copy_options(slow, names)
        copy_options_at_once(fast, names)
        assert _options(slow, names) == _options(fast, names)
        # And again (the per-class names are kept), after the factory changed.
        made.setProtocolOptions(autoPingTimeout=4)
        slow, fast = cls(), cls()
        slow.factory = fast.factory = made
        copy_options(slow, names)
        copy_options_at_once(fast, names)
        assert _options(slow, names) == _options(fast, names)
        assert fast.autoPingTimeout == 4


@pytest.fixture
def lean_off(monkeypatch: pytest.MonkeyPatch) -> Any:
    def off() -> None:
        # Autobahn's connectionMade and _connectionMade (with txwssec's own
        # validator and reads after it, as before the lean set-up).
        from autobahn.twisted.websocket import WebSocketServerProtocol

        def made(self: Any) -> None:
            WebSocketServerProtocol.connectionMade(self)

        def _made(self: Any) -> None:
            copy_options(self, WebSocketServerProtocol.CONFIG_ATTRS)
            WebSocketProtocol._connectionMade(self)
            self.factory.countConnections += 1
            self.utf8validator = Utf8Validator()
            txwssec._wire.read_ahead(self.transport)

        from txwssec.server import SecureServerProtocol

        monkeypatch.setattr(txwssec._wire.FrameReader, "connectionMade", made)
        monkeypatch.setattr(SecureServerProtocol, "_connectionMade", _made)

    return off


async def _exchange(family: int, host: str, port: int) -> bytes:
    import asyncio

    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))
    await loop.sock_sendall(sock, request() + BYE)
    received = b""
    while True:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
        if not chunk:
            break
        received += chunk
    sock.close()
    return received


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
async def test_peer_and_details_as_autobahns(lean_off: Any, family: str) -> None:
    from twisted.internet import reactor

    if family == "ipv6" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    host = "127.0.0.1" if family == "ipv4" else "::1"
    made = SecureServerFactory(
        ServerPolicy(routes=(RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=Seen),))
    )
    made.setProtocolOptions(autoPingInterval=11)
    try:
        port = reactor.listenTCP(0, made, interface=host)
    except Exception:
        pytest.skip("no IPv6 loopback")
    number = port.getHost().port
    try:
        OPENED.clear()
        kind = socket.AF_INET if family == "ipv4" else socket.AF_INET6
        lean = await aio(_exchange(kind, host, number))
        lean_off()
        autobahn = await aio(_exchange(kind, host, number))
    finally:
        done: Deferred[None] = port.stopListening()
        await done
    assert lean == autobahn
    assert lean.startswith(b"HTTP/1.1 101 ")
    assert len(OPENED) == 2
    for seen in OPENED:
        assert seen["peer"] == seen["peer2str"]
        assert seen["peer"].startswith("tcp4:" if family == "ipv4" else "tcp6:")
        assert seen["details"] == seen["made"]
        assert seen["options"]["autoPingInterval"] == 11
    lean_seen, autobahn_seen = OPENED
    assert lean_seen["options"] == autobahn_seen["options"]
    assert lean_seen["details"].keys() == autobahn_seen["details"].keys()


ADDRESSES = [
    "127.0.0.1",
    "10.0.0.1",
    "::1",
    "2001:db8::1",
    "2001:db8::2",
    "2001:DB8:0:0:1::1",
    "::ffff:10.0.0.7",
    "fe80::1%eth0",
    "not an address",
    "x" * 100,
    "",
    "010.0.0.1",
]


def test_addresses_remembered_as_parsed() -> None:
    """address_key and client_address remember what the parse gave."""
    from txwssec.admission import _address_text, _parse_address, client_address
    from txwssec.limits import ADDRESSES_REMEMBERED, address_key

    for host in ADDRESSES * 2:
        assert address_key(host) == address_key.__wrapped__(host)
        parsed = _parse_address(host)
        assert client_address(host, (), (), 0) == (host if parsed is None else str(parsed))
        assert client_address(host, ["1.2.3.4"], (), 3) == client_address(host, (), (), 0)
    assert address_key("2001:db8::1") == address_key("2001:db8::2") == "2001:db8::/64"
    assert address_key("::ffff:10.0.0.7") == "10.0.0.7"
    assert address_key.cache_info().maxsize == ADDRESSES_REMEMBERED
    assert _address_text.cache_info().maxsize == ADDRESSES_REMEMBERED


def test_level_checked_logger_emits_as_twisteds() -> None:
    """The session log's logger: the same events as Twisted's Logger."""
    from twisted.logger import Logger, LogLevel

    from txwssec.logs import LevelCheckedLogger
    from txwssec.observers import gatewayLog, securityLog

    assert isinstance(securityLog, LevelCheckedLogger)
    assert isinstance(gatewayLog, LevelCheckedLogger)

    def emitted(cls: type[Logger], level: Any, trace: bool = False) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        logger = cls(namespace="txwssec.server", source="src", observer=seen.append)
        fields: dict[str, Any] = {"peer": "tcp4:1.2.3.4:5", "route": "/r"}
        if trace:
            fields["log_trace"] = []
        if level == "info()":
            logger.info("accepted {peer} on {route}", **fields)
        else:
            logger.emit(level, "accepted {peer} on {route}", **fields)
        out = []
        for event in seen:
            event = dict(event)
            assert type(event.pop("log_logger")) is cls
            event.pop("log_time")
            if "log_trace" in event:
                event["log_trace"] = [type(who) for who, _ in event["log_trace"]]
            if "log_failure" in event:
                event["log_failure"] = event["log_failure"].type
            if "invalidLevel" in event:
                event.pop("logger")
            out.append(event)
        return out

    for level in LogLevel.iterconstants():
        assert emitted(LevelCheckedLogger, level) == emitted(Logger, level)
    assert emitted(LevelCheckedLogger, LogLevel.info, trace=True) == [
        {**emitted(Logger, LogLevel.info)[0], "log_trace": [LevelCheckedLogger]}
    ]
    assert emitted(LevelCheckedLogger, "info()") == emitted(Logger, "info()")
    assert emitted(LevelCheckedLogger, "info()", trace=True) == emitted(
        LevelCheckedLogger, LogLevel.info, trace=True
    )
    # A level that is not one: Twisted's own complaint, the same.
    assert emitted(LevelCheckedLogger, "info") == emitted(Logger, "info")
    assert emitted(Logger, "info")[0]["log_level"] == LogLevel.critical


#: What the futures did, per connection.
FUTURES: list[dict[str, Any]] = []


class Futures(EchoProtocol):
    """Reads is_open early or late, and is_closed during the session or never."""

    early = False

    def onConnect(self, request: Any) -> Any:
        subprotocol = super().onConnect(request)  # (the route's class from here)
        if self.early:
            self.is_open.addCallback(lambda result: self.record("opened", result))
        return subprotocol

    def record(self, name: str, value: Any) -> None:
        FUTURES[-1][name] = value

    def onOpen(self) -> None:
        FUTURES.append({"open_called": self.is_open.called})
        self.is_open.addCallback(lambda result: self.record("opened_late", result))
        if self.early:
            self.is_closed.addCallback(lambda protocol: self.record("closed", protocol is self))
        super().onOpen()

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        FUTURES[-1]["slot"] = self.__dict__.get("_is_closed_deferred", "absent")
        super().onClose(wasClean, code, reason)


class EarlyFutures(Futures):
    early = True


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("lean", [True, False])
async def test_is_open_and_is_closed_made_when_read(
    monkeypatch: pytest.MonkeyPatch, serve: Any, lean: bool
) -> None:
    """Autobahn's futures fire as before, made only if something reads them."""
    import txwssec.server.handshake

    monkeypatch.setattr(txwssec.server.handshake, "LEAN_OPEN", lean)
    made = SecureServerFactory(
        ServerPolicy(
            routes=(
                RoutePolicy("/late", [AnonymousAuthenticator()], protocol=Futures),
                RoutePolicy("/early", [AnonymousAuthenticator()], protocol=EarlyFutures),
            )
        )
    )
    made.protocol = Futures  # (its onConnect runs; the route's class after it)
    port = serve(made)
    FUTURES.clear()
    from conftest import raw_exchange

    for path in ("/late", "/early"):
        answer = await aio(raw_exchange(port, request(line=f"GET {path} HTTP/1.1") + BYE))
        assert answer.startswith(b"HTTP/1.1 101 ")
    late, early = FUTURES
    # As Autobahn: onOpen runs before is_open fires, right after it.
    assert late == {"open_called": False, "opened_late": None, "slot": None}
    # is_closed never read during the session: never made, left as released.
    slot = early.pop("slot")
    assert early == {"opened": None, "open_called": False, "opened_late": None, "closed": True}
    # Read: made, and fired with the protocol before onClose.
    assert slot.called


def test_new_protocol_state_as_autobahns_init() -> None:
    from autobahn.twisted.websocket import WebSocketServerProtocol as Plain

    plain = Plain()
    ours = EchoProtocol()
    assert ours._valid_events == plain._valid_events == ["message"]
    assert ours._results == plain._results
    # Read before any connection: what Autobahn's __init__ set.
    assert ours.transport_details.marshal() == plain.transport_details.marshal()
    assert not ours.is_open.called and not ours.is_closed.called
    assert ours.is_open is ours.is_open and ours.is_closed is ours.is_closed
