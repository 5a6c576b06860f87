"""
The gateway's lean upstream connector (txwssec.gateway.connect) calls
C{connect()} inside C{LeanTCPEndpoint.connect}, so an error the kernel
reports at once (no route: ENETUNREACH, EACCES; no free source port:
EADDRNOTAVAIL) fails the connection attempt before the endpoint returns,
where Twisted's connector failed it on the next turn. The gateway must
still answer 502 and keep nothing of the attempt.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from conftest import aio
from test_gateway import gateway, refused
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from txwssec.gateway.connect import lean_tcp_endpoint

#: A destination Linux refuses in connect() itself (no route to broadcast).
UNROUTABLE = "255.255.255.255"


def test_lean_endpoint_fails_at_once_for_an_unroutable_address() -> None:
    endpoint = lean_tcp_endpoint(reactor, UNROUTABLE, 9)
    assert endpoint is not None
    outcome: list[Any] = []
    endpoint.connect(Factory.forProtocol(Protocol)).addBoth(outcome.append)
    assert len(outcome) == 1  # failed within connect(): no turn of the reactor
    assert outcome[0].check(Exception)


@pytest_twisted.ensureDeferred
async def test_unroutable_upstream_is_502(serve: Any, captured_log: Any) -> None:
    factory = gateway(f"ws://{UNROUTABLE}:9/")
    port = serve(factory)
    assert await aio(refused(port)) == (502, b"bad gateway\n")
    assert factory.counters["handshake.refused.502"] == 1
    assert factory.connections.total == 0
    assert not [event for event in captured_log.events if event.get("log_failure")]
