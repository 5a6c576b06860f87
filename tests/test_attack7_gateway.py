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

from txwssec import ServerPolicy

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

    from txwssec.gateway import forwarding
    from txwssec.gateway.forwarding import stripped_names

    policy = names_policy()
    names = stripped_names(policy.routes[0], policy)
    assert "cookie" in names.headers
    # the same route under another policy (a Python reload keeping it)
    other = ServerPolicy(routes=(policy.routes[0],), ping_interval=0)
    assert stripped_names(policy.routes[0], other) is not names
    assert stripped_names(policy.routes[0], policy) is not names
    key = id(policy.routes[0])
    gone, route_gone = weakref.ref(policy), weakref.ref(policy.routes[0])
    del policy, names, other
    gc.collect()
    assert gone() is None
    assert route_gone() is None
    assert key not in forwarding._stripped


@pytest_twisted.ensureDeferred
async def test_a_reload_strips_the_new_credential_names(serve: Serve) -> None:
    """
    A reload that renames the route's credential header and query, and adds
    a route with credential names of its own: the upstream sees none of the
    new names (the stripped names are found again for the new policy).
    """
    from test_gateway import CONSUMERS, KEY, BackendFactory, exchange, ws_url
    from test_gateway import connect as gw_connect
    from test_gateway import gateway as gw

    from txwssec import KeyAuthenticator, OriginPolicy, RoutePolicy, ServerPolicy
    from txwssec.proxy import Upstream

    backend = BackendFactory()
    url = ws_url(serve(backend))
    factory = gw(url, authenticators=[KeyAuthenticator(CONSUMERS, header="x-key-a", query="ka")])
    port = serve(factory)

    async def through(path: str, headers: dict[str, str]) -> None:
        ws = await gw_connect(port, path, headers=headers)
        assert await exchange(ws, "hi") == "hi"
        await ws.close()

    await aio(through("/echo?room=1", {"x-key-a": KEY}))
    assert backend.last.header_lines("x-key-a") == []

    def route(path: str, header: str, query: str) -> RoutePolicy:
        return RoutePolicy(
            path,
            [KeyAuthenticator(CONSUMERS, header=header, query=query)],
            origins=OriginPolicy.from_list(["*"]),
            upstream=Upstream((url,)),
        )

    factory.usePolicy(
        ServerPolicy(
            routes=(route("/echo", "x-key-b", "kb"), route("/other", "x-other", "ko")),
            ping_interval=0,
        )
    )
    await aio(
        through(
            f"/echo?room=2&ko=other-secret&kb={KEY}",
            {"x-key-b": KEY, "x-other": "other-secret"},
        )
    )
    seen = backend.last
    assert seen.raw.startswith(b"GET /echo?room=2 HTTP/1.1\r\n")
    assert seen.header_lines("x-key-b") == []
    assert seen.header_lines("x-other") == []
    assert KEY.encode() not in seen.raw
    assert b"other-secret" not in seen.raw
