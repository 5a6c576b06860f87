"""
One upstream connection attempt (L{txwssec.gateway.upstream.open_upstream}):
a L{Deferred} with one timer, no coroutine; its outcomes (the upstream,
502, 504, cancelled) and what it closes on each, with a fake endpoint and
clock.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock

from txwssec.client import ResponseHeadTooLarge
from txwssec.gateway.upstream import BadGateway, GatewayTimeout, open_upstream

URL = "ws://127.0.0.1:9/"


class FakeFactory:
    url = URL


class FakeProtocol:
    """What the attempt touches of an upstream leg."""

    state = 1  # Autobahn's STATE_CONNECTING

    def __init__(self) -> None:
        self.opened: Deferred[Any] = Deferred()
        self.is_closed: Deferred[Any] = Deferred()
        self.closed: list[bool] = []

    def unregisterProducer(self) -> None:
        pass

    def _closeConnection(self, abort: bool = False) -> None:
        self.closed.append(abort)


class FakeEndpoint:
    def __init__(self) -> None:
        self.cancelled = False
        self.connecting: Deferred[Any] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[Any]) -> None:
        self.cancelled = True

    def connect(self, factory: Any) -> Deferred[Any]:
        return self.connecting


def attempt(clock: Clock, endpoint: FakeEndpoint | None = None) -> tuple[Deferred[Any], Any]:
    endpoint = endpoint or FakeEndpoint()
    result = open_upstream(FakeFactory(), lambda: endpoint, 2.0, clock)  # type: ignore[arg-type]
    return result, endpoint


def outcome(result: Deferred[Any]) -> Any:
    seen: list[Any] = []
    result.addBoth(seen.append)
    assert seen, "no outcome yet"
    return seen[0]


def test_an_attempt_is_a_deferred_with_one_timer() -> None:
    clock = Clock()
    result, endpoint = attempt(clock)
    assert isinstance(result, Deferred)
    assert [call.getTime() for call in clock.getDelayedCalls()] == [2.0]
    protocol = FakeProtocol()
    endpoint.connecting.callback(protocol)
    assert not result.called
    protocol.opened.callback(protocol)
    assert outcome(result) is protocol
    assert clock.getDelayedCalls() == []
    assert protocol.closed == []


def test_timeout_while_connecting_is_504_and_stops_connecting() -> None:
    clock = Clock()
    result, endpoint = attempt(clock)
    clock.advance(2.0)
    failure = outcome(result)
    assert failure.check(GatewayTimeout)
    assert failure.value.reason == f"{URL}: no handshake within 2 s"
    assert endpoint.cancelled


def test_timeout_waiting_for_the_101_is_504_and_drops_the_connection() -> None:
    clock = Clock()
    result, endpoint = attempt(clock)
    protocol = FakeProtocol()
    endpoint.connecting.callback(protocol)
    clock.advance(2.0)
    assert outcome(result).check(GatewayTimeout)
    assert protocol.closed == [True]
    # The connection's end fails its opened Deferred later: nothing else happens.
    protocol.opened.errback(ConnectionError("closed"))
    assert protocol.closed == [True]


@pytest.mark.parametrize("connected", [False, True])
def test_cancel_closes_at_any_stage(connected: bool) -> None:
    clock = Clock()
    result, endpoint = attempt(clock)
    protocol = FakeProtocol()
    if connected:
        endpoint.connecting.callback(protocol)
    result.cancel()
    assert outcome(result).check(CancelledError)
    assert endpoint.cancelled is not connected
    assert protocol.closed == ([True] if connected else [])
    assert clock.getDelayedCalls() == []


def test_refused_connection_is_502() -> None:
    clock = Clock()
    result, endpoint = attempt(clock)
    endpoint.connecting.errback(ConnectionRefusedError())
    failure = outcome(result)
    assert failure.check(BadGateway)
    assert failure.value.kind == "refused"
    assert failure.value.reason.startswith(f"{URL}: Connection was refused")
    assert clock.getDelayedCalls() == []


def test_a_response_head_too_large_is_a_bad_response() -> None:
    clock = Clock()
    result, endpoint = attempt(clock)
    protocol = FakeProtocol()
    endpoint.connecting.callback(protocol)
    protocol.opened.errback(ResponseHeadTooLarge("response head over 10 bytes"))
    failure = outcome(result)
    assert failure.check(BadGateway)
    assert failure.value.kind == "bad_response"
    assert failure.value.reason == f"{URL}: response head over 10 bytes"


def test_an_endpoint_that_raises_is_502() -> None:
    clock = Clock()

    def broken() -> Any:
        raise ValueError("no such CA file")

    result = open_upstream(FakeFactory(), broken, 2.0, clock)  # type: ignore[arg-type]
    failure = outcome(result)
    assert failure.check(BadGateway)
    assert failure.value.reason == f"{URL}: no such CA file"
    assert clock.getDelayedCalls() == []
