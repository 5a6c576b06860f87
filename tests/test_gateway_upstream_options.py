"""
The upstream leg copies Autobahn's protocol options from its own
connection's factory (L{UpstreamProtocol._connectionMade}), as Autobahn's
C{_connectionMade} does: the names to copy are found once per class, the
values read from each connection's factory.
"""

from __future__ import annotations

from typing import Any

from autobahn.websocket.protocol import WebSocketClientProtocol
from twisted.internet.testing import StringTransport

from txwssec.client import SecureClientFactory
from txwssec.gateway.upstream import UpstreamProtocol


def connected(factory: SecureClientFactory, cls: type[UpstreamProtocol]) -> Any:
    factory.protocol = cls
    protocol: Any = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    return protocol


def done(protocol: Any) -> None:
    """Cancel the handshake timer (nothing else was started)."""
    timer = protocol.openHandshakeTimeoutCall
    if timer is not None:
        timer.cancel()


def test_each_connection_takes_its_own_factorys_options() -> None:
    first = SecureClientFactory("ws://127.0.0.1:9/", max_message_size=1000, handshake_timeout=3)
    second = SecureClientFactory("ws://127.0.0.1:9/", max_message_size=2000, handshake_timeout=7)
    second.setProtocolOptions(autoPingInterval=11, tcpNoDelay=False)
    for factory in (first, second, first):
        protocol = connected(factory, UpstreamProtocol)
        for name in WebSocketClientProtocol.CONFIG_ATTRS:
            assert getattr(protocol, name) == getattr(factory, name), name
            assert name in vars(protocol), name
        assert protocol.maxMessagePayloadSize == factory.maxMessagePayloadSize
        done(protocol)
    protocol = connected(second, UpstreamProtocol)
    assert protocol.autoPingInterval == 11
    done(protocol)


def test_an_option_set_on_a_subclass_wins() -> None:
    class Patient(UpstreamProtocol):
        openHandshakeTimeout = 99

    factory = SecureClientFactory("ws://127.0.0.1:9/", handshake_timeout=3)
    for _ in range(2):
        protocol = connected(factory, Patient)
        assert protocol.openHandshakeTimeout == 99
        assert "openHandshakeTimeout" not in vars(protocol)
        assert protocol.maxFramePayloadSize == factory.maxFramePayloadSize
        done(protocol)


def test_the_names_are_found_once_per_class(monkeypatch: Any) -> None:
    """No per-option loop (copy_options) on the connections of a class."""
    import txwssec.gateway.upstream as upstream

    calls: list[int] = []
    monkeypatch.setattr(upstream, "copy_options", lambda *args: calls.append(1))

    class Fresh(UpstreamProtocol):
        pass

    factory = SecureClientFactory("ws://127.0.0.1:9/")
    for _ in range(3):
        protocol = connected(factory, Fresh)
        assert protocol.openHandshakeTimeout == factory.openHandshakeTimeout
        done(protocol)
    assert calls == []
