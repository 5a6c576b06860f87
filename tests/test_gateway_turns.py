"""
Timers, reactor turns and Deferreds per proxied handshake (issue 19, round 5,
bench/RESULTS.md "Round 5: gateway handshake"): what the gateway no longer
arms or waits for, and that the outcomes are the same.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from txwssec.client import SecureClientFactory
from txwssec.gateway.upstream import (
    GatewayTimeout,
    UpstreamProtocol,
    _Attempt,
    upstream_endpoint,
)


class Silent(Protocol):
    """An upstream that accepts the connection and never answers."""


def run_until(reactor: Any, done: Any, seconds: float = 5) -> None:
    end = time.monotonic() + seconds
    while not done() and time.monotonic() < end:
        reactor.iterate(0.01)
    assert done()


# -- the upstream leg's opening-handshake timer ---------------------------------------


@pytest.mark.parametrize(
    ("leg_timeout", "armed"),
    [(None, False), (0.3, False), (0.2, True), (0, False)],
)
def test_no_open_timer_under_the_attempts(leg_timeout: float | None, armed: bool) -> None:
    """
    The upstream leg's opening-handshake timer is not armed when the
    attempt's own timer (armed first, with the route's upstream_timeout)
    is not later: the attempt abandons the connection first, so it could
    never fire. A shorter one (a subclass's or the factory's option) is
    still armed. A silent upstream still ends in the attempt's 504.
    """
    reactor = EPollReactor()
    silent = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    try:
        url = f"ws://127.0.0.1:{silent.getHost().port}/"
        factory = SecureClientFactory(url, handshake_timeout=0.3, reactor=reactor)
        if leg_timeout is not None:
            factory.setProtocolOptions(openHandshakeTimeout=leg_timeout)
        factory.protocol = UpstreamProtocol
        endpoint = upstream_endpoint(factory, 0.3)
        attempt = _Attempt(factory, lambda: endpoint, 0.3, reactor)
        run_until(reactor, lambda: attempt._protocol is not None)
        protocol = attempt._protocol
        assert (protocol.openHandshakeTimeoutCall is not None) is armed
        results: list[Any] = []
        attempt.result.addBoth(results.append)
        run_until(reactor, lambda: bool(results))
        if not armed:
            assert results[0].check(GatewayTimeout)
            assert results[0].value.reason == f"{url}: no handshake within 0.3 s"
        reactor.runUntilCurrent()
    finally:
        silent.stopListening()
        for selectable in reactor.removeAll():
            selectable.connectionLost(Failure(error.ConnectionDone()))
        reactor.waker.connectionLost(None)


def test_an_upstream_leg_without_an_attempt_keeps_its_timer() -> None:
    """Outside an attempt (the factory used directly), Autobahn's timer as before."""
    from twisted.internet.testing import StringTransport

    factory = SecureClientFactory("ws://127.0.0.1:9/", handshake_timeout=3)
    factory.protocol = UpstreamProtocol
    protocol: Any = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    assert protocol.openHandshakeTimeoutCall is not None
    protocol.openHandshakeTimeoutCall.cancel()
