"""
The [route.messages] table: defaults, every key, and the errors, each naming
its key path (and, for a schema, the file).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from txwssec.config import load, parse
from txwssec.errors import ConfigError
from txwssec.messages.validation import validator_for
from txwssec.policy import MessageRules

SCHEMA = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}

#: Every [route.messages] key, with its TOML type as named in errors.
KEYS = {
    "text": "string",
    "binary": "string",
    "schema": "string",
    "upstream_schema": "string",
    "max_json_depth": "integer",
}


def config(messages: Any = None, *, gateway: bool = False) -> dict[str, Any]:
    route: dict[str, Any] = {"path": "/echo", "auth": ["anonymous"]}
    if gateway:
        route["upstream"] = "ws://127.0.0.1:8080/"
    else:
        route["app"] = "echo"
    if messages is not None:
        route["messages"] = messages
    return {"route": [route]}


def error_of(data: dict[str, Any], base_dir: Path = Path()) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(data, base_dir)
    return str(caught.value)


def test_default_checks_nothing() -> None:
    (route,) = parse(config()).policy.routes
    assert route.messages == MessageRules()
    assert validator_for(route.messages) is None


def test_every_key(tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "out.json").write_text(json.dumps({"required": ["ok"]}))
    messages = {
        "text": "json",
        "binary": "none",
        "schema": "in.json",
        "upstream_schema": "out.json",
        "max_json_depth": 8,
    }
    (route,) = parse(config(messages, gateway=True), tmp_path).policy.routes
    assert route.messages == MessageRules(
        text="json",
        binary="none",
        schema=tmp_path / "in.json",
        upstream_schema=tmp_path / "out.json",
        max_json_depth=8,
    )
    checker = validator_for(route.messages)
    assert checker is not None  # compiled at load, kept on the rules
    assert route.messages._compiled is checker


@pytest.mark.parametrize(("key", "kind"), sorted(KEYS.items()))
def test_wrong_type(key: str, kind: str) -> None:
    sample: Any = 3 if kind == "string" else "3"
    assert error_of(config({key: sample})) == f"route[0].messages.{key}: expected {kind}"


def test_bad_values() -> None:
    assert error_of(config({"text": "xml"})) == (
        "route[0].messages.text: expected one of 'any', 'json', 'none'"
    )
    assert error_of(config({"binary": "json"})) == (
        "route[0].messages.binary: expected one of 'any', 'none'"
    )
    assert error_of(config({"max_json_depth": 0})) == (
        "route[0].messages.max_json_depth: must be at least 1"
    )
    assert error_of(config({"size": 1})) == "route[0].messages.size: unknown key"
    assert error_of(config(["text"])) == "route[0].messages: expected a table"
    assert error_of(config({"upstream_schema": "out.json"})) == (
        "route[0].messages.upstream_schema: only applies to routes with an upstream"
    )
    assert error_of(config({"text": "none", "schema": "in.json"})) == (
        'route[0].messages.schema: checks text messages, but text = "none"'
    )


def test_schema_errors_name_the_key_and_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    message = error_of(config({"schema": "missing.json"}), tmp_path)
    assert message.startswith(f"route[0].messages.schema: {missing}: cannot read")
    (tmp_path / "bad.json").write_text('{"type": "thing"}')
    message = error_of(config({"upstream_schema": "bad.json"}, gateway=True), tmp_path)
    assert message.startswith(f"route[0].messages.upstream_schema: {tmp_path / 'bad.json'}: ")
    assert "not a valid schema" in message
    (tmp_path / "text.json").write_text("type: object")
    message = error_of(config({"schema": "text.json"}), tmp_path)
    assert message.startswith(f"route[0].messages.schema: {tmp_path / 'text.json'}: not JSON")


def test_toml_file_second_route(tmp_path: Path) -> None:
    (tmp_path / "ok.json").write_text(json.dumps(SCHEMA))
    path = tmp_path / "server.toml"
    path.write_text(
        textwrap.dedent(
            """
            [[route]]
            path = "/a"
            app = "echo"
            auth = ["anonymous"]

            [route.messages]
            schema = "ok.json"

            [[route]]
            path = "/b"
            app = "echo"
            auth = ["anonymous"]

            [route.messages]
            schema = "nowhere.json"
            """
        )
    )
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value).startswith(
        f"route[1].messages.schema: {tmp_path / 'nowhere.json'}: cannot read"
    )
