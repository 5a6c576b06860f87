"""
Operations through the Python API: the admin API (health, readiness,
metrics, sessions, revocations), the service listeners' health path, the
metrics' values and the JSON log's lines.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
import websockets
from conftest import aio, raw_exchange, upgrade_request
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from websockets.exceptions import InvalidStatus

from txwssec import (
    Consumer,
    ConsumerDirectory,
    KeyAuthenticator,
    RoutePolicy,
    SecureServerFactory,
    ServerPolicy,
)
from txwssec.apps.echo import EchoProtocol
from txwssec.auth.jwt import JWTAuthenticator
from txwssec.consumers import key_digest
from txwssec.ops import JSONEventObserver, JSONFormatter, Metrics, admin_site, token_digest
from txwssec.ops.jsonlog import EVENT_KEY

Serve = Callable[[Any], int]

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
JWT_SECRET = "jwt-secret-for-tests-0123456789abcdef"


def make_factory(health_path: str = "") -> SecureServerFactory:
    consumers = ConsumerDirectory(
        [Consumer("john", (key_digest("john-key"),)), Consumer("mary", (key_digest("mary-key"),))]
    )
    routes = [
        RoutePolicy("/echo", [KeyAuthenticator(consumers)], protocol=EchoProtocol),
        RoutePolicy("/jwt", [JWTAuthenticator(consumers, JWT_SECRET)], protocol=EchoProtocol),
    ]
    return SecureServerFactory(ServerPolicy(routes=routes, health_path=health_path))


class Server:
    """A server and its admin API, both listening."""

    def __init__(self, serve: Serve, token: str | None = ADMIN_TOKEN, **kwargs: Any) -> None:
        self.factory = make_factory(**kwargs)
        self.metrics = Metrics(self.factory)
        digest = token_digest(token) if token is not None else None
        self.port = serve(self.factory)
        self.admin = serve(admin_site(self.factory, self.metrics.registry, digest))

    async def http(
        self, method: str, path: str, body: bytes = b"", token: str | None = ADMIN_TOKEN
    ) -> tuple[int, dict[str, str], bytes]:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        if token is not None:
            lines.append(f"Authorization: Bearer {token}")
        if body:
            lines.append(f"Content-Length: {len(body)}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        return parse(await raw_exchange(self.admin, request))

    def ws(self, path: str = "/echo", **headers: str) -> Any:
        return websockets.connect(f"ws://127.0.0.1:{self.port}{path}", additional_headers=headers)


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ")[1]), headers, body


def token(consumer: str = "john", **claims: Any) -> str:
    payload = {"sub": consumer, "exp": int(time.time()) + 600, **claims}
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


async def settle(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


# -- health, readiness ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_healthz_and_readyz(serve: Serve) -> None:
    server = Server(serve)
    status, headers, body = await aio(server.http("GET", "/healthz", token=None))
    assert (status, body) == (200, b"ok\n")
    assert headers["cache-control"] == "no-store"
    status, headers, body = await aio(server.http("GET", "/readyz", token=None))
    assert (status, json.loads(body)) == (200, {"ready": True, "reasons": []})
    assert headers["content-type"] == "application/json"

    server.factory.readiness.add("jwks", lambda: "keys not fetched yet")
    server.factory.readiness.add("broken", lambda: 1 // 0)  # type: ignore[func-returns-value]
    status, _, body = await aio(server.http("GET", "/readyz", token=None))
    assert status == 503
    assert json.loads(body) == {
        "ready": False,
        "reasons": ["jwks: keys not fetched yet", "broken: check failed (ZeroDivisionError)"],
    }
    server.factory.readiness.remove("jwks")
    server.factory.readiness.remove("broken")
    status, _, _ = await aio(server.http("GET", "/readyz", token=None))
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_unknown_paths_and_methods(serve: Serve) -> None:
    server = Server(serve)
    assert await aio(server.http("GET", "/nope")) == (404, _any_headers(), b"not found\n")
    status, headers, body = await aio(server.http("POST", "/healthz", b"{}"))
    assert (status, headers["allow"], body) == (405, "GET", b"method not allowed\n")
    status, headers, _ = await aio(server.http("PUT", "/sessions"))
    assert (status, headers["allow"]) == (405, "DELETE, GET")


class _any_headers(dict[str, str]):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, dict)


# -- the token ---------------------------------------------------------------


@pytest.mark.parametrize(
    "path,method", [("/sessions", "GET"), ("/sessions?id=x", "DELETE"), ("/revocations", "POST")]
)
@pytest_twisted.ensureDeferred
async def test_token_required(serve: Serve, path: str, method: str) -> None:
    server = Server(serve)
    for wrong in (None, "", "admin-token-for-tests", ADMIN_TOKEN + "x"):
        status, headers, body = await aio(server.http(method, path, b"{}", token=wrong))
        assert (status, body) == (401, b"unauthorized\n")
        assert headers["www-authenticate"] == 'Bearer realm="wssec-admin"'
    # Another scheme is not the token either.
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Basic {ADMIN_TOKEN}\r\n\r\n"
    ).encode()
    assert parse(await aio(raw_exchange(server.admin, request)))[0] == 401


@pytest_twisted.ensureDeferred
async def test_no_token_configured_is_403(serve: Serve) -> None:
    server = Server(serve, token=None)
    for method, path in (("GET", "/sessions"), ("POST", "/revocations")):
        status, _, body = await aio(server.http(method, path, b"{}"))
        assert (status, body) == (403, b"admin token not configured\n")
    # The open endpoints stay open.
    assert (await aio(server.http("GET", "/metrics", token=None)))[0] == 200


# -- sessions ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_list_and_close_sessions(serve: Serve) -> None:
    server = Server(serve)

    async def scenario() -> None:
        async with server.ws(apikey="john-key") as john, server.ws(apikey="mary-key") as mary:
            await settle(lambda: len(server.factory.registry) == 2)
            status, _, body = await server.http("GET", "/sessions")
            assert status == 200
            records = json.loads(body)
            assert sorted(r["consumer"] for r in records) == ["john", "mary"]
            for record in records:
                assert set(record) == {
                    "id",
                    "consumer",
                    "route",
                    "method",
                    "peer",
                    "opened_at",
                    "expires_at",
                }
                assert (record["route"], record["method"]) == ("/echo", "key")
            status, _, body = await server.http("DELETE", "/sessions?consumer=john")
            assert (status, json.loads(body)) == (200, {"closed": 1})
            await john.wait_closed()
            assert john.close_code == 3003
            (mary_id,) = [r["id"] for r in records if r["consumer"] == "mary"]
            status, _, body = await server.http("DELETE", f"/sessions?id={mary_id}")
            assert (status, json.loads(body)) == (200, {"closed": 1})
            await mary.wait_closed()
            assert mary.close_code == 3003
            status, _, body = await server.http("DELETE", "/sessions?consumer=nobody")
            assert (status, json.loads(body)) == (200, {"closed": 0})

    await aio(scenario())


@pytest.mark.parametrize(
    "query", ["", "?consumer=a&id=b", "?consumer=a&consumer=b", "?consumer=", "?other=1"]
)
@pytest_twisted.ensureDeferred
async def test_delete_sessions_needs_one_selector(serve: Serve, query: str) -> None:
    server = Server(serve)
    status, _, body = await aio(server.http("DELETE", "/sessions" + query))
    assert (status, body) == (400, b"bad request\n")


# -- revocations ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_revoke_a_token_by_jti(serve: Serve) -> None:
    server = Server(serve)
    revoked, other = token(jti="t-1"), token(jti="t-2")

    async def scenario() -> None:
        async with server.ws("/jwt", Authorization=f"Bearer {revoked}") as first:
            await settle(lambda: len(server.factory.registry) == 1)
            body = json.dumps({"jti": "t-1", "expires_at": time.time() + 600}).encode()
            status, _, answer = await server.http("POST", "/revocations", body)
            assert (status, json.loads(answer)) == (200, {"closed": 1})
            await first.wait_closed()
            assert first.close_code == 3003
        with pytest.raises(InvalidStatus) as refused:
            await server.ws("/jwt", Authorization=f"Bearer {revoked}")
        assert refused.value.response.status_code == 401
        async with server.ws("/jwt", Authorization=f"Bearer {other}") as ok:
            await ok.send("hi")
            assert await ok.recv() == "hi"

    await aio(scenario())
    assert server.factory.counters["session.revoked"] == 1


@pytest_twisted.ensureDeferred
async def test_revoke_a_consumers_tokens_issued_before(serve: Serve) -> None:
    server = Server(serve)
    now = int(time.time())
    old, no_iat, new = token(iat=now - 100), token(), token(iat=now - 10)
    marys = token("mary", iat=now - 100)

    async def scenario() -> None:
        async with (
            server.ws("/jwt", Authorization=f"Bearer {old}") as live,
            server.ws("/jwt", Authorization=f"Bearer {marys}") as mary,
            server.ws(apikey="john-key") as by_key,
        ):
            await settle(lambda: len(server.factory.registry) == 3)
            body = json.dumps({"consumer": "john", "issued_before": now - 50}).encode()
            status, _, answer = await server.http("POST", "/revocations", body)
            assert (status, json.loads(answer)) == (200, {"closed": 1})
            await live.wait_closed()
            assert live.close_code == 3003
            # Another consumer's token, and a session without a token, stay.
            await mary.send("m")
            assert await mary.recv() == "m"
            await by_key.send("k")
            assert await by_key.recv() == "k"
        for refused in (old, no_iat):
            with pytest.raises(InvalidStatus) as error:
                await server.ws("/jwt", Authorization=f"Bearer {refused}")
            assert error.value.response.status_code == 401
            assert error.value.response.headers["WWW-Authenticate"] == 'Bearer realm="wssec"'
        async with server.ws("/jwt", Authorization=f"Bearer {new}") as fresh:
            await fresh.send("n")
            assert await fresh.recv() == "n"

    await aio(scenario())


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'{"jti": "x"}',
        b'{"jti": 1, "expires_at": 1}',
        b'{"jti": "", "expires_at": 1}',
        b'{"jti": "x", "expires_at": "1"}',
        b'{"jti": "x", "expires_at": true}',
        b'{"jti": "x", "expires_at": 1e999}',
        b'{"jti": "x", "expires_at": 1, "consumer": "y"}',
        b'{"consumer": "y", "issued_before": null}',
        b'{"consumer": "y"}',
        b'{"jti": "' + b"x" * 5000 + b'", "expires_at": 1}',
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_revocations_are_400(serve: Serve, body: bytes) -> None:
    server = Server(serve)
    status, headers, answer = await aio(server.http("POST", "/revocations", body))
    assert (status, answer) == (400, b"bad request\n")
    assert headers["content-type"] == "text/plain; charset=utf-8"


# -- metrics -------------------------------------------------------------------


def samples(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in server.metrics.registry.collect():
        for sample in family.samples:
            values[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return values


def value(server: Server, name: str, **labels: str) -> float | None:
    return samples(server).get((name, tuple(sorted(labels.items()))))


@pytest_twisted.ensureDeferred
async def test_metrics(serve: Serve) -> None:
    server = Server(serve)

    async def scenario() -> None:
        async with server.ws(apikey="john-key") as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            out = {"route": "/echo", "direction": "out"}
            await settle(lambda: bool(value(server, "wssec_messages_total", **out)))
            # Open sessions are read at scrape time.
            assert value(server, "wssec_connections_open", route="/echo") == 1
            assert value(server, "wssec_messages_total", route="/echo", direction="in") == 1
            assert value(server, "wssec_messages_total", route="/echo", direction="out") == 1
            # 5 bytes of payload, 6 bytes of frame header (2 + 4 mask) in, 2 out.
            assert value(server, "wssec_bytes_total", route="/echo", direction="in") == 11
            assert value(server, "wssec_bytes_total", route="/echo", direction="out") == 7
        await settle(lambda: len(server.factory.registry) == 0)
        with pytest.raises(InvalidStatus):
            await server.ws(apikey="wrong")
        with pytest.raises(InvalidStatus):
            await server.ws("/nowhere", apikey="john-key")

    await aio(scenario())
    await aio(settle(lambda: value(server, "wssec_handshakes_total", route="/nowhere") is None))
    assert value(server, "wssec_handshakes_total", route="/echo", method="key", status="101") == 1
    assert value(server, "wssec_handshakes_total", route="/echo", method="key", status="401") == 1
    assert value(server, "wssec_handshakes_total", route="-", method="-", status="404") == 1
    assert value(server, "wssec_auth_failures_total", route="/echo", method="key") == 1
    assert value(server, "wssec_sessions_closed_total", route="/echo", code="peer") == 1
    assert value(server, "wssec_connections_open", route="/echo") is None
    # The closed session's traffic stays counted (the close frames too).
    assert value(server, "wssec_messages_total", route="/echo", direction="in") == 1
    assert value(server, "wssec_bytes_total", route="/echo", direction="in") == 11 + 8
    assert value(server, "wssec_handshake_duration_seconds_count", route="/echo") == 2

    status, headers, body = await aio(server.http("GET", "/metrics", token=None))
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    text = body.decode()
    for name in (
        "wssec_connections_open",
        "wssec_handshakes_total",
        "wssec_handshake_duration_seconds",
        "wssec_sessions_closed_total",
        "wssec_messages_total",
        "wssec_bytes_total",
        "wssec_auth_failures_total",
        "wssec_limit_violations_total",
        "wssec_upstream_errors_total",
        "wssec_refreshes_total",
    ):
        assert f"# HELP {name.removesuffix('_total')}" in text or f"# HELP {name}" in text
    assert 'wssec_sessions_closed_total{code="peer",route="/echo"} 1.0' in text


@pytest_twisted.ensureDeferred
async def test_server_closes_count_their_code(serve: Serve) -> None:
    server = Server(serve)

    async def scenario() -> None:
        async with server.ws(apikey="john-key") as ws:
            await settle(lambda: len(server.factory.registry) == 1)
            server.factory.revoke("john")
            await ws.wait_closed()

    await aio(scenario())
    await aio(settle(lambda: len(server.factory.registry) == 0))
    assert value(server, "wssec_sessions_closed_total", route="/echo", code="3003") == 1


def test_two_servers_have_their_own_metrics() -> None:
    first, second = Metrics(make_factory()), Metrics(make_factory())
    first.handshakes.labels("/echo", "key", "101").inc()
    assert first.registry is not second.registry
    assert second.handshakes.labels("/echo", "key", "101")._value.get() == 0


def test_limit_and_upstream_events_counted() -> None:
    factory = make_factory()
    metrics = Metrics(factory)
    factory.events.emit(
        "limit.exceeded",
        limit="limit.message_rate",
        **{"peer": "p", "route": "/echo", "consumer": "c", "code": 1008},
    )
    factory.events.emit("limit.exceeded", limit="limit.handshake_timeout", peer="p")
    factory.events.emit("upstream.failed", url="ws://u", kind="timeout", reason="r", route="/gw")
    factory.events.emit("upstream.lost", peer="p", route="/gw")
    server: Any = type("S", (), {"metrics": metrics})
    assert value(server, "wssec_limit_violations_total", route="/echo", limit="message_rate") == 1
    assert value(server, "wssec_limit_violations_total", route="-", limit="handshake_timeout") == 1
    assert value(server, "wssec_upstream_errors_total", route="/gw", kind="timeout") == 1
    assert value(server, "wssec_upstream_errors_total", route="/gw", kind="lost") == 1


def test_refresh_and_message_events_counted() -> None:
    """
    Refreshes by outcome, and message-rule refusals as limit violations
    (the events' shapes: tests/test_refresh.py, tests/test_messages.py).
    """
    factory = make_factory()
    metrics = Metrics(factory)
    fields = {"peer": "p", "route": "/echo", "consumer": "c", "id": "i", "method": "jwt"}
    factory.events.emit("session.refreshed", expires_at=1.0, outcome="refreshed", **fields)
    factory.events.emit("session.refreshed", expires_at=2.0, outcome="refreshed", **fields)
    factory.events.emit("session.refresh_rejected", reason="r", outcome="rate_limited", **fields)
    factory.events.emit(
        "message.refused", rule="schema", direction="client", code=1007, detail="d", **fields
    )
    server: Any = type("S", (), {"metrics": metrics})
    assert value(server, "wssec_refreshes_total", route="/echo", outcome="refreshed") == 2
    assert value(server, "wssec_refreshes_total", route="/echo", outcome="rate_limited") == 1
    assert (
        value(server, "wssec_limit_violations_total", route="/echo", limit="message.schema") == 1
    )


# -- the service listeners' health path --------------------------------------


@pytest_twisted.ensureDeferred
async def test_health_path_on_the_service_listener(serve: Serve) -> None:
    factory = make_factory(health_path="/healthz")
    seen: list[str] = []
    factory.events.add(lambda event, fields: seen.append(event))
    port = serve(factory)
    plain = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    assert await aio(raw_exchange(port, plain)) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\n"
        b"Connection: close\r\nCache-Control: no-store\r\n\r\nok\n"
    )
    assert seen == []  # not a refusal
    other = await aio(raw_exchange(port, b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
    assert other.startswith(b"HTTP/1.1 426 ")
    # A WebSocket handshake on the path is still one (404: no route there).
    upgrade = await aio(raw_exchange(port, upgrade_request("/healthz")))
    assert upgrade.startswith(b"HTTP/1.1 404 ")


@pytest_twisted.ensureDeferred
async def test_no_health_path_by_default(serve: Serve) -> None:
    port = serve(make_factory())
    answer = await aio(raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 426 ")


# -- the JSON log --------------------------------------------------------------


def test_json_lines_are_flat() -> None:
    captured: list[Mapping[str, Any]] = []
    globalLogPublisher.addObserver(captured.append)
    try:
        JSONEventObserver()(
            "session.closed",
            {"peer": "tcp4:1.2.3.4:5", "route": "/echo", "consumer": "john", "code": 1000},
        )
        try:
            raise ZeroDivisionError("integer division or modulo by zero")
        except ZeroDivisionError:
            JSONEventObserver()("application.error", {"hook": "onMessage", "failure": Failure()})
    finally:
        globalLogPublisher.removeObserver(captured.append)
    ours = [event for event in captured if EVENT_KEY in event]
    closed, error = (json.loads(JSONFormatter()(event)) for event in ours)
    assert closed.pop("time").endswith("Z")
    assert closed == {
        "level": "info",
        "event": "session.closed",
        "namespace": "txwssec.server",
        "peer": "tcp4:1.2.3.4:5",
        "route": "/echo",
        "consumer": "john",
        "code": 1000,
    }
    assert (error["level"], error["hook"]) == ("error", "onMessage")
    assert error["error"] == "ZeroDivisionError: integer division or modulo by zero"
    assert "Traceback" in error["traceback"]


def test_json_line_of_another_log_event() -> None:
    event = {
        "log_format": "listening on {port}",
        "port": 9,
        "log_time": 0.5,
        "log_level": LogLevel.warn,
        "log_namespace": "twisted",
    }
    line = JSONFormatter()(event)
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == {
        "time": "1970-01-01T00:00:00.500Z",
        "level": "warn",
        "event": "log",
        "namespace": "twisted",
        "message": "listening on 9",
    }


def test_twistd_json_events_go_straight_to_the_log_file(tmp_path: Path) -> None:
    """
    Under twistd, the JSON event lines are written to the file the log
    observer writes to (not through the Twisted log: cheaper per event).
    """
    from twisted.application.service import Application
    from twisted.logger import ILogObserver

    from txwssec.tap import Options, makeService

    config = tmp_path / "wssec.toml"
    config.write_text(
        f'[log]\nformat = "json"\nfile = "{tmp_path / "wssec.json"}"\n'
        '[auth.key]\n[[consumer]]\nname = "john"\nkeys = ["john-key"]\n'
        '[[route]]\npath = "/echo"\napp = "echo"\nauth = ["key"]\n'
    )
    options = Options()
    options.parseOptions(["--config", str(config)])
    options.parent = {"logfile": str(tmp_path / "twistd.log"), "nodaemon": True}  # type: ignore[attr-defined]
    application = Application("wssec")
    service: Any = makeService(options)
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        service.setServiceParent(application)  # SIGUSR1 then reopens the file
    finally:
        signal.signal(signal.SIGUSR1, previous)
    observer = application.getComponent(ILogObserver)  # type: ignore[attr-defined]
    assert observer is not None
    events = service.jsonEvents
    assert events is not None and events._lines is not None
    events("session.opened", {"peer": "p", "route": "/echo", "consumer": "john", "id": "x"})
    events._lines._flushNow()
    (line,) = (tmp_path / "wssec.json").read_text().splitlines()
    assert json.loads(line)["event"] == "session.opened"


@pytest.mark.parametrize(
    "event, fields",
    [
        ("config.reload_failed", {"path": "/etc/wssec.toml", "error": "consumer[1].keys: bad"}),
        (
            "upstream.wssec_dropped",
            {"peer": "tcp4:1.2.3.4:5", "route": "/gw", "consumer": "john", "kind": "x"},
        ),
        ("upstream.failed", {"url": "ws://up/", "kind": "refused", "reason": "refused"}),
    ],
)
def test_json_level_is_the_text_logs_level(event: str, fields: Mapping[str, Any]) -> None:
    """An event has the same level in the JSON log as in the text log."""
    from txwssec.observers import TextLogObserver

    captured: list[Mapping[str, Any]] = []
    globalLogPublisher.addObserver(captured.append)
    try:
        TextLogObserver.lines[event](fields)
        JSONEventObserver()(event, fields)
    finally:
        globalLogPublisher.removeObserver(captured.append)
    text = [entry for entry in captured if EVENT_KEY not in entry]
    (json_event,) = [entry for entry in captured if EVENT_KEY in entry]
    assert json.loads(JSONFormatter()(json_event))["level"] == text[0]["log_level"].name
