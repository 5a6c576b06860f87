"""
The upstream leg copies Autobahn's protocol options from its own
connection's factory (L{UpstreamProtocol._connectionMade}), as Autobahn's
C{_connectionMade} does: the names to copy are found once per class, the
values read from each connection's factory. Its session parameters
(L{UpstreamPool.set_session}) are those Autobahn's C{setSessionParameters}
sets, the target's URL joined and parsed once per target.
"""

from __future__ import annotations

from typing import Any

import pytest
from autobahn.websocket.protocol import WebSocketClientProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from txwssec.client import SecureClientFactory
from txwssec.gateway import upstream
from txwssec.gateway.forwarding import join_target
from txwssec.gateway.upstream import UpstreamPool, UpstreamProtocol
from txwssec.policy import Upstream


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
    import txwssec._autobahn as autobahn

    calls: list[int] = []
    monkeypatch.setattr(autobahn, "copy_options", lambda *args: calls.append(1))

    class Fresh(UpstreamProtocol):
        pass

    factory = SecureClientFactory("ws://127.0.0.1:9/")
    for _ in range(3):
        protocol = connected(factory, Fresh)
        assert protocol.openHandshakeTimeout == factory.openHandshakeTimeout
        done(protocol)
    assert calls == []


# -- the session parameters: the joined target, parsed once per target -------------

TARGETS = [
    ("ws://127.0.0.1:9/", "/ws"),
    ("ws://127.0.0.1:9/", "/ws?room=1&b=%20x+y"),
    ("ws://127.0.0.1:9/", "/a%2Fb/c?"),
    ("ws://127.0.0.1:9/base", "/ws?room=1"),
    ("ws://127.0.0.1:9/base?fixed=1", "/ws?room=2&room=3"),
    ("wss://example.com/", "/"),
    ("wss://example.com:8443", "/x;y?z=%E2%82%AC"),
    ("ws://[::1]:9/", "/v6"),
]


def _session_fields(factory: SecureClientFactory) -> dict[str, Any]:
    names = ("url", "isSecure", "host", "port", "resource", "path", "params")
    names += ("origin", "protocols", "useragent", "headers", "proxy")
    return {name: getattr(factory, name) for name in names}


@pytest.mark.parametrize(("url", "target"), TARGETS)
def test_session_parameters_as_autobahn_sets_them(url: str, target: str) -> None:
    pool = UpstreamPool(Upstream((url,)), Clock())
    for _ in range(2):  # parsed, then kept
        ours = SecureClientFactory(url)
        pool.set_session(ours, url, target, "https://app.example.com", ["chat"], {"X-A": "1"})
        autobahn = SecureClientFactory(url)
        autobahn.setSessionParameters(
            join_target(url, target),
            origin="https://app.example.com",
            protocols=["chat"],
            useragent=None,
            headers={"X-A": "1"},
        )
        assert _session_fields(ours) == _session_fields(autobahn)


def test_a_target_is_joined_and_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[str] = []
    real = upstream.parse_url

    def counted(url: str) -> Any:
        parsed.append(url)
        return real(url)

    monkeypatch.setattr(upstream, "parse_url", counted)
    pool = UpstreamPool(Upstream(("ws://127.0.0.1:9/",)), Clock())
    first, second = (
        SecureClientFactory("ws://127.0.0.1:9/"),
        SecureClientFactory("ws://127.0.0.1:9/"),
    )
    for factory in (first, second):
        pool.set_session(factory, "ws://127.0.0.1:9/", "/ws?a=1", None, [], {})
    assert parsed == ["ws://127.0.0.1:9/ws?a=1"]
    assert first.params == second.params == {"a": ["1"]}
    assert first.params is not second.params


def test_a_refused_url_still_raises_autobahns_error() -> None:
    url = "ws://127.0.0.1:9/base#fragment"  # (the configuration refuses it)
    pool = UpstreamPool(Upstream(("ws://127.0.0.1:9/",)), Clock())
    factory = SecureClientFactory("ws://127.0.0.1:9/")
    for _ in range(2):  # (nothing kept)
        with pytest.raises(ValueError, match="non-empty fragment"):
            pool.set_session(factory, url, "/ws", None, [], {})
    assert pool._targets == {}


def test_kept_targets_are_bounded() -> None:
    pool = UpstreamPool(Upstream(("ws://127.0.0.1:9/",)), Clock())
    factory = SecureClientFactory("ws://127.0.0.1:9/")
    for index in range(upstream._TARGETS * 3):
        pool.set_session(factory, "ws://127.0.0.1:9/", f"/ws?n={index}", None, [], {})
        assert len(pool._targets) <= upstream._TARGETS
    assert factory.resource == f"/ws?n={upstream._TARGETS * 3 - 1}"
