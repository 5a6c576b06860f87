"""
CPU cost of message validation, in process: a 1 KiB JSON message checked
against examples/chat.schema.json-like rules (draft 2020-12).

    python bench/validation_cost.py [--rounds N] [--budget US]

Prints µs of CPU time (time.process_time) per message for: the schema
check alone (the budget: 20 µs), the whole check of a route with
C{text = "json"} and a schema (depth pre-scan, safe parsing, schema), the
safe parse alone, and, when the pure-Python C{jsonschema} is installed, the
same schema check with it, for comparison. Exits 1 when the schema check
costs more than the budget. No timing is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from txwssec.messages import validation
from txwssec.messages.validation import MessageValidator, Schema
from txwssec.policy import MessageRules

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["type", "room", "id"],
    "additionalProperties": False,
    "properties": {
        "type": {"enum": ["say", "join", "leave"]},
        "room": {"type": "string", "pattern": "^[a-z0-9-]{1,32}$"},
        "id": {"type": "integer", "minimum": 0},
        "text": {"type": "string", "maxLength": 2000},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 32},
            "maxItems": 16,
        },
        "meta": {"$ref": "#/$defs/meta"},
    },
    "$defs": {
        "meta": {
            "type": "object",
            "properties": {
                "sent": {"type": "number"},
                "client": {"type": "string"},
                "reply_to": {"type": ["integer", "null"]},
            },
        }
    },
}


def message(size: int = 1024) -> bytes:
    """A valid message of exactly C{size} bytes."""
    body: dict[str, Any] = {
        "type": "say",
        "room": "lobby-42",
        "id": 123456,
        "tags": ["alpha", "beta", "gamma", "delta"],
        "meta": {"sent": 1733390000.25, "client": "bench/1.0", "reply_to": None},
        "text": "",
    }
    filler = size - len(json.dumps(body, separators=(",", ":")))
    body["text"] = "lorem ipsum " * (filler // 12) + "x" * (filler % 12)
    encoded = json.dumps(body, separators=(",", ":")).encode()
    assert len(encoded) == size, len(encoded)
    return encoded


def cost(run: Callable[[], Any], rounds: int) -> float:
    """Median over 5 batches of CPU µs per call."""
    run()
    batches = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(rounds):
            run()
        batches.append((time.process_time() - start) / rounds * 1e6)
    return sorted(batches)[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--budget", type=float, default=20.0, help="µs for the schema check")
    options = parser.parse_args(argv)
    payload = message()
    value = json.loads(payload)
    schema = Schema(SCHEMA)
    checker = MessageValidator(MessageRules(text="json", schema=SCHEMA))
    assert schema.problem(value) is None and checker.check(payload, False) is None
    decoder = validation._DECODER
    rows = [
        ("schema check (jsonschema-rs)", cost(lambda: schema.problem(value), options.rounds)),
        (
            "whole check: depth scan + safe parse + schema",
            cost(lambda: checker.check(payload, False), options.rounds),
        ),
        ("safe parse alone", cost(lambda: decoder.decode(payload.decode()), options.rounds)),
    ]
    try:
        import jsonschema
    except ImportError:
        pass
    else:
        pure = jsonschema.Draft202012Validator(SCHEMA)
        rows.append(
            (
                "schema check, pure-Python jsonschema",
                cost(lambda: pure.is_valid(value), max(1, options.rounds // 10)),
            )
        )
    print(f"message: {len(payload)} bytes; CPU µs per message (median of 5 batches)")
    for name, micros in rows:
        print(f"  {name:48} {micros:8.2f}")
    schema_cost = rows[0][1]
    verdict = "within" if schema_cost <= options.budget else "OVER"
    print(f"schema check: {schema_cost:.2f} µs, {verdict} the {options.budget:g} µs budget")
    return 0 if schema_cost <= options.budget else 1


if __name__ == "__main__":
    sys.exit(main())
