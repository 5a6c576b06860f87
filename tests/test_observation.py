"""
The observation seam (L{txwssec.events}), the session registry
(L{txwssec.sessions}) and the store's session list, as a server uses them;
and routes naming their application by an import string.
"""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import websockets
from conftest import aio

from txwssec import (
    AnonymousAuthenticator,
    Consumer,
    ConsumerDirectory,
    KeyAuthenticator,
    RoutePolicy,
    SecureServerFactory,
)
from txwssec import events as ev
from txwssec.apps.echo import EchoProtocol
from txwssec.consumers import key_digest
from txwssec.events import EVENTS, Events
from txwssec.observers import CounterObserver
from txwssec.server import SecureServerProtocol
from txwssec.sessions import SessionRegistry

Serve = Callable[[Any], int]
ROOT = Path(__file__).resolve().parent.parent


class Seen:
    """A test observer: every event, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, fields: Mapping[str, Any]) -> None:
        self.events.append((event, dict(fields)))

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


def key_factory() -> SecureServerFactory:
    consumers = ConsumerDirectory([Consumer("john", (key_digest("john-key"),))])
    return SecureServerFactory(
        RoutePolicy("/echo", [KeyAuthenticator(consumers)], protocol=EchoProtocol)
    )


async def settle(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


# -- the seam --------------------------------------------------------------------


def test_emit_tells_every_observer_in_order() -> None:
    first, second = Seen(), Seen()
    hub = Events([first])
    hub.add(second)
    hub.emit(ev.SESSION_OPENED, route="/echo")
    hub.remove(first)
    hub.emit(ev.SESSION_CLOSED, route="/echo")
    assert first.events == [("session.opened", {"route": "/echo"})]
    assert second.names() == ["session.opened", "session.closed"]


def test_every_event_emitted_is_in_the_event_list() -> None:
    """Each emit(...) in txwssec names a constant of txwssec.events, listed in EVENTS."""
    constants = {
        name: value for name, value in vars(ev).items() if name.isupper() and name != "EVENTS"
    }
    emitted = set()
    for path in (ROOT / "txwssec").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "emit"
            ):
                first = node.args[0]
                if isinstance(first, ast.Attribute):
                    emitted.add(constants[first.attr])
    assert emitted, "no emit() found"
    assert emitted <= set(EVENTS)
    # The names the JSON log and metrics will serve (DESIGN.md, Operations).
    for name in ("handshake.refused", "session.opened", "session.closed", "limit.exceeded"):
        assert name in EVENTS


def test_counters_are_fed_by_the_events() -> None:
    counters: Any = __import__("collections").Counter()
    observe = CounterObserver(counters)
    observe(ev.HANDSHAKE_REFUSED, {"status": 429, "limit": "limit.max_connections_per_ip"})
    observe(ev.HANDSHAKE_REFUSED, {"status": 401, "limit": None})
    observe(ev.LIMIT_EXCEEDED, {"limit": "limit.message_rate"})
    observe(ev.SESSION_OPENED, {})
    observe(ev.SESSION_REVOKED, {})
    observe(ev.SESSION_CLOSED, {})
    observe(ev.HANDSHAKE_ACCEPTED, {})
    assert counters == {
        "handshake.refused.429": 1,
        "limit.max_connections_per_ip": 1,
        "handshake.refused.401": 1,
        "limit.message_rate": 1,
        "session.opened": 1,
        "session.revoked": 1,
    }


async def connect(port: int, key: str) -> Any:
    return await websockets.connect(
        f"ws://127.0.0.1:{port}/echo",
        additional_headers={"apikey": key, "Origin": f"http://127.0.0.1:{port}"},
    )


@pytest_twisted.ensureDeferred
async def test_a_session_seen_by_an_observer(serve: Serve) -> None:
    factory = key_factory()
    seen = Seen()
    factory.events.add(seen)
    port = serve(factory)

    async def client() -> str:
        ws = await connect(port, "john-key")
        await settle(lambda: "session.opened" in seen.names())
        (session_id,) = factory.registry._by_id
        await ws.close()
        await settle(lambda: "session.closed" in seen.names())
        return session_id

    session_id = await aio(client())
    assert seen.names() == ["handshake.accepted", "session.opened", "session.closed"]
    accepted, opened, closed = (fields for _, fields in seen.events)
    assert accepted["consumer"] == "john" and accepted["method"] == "key"
    assert opened == {
        "peer": accepted["peer"],
        "route": "/echo",
        "consumer": "john",
        "id": session_id,
        "method": "key",
        "expires_at": None,
    }
    # session.closed: the session's fields, how it ended, and its traffic
    # (a close frame each way: 2 + 4 mask + 2 code bytes in, 2 + 2 out).
    duration = closed.pop("duration_s")
    assert isinstance(duration, float) and duration >= 0
    assert closed == {
        **{k: v for k, v in opened.items() if k != "expires_at"},
        "code": 1000,
        "initiator": "peer",
        "messages_in": 0,
        "messages_out": 0,
        "bytes_in": 8,
        "bytes_out": 4,
    }
    assert factory.counters["session.opened"] == 1


@pytest_twisted.ensureDeferred
async def test_a_refusal_seen_by_an_observer(serve: Serve) -> None:
    factory = key_factory()
    seen = Seen()
    factory.events.add(seen)
    port = serve(factory)

    async def client() -> None:
        with pytest.raises(websockets.InvalidStatus):
            await connect(port, "wrong")
        await settle(lambda: bool(seen.events))

    await aio(client())
    ((name, fields),) = seen.events
    assert name == "handshake.refused"
    assert fields["status"] == 401
    assert fields["route"] == "/echo"
    assert fields["limit"] is None
    assert "wrong" not in repr(fields)
    assert factory.counters["handshake.refused.401"] == 1


# -- the registry and the store's session list ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_registry_and_the_store_list_open_sessions(serve: Serve) -> None:
    factory = key_factory()
    port = serve(factory)
    registry = factory.registry
    store = factory.admission.store

    async def client() -> None:
        first = await connect(port, "john-key")
        second = await connect(port, "john-key")
        await settle(lambda: len(registry) == 2)
        records = sorted(store.sessions(), key=lambda record: record["id"])
        assert sorted(registry._by_id) == [record["id"] for record in records]
        assert {record["consumer"] for record in records} == {"john"}
        assert {record["route"] for record in records} == {"/echo"}
        assert {record["method"] for record in records} == {"key"}
        assert factory.sessions is registry.by_consumer
        assert len(registry.open("/echo")) == 2 and registry.open("/other") == []
        # Revoke one by id: the other stays.
        target = records[0]["id"]
        assert registry.get(target) is not None
        assert registry.revoke(session_id=target) == 1
        await settle(lambda: len(registry) == 1)
        assert [record["id"] for record in store.sessions()] == [records[1]["id"]]
        assert registry.revoke(session_id=target) == 0
        # Revoke the consumer (the factory's revoke goes through the registry).
        assert factory.revoke("john") == 1
        await settle(lambda: len(registry) == 0)
        assert store.sessions() == []
        assert factory.sessions == {}
        for ws in (first, second):
            await ws.wait_closed()
            assert ws.close_code == 3003

    await aio(client())


def test_session_ids_are_unique_across_registries() -> None:
    assert SessionRegistry()._prefix != SessionRegistry()._prefix


# -- a route's application by import string --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_route_names_its_application_by_import_string(serve: Serve) -> None:
    route = RoutePolicy(
        "/echo", [AnonymousAuthenticator()], protocol="txwssec.apps.echo.EchoProtocol"
    )
    factory = SecureServerFactory(route)
    assert factory.protocolFor(route) is EchoProtocol
    port = serve(factory)

    async def client() -> Any:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/echo",
            additional_headers={"Origin": f"http://127.0.0.1:{port}"},
        ) as ws:
            await ws.send("hello")
            return await ws.recv()

    assert await aio(client()) == "hello"


@pytest.mark.parametrize(
    ("protocol", "message"),
    [
        ("txwssec.apps.echo.Missing", "cannot import protocol"),
        ("no_such_module_anywhere.Class", "cannot import protocol"),
        ("txwssec.events.Events", "must subclass SecureServerProtocol"),
    ],
)
def test_a_bad_import_string_is_refused(protocol: str, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        SecureServerFactory(RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=protocol))


def test_an_upstream_route_defaults_to_the_gateway() -> None:
    from txwssec.gateway import GatewayProtocol, Upstream

    route = RoutePolicy(
        "/gw", [AnonymousAuthenticator()], upstream=Upstream(("ws://127.0.0.1:1/",))
    )
    assert SecureServerFactory(route).protocolFor(route) is GatewayProtocol
    with pytest.raises(TypeError, match="must subclass GatewayProtocol"):
        SecureServerFactory(
            RoutePolicy(
                "/gw",
                [AnonymousAuthenticator()],
                upstream=Upstream(("ws://127.0.0.1:1/",)),
                protocol=SecureServerProtocol,
            )
        )
