"""
Attacks on the gateway's round-5 changes (attack7): the client's 101
released at the end of the upstream's read, with what the upstream sent in
the same segment.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import pytest_twisted
import wsframes
from conftest import aio
from test_gateway_relay import Serve
from test_gateway_turns import SWITCHED, answering_gateway

CLOSE_BYE = b"\x88\x05\x03\xe8bye"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("close", [False, True])
@pytest.mark.parametrize("frames", [b"", b"\x81\x02hi", b"\x81\x02hi\x82\x01\x00"])
async def test_upstream_101_message_and_close_in_one_segment(
    serve: Serve, frames: bytes, close: bool
) -> None:
    """
    The upstream's 101, maybe a message (and a ping), and its close frame in
    one write: the client gets its 101, the message, then the upstream's
    close (1000), in that order.
    """
    port = answering_gateway(
        serve,
        lambda accept: SWITCHED.format(accept=accept).encode() + frames + CLOSE_BYE,
        close=close,
    )

    async def run() -> tuple[bytes, list[Any], Any]:
        client = await wsframes.connect(port, "/ws")
        try:
            before, last = await wsframes.read_until_close(client.reader)
        finally:
            client.close()
        return client.response, before, last

    response, before, last = await aio(run())
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    relayed = {
        b"": [],
        b"\x81\x02hi": [(1, b"hi")],
        b"\x81\x02hi\x82\x01\x00": [(1, b"hi"), (2, b"\x00")],
    }
    assert [(f.opcode, f.payload) for f in before] == relayed[frames]
    assert last.close_code == 1000


def test_the_stripped_names_keep_no_replaced_policy() -> None:
    """
    The names stripped of a route's requests, found once per route and
    policy, do not keep a policy (its methods, their keys and secrets, its
    consumers) alive once a reload replaced it and its handshakes ended:
    nothing else holds it.
    """
    from test_gateway_turns import names_policy

    from txwssec.gateway.forwarding import stripped_names

    policy = names_policy()
    names = stripped_names(policy.routes[0], policy)
    assert "cookie" in names.headers
    gone, route_gone = weakref.ref(policy), weakref.ref(policy.routes[0])
    del policy, names
    gc.collect()
    assert gone() is None
    assert route_gone() is None
