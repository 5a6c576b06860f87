"""
Message validation (txwssec.messages.validation): a route's message rules
checked on each whole message before the application sees it, and on
gateway routes before it is relayed, both ways.

Servers are real (127.0.0.1, port 0), clients raw sockets
(tests/wsframes.py) so that the exact frames and close codes are seen; the
gateway's upstream is the recording echo server of test_gateway_relay.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import websockets
import wsframes
from conftest import CapturedLog, aio
from test_gateway_relay import SANITY_TIMEOUT, Serve, closed, gateway, until

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory
from txwssec.apps.echo import EchoProtocol
from txwssec.messages import validation
from txwssec.messages.validation import MessageValidator, Schema, SchemaError, validator_for
from txwssec.policy import MessageRules

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"enum": ["say", "join"]},
        "text": {"type": "string", "maxLength": 2000},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def echo_server(serve: Serve, **rules: Any) -> int:
    route = RoutePolicy(
        "/echo",
        [AnonymousAuthenticator()],
        protocol=EchoProtocol,
        messages=MessageRules(**rules),
        compression=True,
    )
    return serve(SecureServerFactory(route))


async def refusal(port: int, *frames: bytes, path: str = "/echo") -> tuple[int | None, str]:
    """Send C{frames} on a new connection: the close code and reason received."""
    client = await wsframes.connect(port, path)
    try:
        await client.send(b"".join(frames))
        _, close = await wsframes.read_until_close(client.reader, SANITY_TIMEOUT)
        return close.close_code, close.close_reason
    finally:
        client.close()


async def echoed(port: int, *messages: bytes, path: str = "/echo") -> list[wsframes.Frame]:
    """Send whole messages (as frames), read as many messages back."""
    client = await wsframes.connect(port, path)
    try:
        await client.send(b"".join(messages))
        return [
            await wsframes.read_message(client.reader, SANITY_TIMEOUT)
            for _ in range(len(messages))
        ]
    finally:
        client.close()


def text(payload: bytes) -> bytes:
    return wsframes.frame(wsframes.TEXT, payload)


# -- the checks, without sockets ------------------------------------------------------


def test_depth_is_counted_without_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    32 levels pass, 33 are refused; brackets inside strings do not count.
    A message nested 10**6 deep (far past the recursion limit) is refused
    without the parser ever being called.
    """
    checker = MessageValidator(MessageRules(text="json"))
    assert checker.check(nested(32), False) is None
    assert checker.check(b'{"a":' * 32 + b"1" + b"}" * 32, False) is None
    deep = checker.check(nested(33), False)
    assert deep is not None and (deep.code, deep.rule) == (1007, "depth")
    assert checker.check(b'["' + b"[" * 100 + b'\\"[{"]', False) is None

    calls: list[str] = []

    class Spy:
        def decode(self, text: str) -> Any:
            calls.append(text)
            return json.loads(text)

    monkeypatch.setattr(validation, "_DECODER", Spy())
    refused = checker.check(nested(10**6), False)
    assert refused is not None and refused.rule == "depth"
    assert calls == []
    assert checker.check(nested(3), False) is None
    assert calls == ["[[[]]]"]


@pytest.mark.parametrize(
    "payload",
    [
        b"1" * 100_000,
        b"[" + b"9" * 5000 + b"]",
        b"-" + b"1" * 101,
        b"1." + b"5" * 200,
        b"1e999",
        b"[-1e400]",
        b"NaN",
        b'{"a": Infinity}',
        b"-Infinity",
        b"{",
        b"[1,]",
        b"",
        b"\xef\xbb\xbf{}",
        b"{} {}",
    ],
)
def test_numbers_and_literals_refused(payload: bytes) -> None:
    refused = MessageValidator(MessageRules(text="json")).check(payload, False)
    assert refused is not None and (refused.code, refused.rule) == (1007, "json")


def test_plain_json_and_long_enough_numbers_pass() -> None:
    checker = MessageValidator(MessageRules(text="json", schema=SCHEMA))
    for payload in (
        b'{"type":"say","text":"\\u00e9[{","tags":["a"]}',
        json.dumps({"type": "join", "n": 10**90, "f": -1.5e300}).encode(),
    ):
        assert checker.check(payload, False) is None
    broken = checker.check(b'{"type":"shout"}', False)
    assert broken is not None and (broken.code, broken.rule) == (1007, "schema")
    assert broken.detail == "at /type: properties/type/enum"
    # a lone surrogate (valid JSON, not Unicode) that the validator reads:
    # a refusal, not an error
    checker.check(b'{"type":"say","text":"\\ud800"}', False)
    lone = MessageValidator(MessageRules(schema={"type": "string"})).check(b'"\\ud800"', False)
    assert lone is not None and lone.detail == "a string that is not valid Unicode"


