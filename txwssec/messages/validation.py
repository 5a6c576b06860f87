"""
Message validation: a route's L{MessageRules} applied to each whole message.

Where it runs. A message received from a client goes, in this order:

 1. frame by frame, through the route's limits (size, rates, fragments:
    L{txwssec.server.flow}), inflation bounded by C{max_message_size}
    (L{txwssec.compression}), UTF-8 of text checked by Autobahn (1007);
 1b. on a sealed session (L{txwssec.messages.sealing}), opened: one that
    does not open closes 1007; everything below sees the plaintext;
 2. once whole, through txwssec's own messages (C{{"type":
    "wssec.refresh", ...}} on a route with C{refresh = true}, see
    L{txwssec.refresh}): consumed there, never validated, never delivered.
    Their single place is C{SecureServerProtocol._onMessage}, before step 3;
 3. through L{MessageValidator.check} (this module): a refused kind closes
    1003, a text that is not JSON, too deep, or that does not match the
    schema closes 1007;
 4. to the application's C{onMessage} (a gateway: to the upstream), which
    therefore only ever sees valid messages.

On a gateway route, a message from the upstream goes through
L{MessageValidator.check_upstream} (C{upstream_schema}) before it is sent to
the client (and sealed, on a sealed session); one that fails closes the
client with 1014 and the upstream with 1007. A gateway route whose rules
check anything does not relay frame by frame (L{txwssec.gateway.relay}):
Autobahn assembles each message, bounded by C{max_message_size}, which is
then checked and sent whole. Routes without rules keep the frame relay.

JSON is parsed safely: the nesting depth is counted before parsing (a
byte-level scan, strings skipped), so a deeply nested message is refused
without being parsed; numbers longer than L{MAX_NUMBER_LENGTH} characters,
non-finite floats (C{1e999}) and the non-standard C{NaN}, C{Infinity},
C{-Infinity} are refused while parsing.

Schemas (draft 2020-12) are compiled once, with C{jsonschema-rs}: a message
of about 1 KiB is checked in about a microsecond (C{bench/validation_cost.py};
the pure-Python C{jsonschema} takes about 45 µs, over the 20 µs budget, and
C{fastjsonschema} does not implement draft 2020-12). A schema may only refer
to itself (C{#/$defs/...}): nothing is fetched, from the network or files.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from itertools import accumulate
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema_rs

from txwssec._schema import Table
from txwssec.logs import bounded
from txwssec.policy import BINARY_RULES, TEXT_RULES, MessageRules

#: Close codes of a refused message (RFC 6455 section 7.4.1).
UNSUPPORTED_DATA = 1003
INVALID_PAYLOAD = 1007
#: The client's close code when its upstream sent an invalid message.
BAD_GATEWAY = 1014

#: Longest number accepted in a JSON message, in characters (sign, digits,
#: fraction and exponent). Python's int parsing is quadratic in the digits.
MAX_NUMBER_LENGTH = 100

#: The only C{$schema} accepted (the one the validator implements).
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"


class Refusal(NamedTuple):
    """
    Why a message was refused.

    @ivar code: the close code (1003, 1007).
    @ivar reason: the short fixed close reason sent to the peer.
    @ivar rule: the rule that refused it, for the log and the counters
        (C{binary}, C{text}, C{json}, C{depth}, C{schema}).
    @ivar detail: for the operator's log: where the message broke the
        schema (paths, never the message's values).
    """

    code: int
    reason: str
    rule: str
    detail: str = ""


class SchemaError(ValueError):
    """
    A schema that cannot be read or compiled; C{str()} names the file.

    @ivar key: which of the rules it is (C{schema}, C{upstream_schema}).
    """

    key = "schema"


_BINARY = Refusal(UNSUPPORTED_DATA, "binary messages not accepted", "binary")
_TEXT = Refusal(UNSUPPORTED_DATA, "text messages not accepted", "text")
_NOT_JSON = Refusal(INVALID_PAYLOAD, "invalid JSON", "json")
_TOO_DEEP = Refusal(INVALID_PAYLOAD, "JSON too deep", "depth")


class _BadNumber(ValueError):
    """A number the parser refuses (too long, not finite, NaN)."""


def _parse_int(text: str) -> int:
    if len(text) > MAX_NUMBER_LENGTH:
        raise _BadNumber(text[:20])
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_NUMBER_LENGTH:
        raise _BadNumber(text[:20])
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber(text[:20])
    return value


def _parse_constant(name: str) -> Any:
    raise _BadNumber(name)


#: The one decoder (made once: C{json.loads} with hooks makes one per call).
_DECODER = json.JSONDecoder(
    parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
)

#: A JSON string, escapes included (what the depth scan skips).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
#: Every byte but the brackets (deleted before the depth scan).
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
#: +1 for an opening bracket, -1 for a closing one.
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def too_deep(payload: bytes, limit: int) -> bool:
    """
    Whether the JSON text C{payload} nests arrays and objects deeper than
    C{limit}, found without parsing it: brackets inside strings do not
    count. The scan runs in C (a regular expression, C{bytes.translate}
    and C{itertools.accumulate}); a text with at most C{limit} opening
    brackets is not scanned at all.

    For a text that is not JSON the answer may be wrong only where the
    parser stops anyway (it fails before it gets deeper than the scan
    counted).
    """
    if payload.count(b"[") + payload.count(b"{") <= limit:
        return False
    if b'"' in payload:
        payload = _STRING.sub(b"", payload)
    brackets = payload.translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > limit


def parse_json(payload: bytes, max_depth: int) -> Any:
    """
    Parse a UTF-8 JSON text safely (see the module's docstring).

    @raise ValueError: it is not one JSON value, is nested deeper than
        C{max_depth}, or holds a refused number.
    """
    if too_deep(payload, max_depth):
        raise ValueError("too deep")
    try:
        return _DECODER.decode(payload.decode("utf-8"))
    except RecursionError:  # not reached: too_deep comes first
        raise ValueError("too deep") from None


class Schema:
    """
    A compiled JSON Schema (draft 2020-12).

    @ivar name: the file it came from (or C{"<schema>"}), for messages.
    """

    __slots__ = ("_validator", "name")

    def __init__(self, source: Path | str | Mapping[str, Any] | bool) -> None:
        if isinstance(source, Path | str):
            self.name = str(source)
            document = _read_schema(Path(source))
        else:
            self.name = "<schema>"
            document = source
        if not isinstance(document, Mapping | bool):
            raise SchemaError(f"{self.name}: a schema is a JSON object (or true/false)")
        declared = document.get("$schema") if isinstance(document, Mapping) else None
        if declared is not None and declared.rstrip("#") != DRAFT_2020_12:
            raise SchemaError(
                f"{self.name}: $schema must be {DRAFT_2020_12} (draft 2020-12), "
                f"not {bounded(str(declared))!r}"
            )
        try:
            self._validator = jsonschema_rs.Draft202012Validator(
                dict(document) if isinstance(document, Mapping) else document,
                retriever=_no_retrieval,
            )
        except (jsonschema_rs.ValidationError, ValueError, TypeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else "invalid"
            raise SchemaError(f"{self.name}: not a valid schema: {bounded(first)}") from None

    def problem(self, instance: Any) -> str | None:
        """
        Where C{instance} breaks the schema (instance and schema paths,
        without values), or L{None} if it matches.
        """
        validator = self._validator
        try:
            if validator.is_valid(instance):
                return None
            for error in validator.iter_errors(instance):
                where = "/" + "/".join(str(part) for part in error.instance_path)
                rule = "/".join(str(part) for part in error.schema_path)
                return bounded(f"at {where}: {rule}")
        except (ValueError, UnicodeError):  # lone surrogates ("\ud800")
            return "a string that is not valid Unicode"
        return "does not match"  # pragma: no cover (is_valid said no)


def _read_schema(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SchemaError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        return parse_json(data, 256)
    except UnicodeDecodeError:
        raise SchemaError(f"{path}: not UTF-8") from None
    except json.JSONDecodeError as error:
        raise SchemaError(f"{path}: not JSON: {error.msg} (line {error.lineno})") from None
    except ValueError:
        raise SchemaError(f"{path}: not JSON (too deep, or a refused number)") from None


def _no_retrieval(uri: str) -> Any:
    raise ValueError(f"refers to {bounded(uri)}: a schema may only refer to itself")


class MessageValidator:
    """
    A route's L{MessageRules}, compiled: L{check} for client->server
    messages, L{check_upstream} for upstream->client ones.
    """

    __slots__ = ("_binary", "_json", "_max_depth", "_schema", "_text", "_upstream_schema")

    def __init__(self, rules: MessageRules) -> None:
        self._text = rules.text != "none"
        self._binary = rules.binary != "none"
        self._json = rules.requires_json
        self._max_depth = rules.max_json_depth
        self._schema = _compile(rules.schema, "schema")
        self._upstream_schema = _compile(rules.upstream_schema, "upstream_schema")

    def check(self, payload: bytes, is_binary: bool) -> Refusal | None:
        """A client's message: why it is refused, or L{None}."""
        if is_binary:
            return None if self._binary else _BINARY
        if not self._text:
            return _TEXT
        if not self._json:
            return None
        return self._checkJSON(payload, self._schema)

    def check_upstream(self, payload: bytes, is_binary: bool) -> Refusal | None:
        """An upstream's message (gateway): why it is refused, or L{None}."""
        schema = self._upstream_schema
        if is_binary or schema is None:
            return None
        return self._checkJSON(payload, schema)

    def _checkJSON(self, payload: bytes, schema: Schema | None) -> Refusal | None:
        if too_deep(payload, self._max_depth):
            return _TOO_DEEP
        try:
            value = _DECODER.decode(payload.decode("utf-8"))
        except (ValueError, RecursionError):
            return _NOT_JSON
        if schema is None:
            return None
        problem = schema.problem(value)
        if problem is None:
            return None
        return Refusal(INVALID_PAYLOAD, "message does not match schema", "schema", problem)


def _compile(source: Path | str | Mapping[str, Any] | None, key: str) -> Schema | None:
    if source is None:
        return None
    try:
        return Schema(source)
    except SchemaError as error:
        error.key = key
        raise


def validator_for(rules: MessageRules) -> MessageValidator | None:
    """
    The compiled validator of C{rules}, made the first time and kept on the
    rules (a frozen value: compiled once however many routes and
    connections use it), or L{None} when the rules check nothing.

    @raise SchemaError: a schema cannot be read or compiled.
    """
    if not rules.active:
        return None
    compiled: MessageValidator | None = rules._compiled
    if compiled is None:
        compiled = MessageValidator(rules)
        object.__setattr__(rules, "_compiled", compiled)
    return compiled


def read_rules(table: Table, base_dir: Path, gateway: bool) -> MessageRules:
    """
    A route's C{[route.messages]} table (C{table}, empty when absent): the
    rules, with their schemas compiled (L{validator_for}). Schema files are
    relative to C{base_dir} (the configuration's folder).

    @raise ConfigError: naming the key path (C{route[0].messages.schema})
        and, for a schema, the file and what is wrong with it.
    """
    text = table.string("text", "any")
    if text not in TEXT_RULES:
        raise table.error("text", f"expected one of {', '.join(map(repr, TEXT_RULES))}")
    binary = table.string("binary", "any")
    if binary not in BINARY_RULES:
        raise table.error("binary", f"expected one of {', '.join(map(repr, BINARY_RULES))}")
    schemas: dict[str, Path | None] = {}
    for key in ("schema", "upstream_schema"):
        name = table.string(key)
        schemas[key] = base_dir / name if name else None
    if schemas["upstream_schema"] is not None and not gateway:
        raise table.error("upstream_schema", "only applies to routes with an upstream")
    if schemas["schema"] is not None and text == "none":
        raise table.error("schema", 'checks text messages, but text = "none"')
    depth = table.integer("max_json_depth", 32, minimum=1)
    table.finish()
    rules = MessageRules(
        text=text,
        binary=binary,
        schema=schemas["schema"],
        upstream_schema=schemas["upstream_schema"],
        max_json_depth=depth,
    )
    try:
        validator_for(rules)
    except SchemaError as error:
        raise table.error(error.key, str(error)) from None
    return rules
