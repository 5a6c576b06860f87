"""
The timers of a short connection (issue 19, round 4, bench/RESULTS.md
"Round 4: server handshake"): the server's timers keep one reactor call
through the 101 (auto-ping's timer is armed before the handshake's is
cancelled), and an orderly close that needs no wait arms no close timer.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from conftest import aio
from test_upgrade_reader import exchange, request

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec.apps.echo import EchoProtocol

#: The timers' reactor call at connectionMade and at onOpen.
CALLS: dict[str, Any] = {}


class Timed(EchoProtocol):
    def connectionMade(self) -> None:
        super().connectionMade()
        CALLS["made"] = self.factory.deadlines._call

    def onOpen(self) -> None:
        call = CALLS["open"] = self.factory.deadlines._call
        CALLS["active"] = call is not None and call.active()
        CALLS["autoPing"] = self.autoPingPendingCall
        CALLS["handshake"] = self.openHandshakeTimeoutCall
        super().onOpen()


def timed_factory(auto_ping: float = 30) -> SecureServerFactory:
    made = SecureServerFactory(
        ServerPolicy(routes=(RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=Timed),))
    )
    made.protocol = Timed  # from connectionMade on
    made.setProtocolOptions(autoPingInterval=auto_ping)
    return made


@pytest_twisted.ensureDeferred
async def test_one_reactor_call_through_the_101(serve: Any) -> None:
    """The handshake's timer armed the reactor call; the 101 keeps it."""
    CALLS.clear()
    made = timed_factory()
    port = serve(made)
    answer = await aio(exchange(port, request()))
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert CALLS["made"] is not None
    assert CALLS["open"] is CALLS["made"]
    assert CALLS["active"]
    assert CALLS["handshake"] is None
    assert CALLS["autoPing"] is not None
    # Everything cancelled once the connection is gone: no reactor call.
    assert made.deadlines._call is None
    assert len(made.deadlines) == 0