def test_kinds() -> None:
    none = MessageValidator(MessageRules(text="none", binary="none"))
    assert none.check(b"x", True) == (1003, "binary messages not accepted", "binary", "")
    assert none.check(b"x", False) == (1003, "text messages not accepted", "text", "")
    anything = MessageValidator(MessageRules(binary="none"))
    assert anything.check(b"not json", False) is None


def test_bench_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/validation_cost.py runs (its numbers are not asserted here)."""
    from bench import validation_cost

    assert validation_cost.main(["--rounds", "5", "--budget", "1e9"]) == 0
    assert "schema check:" in capsys.readouterr().out


def test_rules_check_nothing_by_default() -> None:
    assert validator_for(MessageRules()) is None
    rules = MessageRules(text="json")
    assert validator_for(rules) is validator_for(rules)


def test_rule_values() -> None:
    with pytest.raises(ValueError, match="text must be one of"):
        MessageRules(text="xml")
    with pytest.raises(ValueError, match="binary must be one of"):
        MessageRules(binary="json")
    with pytest.raises(ValueError, match="max_json_depth"):
        MessageRules(max_json_depth=0)
    with pytest.raises(ValueError, match='text = "none"'):
        MessageRules(text="none", schema=SCHEMA)
    with pytest.raises(ValueError, match="upstream_schema only applies"):
        RoutePolicy(
            "/x", [AnonymousAuthenticator()], messages=MessageRules(upstream_schema=SCHEMA)
        )


def test_schemas_that_do_not_compile(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="not a valid schema"):
        Schema({"type": 12})
    with pytest.raises(SchemaError, match="draft 2020-12"):
        Schema({"$schema": "http://json-schema.org/draft-07/schema#"})
    with pytest.raises(SchemaError, match="may only refer to itself"):
        Schema({"$ref": "https://example.com/other.json"})
    with pytest.raises(SchemaError, match="not a valid schema"):
        Schema({"$ref": "other.json"})
    missing = tmp_path / "missing.json"
    with pytest.raises(SchemaError, match=f"{missing}: cannot read"):
        Schema(missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{'type': 'object'}")
    with pytest.raises(SchemaError, match=f"{broken}: not JSON"):
        Schema(broken)
    with pytest.raises(SchemaError, match="schema"):
        SecureServerFactory(
            RoutePolicy("/x", [AnonymousAuthenticator()], messages=MessageRules(schema=missing))
        )
    assert Schema({"$ref": "#/$defs/a", "$defs": {"a": {"type": "string"}}}).problem("x") is None
    good = tmp_path / "good.json"
    good.write_text(json.dumps(SCHEMA))
    assert Schema(str(good)).problem({"type": "say"}) is None  # a string is a file name


# -- an application route -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_refusals_close_with_their_codes(serve: Serve) -> None:
    strict = echo_server(serve, text="json", binary="none", schema=SCHEMA)
    no_text = echo_server(serve, text="none")
    cases = [
        (strict, wsframes.frame(wsframes.BINARY, b"\x00"), 1003),
        (no_text, text(b"hello"), 1003),
        (strict, text(b"{not json"), 1007),
        (strict, text(b'{"type":"say","text":1}'), 1007),
        (strict, text(nested(33)), 1007),
        (strict, text(b'{"type":"say","n":' + b"7" * 10_000 + b"}"), 1007),
        (strict, text(b'{"type":"say","n":NaN}'), 1007),
        # invalid UTF-8: 1007 from Autobahn, as before
        (strict, text(b'{"type":"\xff"}'), 1007),
    ]
    for port, frames, code in cases:
        assert (await aio(refusal(port, frames)))[0] == code, frames[:40]


@pytest_twisted.ensureDeferred
async def test_application_sees_only_valid_messages(serve: Serve) -> None:
    """
    Valid messages reach onMessage unchanged, whole or fragmented or
    compressed; the first invalid one closes 1007 and is not delivered.
    """
    port = echo_server(serve, text="json", binary="any", schema=SCHEMA)
    good = json.dumps({"type": "say", "text": "é" * 300, "tags": ["x"]}).encode()
    frames = await aio(
        echoed(
            port,
            text(good),
            wsframes.fragments(wsframes.TEXT, good, 7),
            wsframes.frame(wsframes.BINARY, b"\xff\x00 anything"),
        )
    )
    assert [(f.opcode, f.payload) for f in frames] == [
        (wsframes.TEXT, good),
        (wsframes.TEXT, good),
        (wsframes.BINARY, b"\xff\x00 anything"),
    ]

    async def compressed() -> tuple[str | bytes, tuple[int | None, str | None]]:
        async with websockets.connect(f"ws://127.0.0.1:{port}/echo", compression="deflate") as ws:
            await ws.send(good.decode())
            back = await ws.recv()
            await ws.send('{"type": "shout"}')
            try:
                await ws.recv()
            except websockets.ConnectionClosed:
                pass
            return back, (ws.close_code, ws.close_reason)

    back, close = await aio(compressed())
    assert back == good.decode()
    assert close == (1007, "message does not match schema")


@pytest_twisted.ensureDeferred
async def test_a_refusal_is_an_event(serve: Serve) -> None:
    route = RoutePolicy(
        "/echo",
        [AnonymousAuthenticator()],
        protocol=EchoProtocol,
        messages=MessageRules(schema=SCHEMA),
    )
    factory = SecureServerFactory(route)
    seen: list[tuple[str, dict[str, Any]]] = []
    factory.events.add(lambda name, fields: seen.append((name, dict(fields))))
    port = serve(factory)
    assert (await aio(refusal(port, text(b'{"type":"say","tags":[1]}')))) == (
        1007,
        "message does not match schema",
    )
    (fields,) = [fields for name, fields in seen if name == "message.refused"]
    assert fields["rule"] == "schema" and fields["direction"] == "client"
    assert fields["detail"] == "at /tags/0: properties/tags/items/type"
    assert factory.counters["message.schema"] == 1


# -- a gateway route ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_gateway_without_rules_keeps_the_frame_relay(serve: Serve) -> None:
    env = gateway(serve)
    client = await aio(env.raw())
    assert env.leg()._scanner is not None
    client.close()


@pytest_twisted.ensureDeferred
async def test_gateway_checks_client_messages_before_relaying(serve: Serve) -> None:
    """
    With rules, the gateway assembles messages (no frame relay): valid ones
    reach the upstream whole, an invalid one closes the client 1007 and is
    never relayed, the upstream getting 1001.
    """
    env = gateway(serve, messages=MessageRules(schema=SCHEMA, binary="none"))
    good = json.dumps({"type": "join", "tags": ["a", "b"]}).encode()

    async def run() -> tuple[list[wsframes.Frame], int | None, str]:
        client = await env.raw()
        assert env.leg()._scanner is None
        await client.send(wsframes.fragments(wsframes.TEXT, good, 3))
        echo = await wsframes.read_message(client.reader, SANITY_TIMEOUT)
        assert echo.payload == good
        await client.send(text(b'{"type":"leave"}'))
        return await closed(client)

    _, code, reason = await aio(run())
    assert (code, reason) == (1007, "message does not match schema")
    await aio(until(lambda: env.upstream.closes == [1001], "the upstream closed 1001"))
    assert [m.payload for m in env.upstream.messages] == [good]

    async def binary() -> tuple[list[wsframes.Frame], int | None, str]:
        client = await env.raw()
        await client.send(wsframes.frame(wsframes.BINARY, b"\x01"))
        return await closed(client)

    env = gateway(serve, messages=MessageRules(binary="none"))
    _, code, _ = await aio(binary())
    assert code == 1003
    await aio(until(lambda: env.upstream.closes == [1001], "the upstream closed 1001"))
    assert env.upstream.messages == []


@pytest_twisted.ensureDeferred
async def test_upstream_breaking_its_schema_gets_the_client_1014(serve: Serve) -> None:
    """
    The upstream echoes what the client sent: valid for the client's side
    (no client rules here), it breaks upstream_schema on the way back. The
    client gets 1014, the upstream is closed with 1007, and the message is
    not delivered.
    """
    env = gateway(serve, messages=MessageRules(upstream_schema={"required": ["ok"]}))

    async def run() -> tuple[list[wsframes.Frame], int | None, str]:
        client = await env.raw()
        await client.send(text(b'{"ok": 1}') + wsframes.frame(wsframes.BINARY, b"\x02"))
        first = await wsframes.read_message(client.reader, SANITY_TIMEOUT)
        second = await wsframes.read_message(client.reader, SANITY_TIMEOUT)
        assert (first.payload, second.payload) == (b'{"ok": 1}', b"\x02")
        await client.send(text(b'{"nope": 1}'))
        return await closed(client)

    before, code, reason = await aio(run())
    assert before == []
    assert (code, reason) == (1014, "upstream failed")
    await aio(until(lambda: env.upstream.closes == [1007], "the upstream closed 1007"))
    assert env.factory.counters["message.schema"] == 1


@pytest_twisted.ensureDeferred
async def test_a_refusal_is_logged_once(serve: Serve, captured_log: CapturedLog) -> None:
    """
    txwssec's line for a refused message (and for a limit: 1009) is the only
    one: Autobahn's "failing WebSocket connection" warning is left out.
    """
    port = echo_server(serve, text="json")
    assert (await aio(refusal(port, text(b"{not json"))))[0] == 1007
    small = serve(
        SecureServerFactory(
            RoutePolicy(
                "/echo", [AnonymousAuthenticator()], protocol=EchoProtocol, max_message_size=4
            )
        )
    )
    assert (await aio(refusal(small, text(b"too long"))))[0] == 1009
    lines = captured_log.text()
    assert "failing WebSocket connection" not in lines
    assert "message refused (json, from client)" in lines
