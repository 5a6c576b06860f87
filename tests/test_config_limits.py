"""
The abuse-limit keys of the configuration (issue 5): C{[server]}
auth_failures_per_minute, ping_interval, ping_timeout, max_header_bytes,
max_headers; C{[[route]]} compression; every C{[route.limits]} key. Each is
read into the right L{ServerPolicy} / L{RoutePolicy} / L{RouteLimits} value,
and every mistake is a L{ConfigError} naming its exact key path.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import pytest

from txwssec.config import load, parse
from txwssec.errors import ConfigError
from txwssec.policy import DEFAULT_MAX_BUFFERED_BYTES, RouteLimits

#: Every [route.limits] key, with its TOML type as named in errors.
LIMIT_KEYS = {
    "messages_per_second": "number",
    "burst": "integer",
    "bytes_per_second": "number",
    "consumer_messages_per_second": "number",
    "consumer_bytes_per_second": "number",
    "connections_per_consumer": "integer",
    "max_buffered_bytes": "integer",
    "max_fragments": "integer",
    "max_pending_control_frames": "integer",
}

#: The new [server] keys, with their TOML type and smallest allowed value.
SERVER_KEYS = {
    "auth_failures_per_minute": ("integer", 0),
    "ping_interval": ("number", 0),
    "ping_timeout": ("number", 0.1),
    "max_header_bytes": ("integer", 1024),
    "max_headers": ("integer", 10),
    "gc_young_threshold": ("integer", 0),
}


def config(
    server: dict[str, Any] | None = None,
    limits: Any = None,
    **route: Any,
) -> dict[str, Any]:
    """One anonymous echo route, with C{[server]}, route keys and limits."""
    table: dict[str, Any] = {"path": "/echo", "app": "echo", "auth": ["anonymous"], **route}
    if limits is not None:
        table["limits"] = limits
    data: dict[str, Any] = {"route": [table]}
    if server is not None:
        data["server"] = server
    return data


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(data)
    return str(caught.value)


# -- defaults and values ------------------------------------------------------


def test_defaults() -> None:
    """Omitted keys give the safe defaults of ServerPolicy / RouteLimits."""
    policy = parse(config()).policy
    assert policy.auth_failures_per_minute == 10
    assert (policy.ping_interval, policy.ping_timeout) == (30, 10)
    assert (policy.max_header_bytes, policy.max_headers) == (16384, 100)
    (route,) = policy.routes
    assert route.compression is False
    assert route.limits == RouteLimits()
    assert route.limits == RouteLimits(
        messages_per_second=0,
        burst=0,
        bytes_per_second=0,
        consumer_messages_per_second=0,
        consumer_bytes_per_second=0,
        connections_per_consumer=0,
        max_buffered_bytes=4 * 1024 * 1024,
        max_fragments=1024,
        max_pending_control_frames=32,
    )
    # An empty [route.limits] is the same as none.
    assert parse(config(limits={})).policy.routes[0].limits == RouteLimits()


def test_server_keys() -> None:
    policy = parse(
        config(
            {
                "auth_failures_per_minute": 3,
                "ping_interval": 2.5,
                "ping_timeout": 1,
                "max_header_bytes": 4096,
                "max_headers": 20,
            }
        )
    ).policy
    assert policy.auth_failures_per_minute == 3
    assert policy.ping_interval == 2.5
    assert policy.ping_timeout == 1.0
    assert isinstance(policy.ping_timeout, float)  # an integer is a number
    assert (policy.max_header_bytes, policy.max_headers) == (4096, 20)
    # ...and they reach Autobahn.
    options = policy.protocol_options()
    assert (options["autoPingInterval"], options["autoPingTimeout"]) == (2.5, 1.0)


def test_gc_young_threshold() -> None:
    """
    twistd wssec tunes the cycle collector by default (50,000); 0 leaves it
    as Python set it.
    """
    assert parse(config()).gc_young_threshold == 50_000
    assert parse(config({"gc_young_threshold": 0})).gc_young_threshold == 0
    assert parse(config({"gc_young_threshold": 2000})).gc_young_threshold == 2000


def test_zero_turns_server_limits_off() -> None:
    policy = parse(config({"auth_failures_per_minute": 0, "ping_interval": 0})).policy
    assert (policy.auth_failures_per_minute, policy.ping_interval) == (0, 0)


def test_every_limit_key() -> None:
    limits = {
        "messages_per_second": 5,
        "burst": 7,
        "bytes_per_second": 1024.5,
        "consumer_messages_per_second": 9,
        "consumer_bytes_per_second": 4096,
        "connections_per_consumer": 2,
        "max_buffered_bytes": 65536,
        "max_fragments": 16,
        "max_pending_control_frames": 4,
    }
    assert set(limits) == set(LIMIT_KEYS)
    parsed = parse(config(limits=limits)).policy.routes[0].limits
    assert parsed == RouteLimits(
        messages_per_second=5.0,
        burst=7,
        bytes_per_second=1024.5,
        consumer_messages_per_second=9.0,
        consumer_bytes_per_second=4096.0,
        connections_per_consumer=2,
        max_buffered_bytes=65536,
        max_fragments=16,
        max_pending_control_frames=4,
    )
    for key, kind in LIMIT_KEYS.items():
        assert isinstance(getattr(parsed, key), float if kind == "number" else int), key


@pytest.mark.parametrize("key", sorted(LIMIT_KEYS))
def test_each_limit_key_alone(key: str) -> None:
    """Setting one key changes that field only."""
    parsed = parse(config(limits={key: 3})).policy.routes[0].limits
    expected = {field: getattr(RouteLimits(), field) for field in LIMIT_KEYS}
    expected[key] = 3
    assert {field: getattr(parsed, field) for field in LIMIT_KEYS} == expected


def test_zero_turns_route_limits_off() -> None:
    limits = dict.fromkeys(LIMIT_KEYS, 0)
    assert parse(config(limits=limits)).policy.routes[0].limits == RouteLimits(
        max_buffered_bytes=0, max_fragments=0, max_pending_control_frames=0
    )


@pytest.mark.parametrize("value", [True, False])
def test_compression(value: bool) -> None:
    assert parse(config(compression=value)).policy.routes[0].compression is value


def test_limits_belong_to_their_route() -> None:
    """Limits and compression set on one route leave the other at defaults."""
    data = config()
    data["route"].append(
        {
            "path": "/fast",
            "app": "echo",
            "auth": ["anonymous"],
            "compression": True,
            "limits": {"messages_per_second": 100, "max_buffered_bytes": 1024},
        }
    )
    echo, fast = parse(data).policy.routes
    assert (echo.compression, echo.limits) == (False, RouteLimits())
    assert fast.compression is True
    assert fast.limits == RouteLimits(messages_per_second=100, max_buffered_bytes=1024)
    assert DEFAULT_MAX_BUFFERED_BYTES == 4 * 1024 * 1024


def test_toml_file(tmp_path: Path) -> None:
    """[route.limits] after a [[route]] belongs to that route, in a real file."""
    path = tmp_path / "wssec.toml"
    path.write_text(
        textwrap.dedent(
            """
            [server]
            auth_failures_per_minute = 5
            ping_interval = 20
            ping_timeout = 5
            max_header_bytes = 8192
            max_headers = 50

            [[route]]
            path = "/echo"
            app = "echo"
            auth = ["anonymous"]

            [[route]]
            path = "/chat"
            app = "echo"
            auth = ["anonymous"]
            compression = true

            [route.limits]
            messages_per_second = 10
            burst = 20
            max_buffered_bytes = 1048576
            """
        )
    )
    policy = load(path).policy
    assert (policy.auth_failures_per_minute, policy.ping_interval, policy.ping_timeout) == (
        5,
        20.0,
        5.0,
    )
    assert (policy.max_header_bytes, policy.max_headers) == (8192, 50)
    echo, chat = policy.routes
    assert echo.limits == RouteLimits() and echo.compression is False
    assert chat.compression is True
    assert chat.limits == RouteLimits(
        messages_per_second=10, burst=20, max_buffered_bytes=1024 * 1024
    )


def test_toml_file_error_names_the_second_route(tmp_path: Path) -> None:
    """The contract's own example: route[1].limits.burst: expected integer."""
    path = tmp_path / "wssec.toml"
    path.write_text(
        textwrap.dedent(
            """
            [[route]]
            path = "/echo"
            app = "echo"
            auth = ["anonymous"]

            [[route]]
            path = "/chat"
            app = "echo"
            auth = ["anonymous"]

            [route.limits]
            burst = "20"
            """
        )
    )
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value) == "route[1].limits.burst: expected integer"
    assert caught.value.path == "route[1].limits.burst"


# -- wrong types ------------------------------------------------------------------

#: A value of each TOML type, and which types each key type rejects.
SAMPLES: dict[str, Any] = {
    "string": "5",
    "boolean": True,
    "float": 1.5,
    "array": [5],
    "table": {"a": 5},
}
REJECTED = {
    "integer": ["string", "boolean", "float", "array", "table"],
    "number": ["string", "boolean", "array", "table"],
    "boolean": ["string", "float", "array", "table"],
}


def _cases_limits() -> list[Any]:
    return [
        pytest.param(key, kind, sample, id=f"{key}-{sample}")
        for key, kind in sorted(LIMIT_KEYS.items())
        for sample in REJECTED[kind]
    ]


@pytest.mark.parametrize(("key", "kind", "sample"), _cases_limits())
def test_limit_wrong_type(key: str, kind: str, sample: str) -> None:
    message = error_of(config(limits={key: SAMPLES[sample]}))
    assert message == f"route[0].limits.{key}: expected {kind}"


def test_integer_one_is_not_true() -> None:
    """TOML booleans are not integers (Python's bool is an int)."""
    assert error_of(config(limits={"burst": True})) == "route[0].limits.burst: expected integer"
    assert parse(config(limits={"burst": 1})).policy.routes[0].limits.burst == 1


def _cases_server() -> list[Any]:
    return [
        pytest.param(key, kind, sample, id=f"{key}-{sample}")
        for key, (kind, _) in sorted(SERVER_KEYS.items())
        for sample in REJECTED[kind]
    ]


@pytest.mark.parametrize(("key", "kind", "sample"), _cases_server())
def test_server_wrong_type(key: str, kind: str, sample: str) -> None:
    assert error_of(config({key: SAMPLES[sample]})) == f"server.{key}: expected {kind}"


@pytest.mark.parametrize("sample", REJECTED["boolean"] + ["integer"])
def test_compression_wrong_type(sample: str) -> None:
    value = 1 if sample == "integer" else SAMPLES[sample]
    assert error_of(config(compression=value)) == "route[0].compression: expected boolean"


def test_limits_must_be_a_table() -> None:
    assert error_of(config(limits=5)) == "route[0].limits: expected a table"
    assert error_of(config(limits=[{"burst": 1}])) == "route[0].limits: expected a table"


# -- out of range ---------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(LIMIT_KEYS))
def test_negative_limit(key: str) -> None:
    assert error_of(config(limits={key: -1})) == f"route[0].limits.{key}: must be at least 0"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("auth_failures_per_minute", -1, "must be at least 0"),
        ("ping_interval", -0.5, "must be at least 0"),
        ("ping_timeout", 0, "must be at least 0.1"),
        ("ping_timeout", 0.05, "must be at least 0.1"),
        ("max_header_bytes", 1023, "must be at least 1024"),
        ("max_headers", 9, "must be at least 10"),
        ("gc_young_threshold", -1, "must be at least 0"),
    ],
)
def test_server_minimums(key: str, value: float, message: str) -> None:
    assert error_of(config({key: value})) == f"server.{key}: {message}"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("auth_failures_per_minute", 0),
        ("ping_interval", 0),
        ("ping_timeout", 0.1),
        ("max_header_bytes", 1024),
        ("max_headers", 10),
    ],
)
def test_server_minimums_are_allowed(key: str, value: float) -> None:
    assert getattr(parse(config({key: value})).policy, key) == value


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        ("server", "handshake_timeout", math.nan),
        ("server", "handshake_timeout", math.inf),
        ("server", "ping_timeout", math.nan),
        ("server", "ping_interval", math.inf),
        ("limits", "messages_per_second", math.nan),
        ("limits", "bytes_per_second", math.inf),
    ],
    ids=lambda value: str(value),
)
def test_non_finite_numbers_are_refused(where: str, key: str, value: float) -> None:
    """
    TOML has nan and inf. handshake_timeout = nan makes every connection
    fail an assertion in callLater; inf turns a timeout or a rate limit off
    without saying so (0 is the documented "off").
    """
    data = config({key: value}) if where == "server" else config(limits={key: value})
    prefix = "server" if where == "server" else "route[0].limits"
    assert error_of(data) == f"{prefix}.{key}: must be a finite number (0 turns it off)"


# -- unknown keys -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (config(limits={"bogus": 1}), "route[0].limits.bogus: unknown key"),
        (config(limits={"burst": 1, "Burst": 1}), "route[0].limits.Burst: unknown key"),
        (config(limits={"max_message_size": 1}), "route[0].limits.max_message_size: unknown key"),
        (config(limits={"idle_timeout": 1}), "route[0].limits.idle_timeout: unknown key"),
        # A limit key one level too high (in [[route]] instead of [route.limits]).
        (config(burst=5), "route[0].burst: unknown key"),
        (config(max_buffered_bytes=5), "route[0].max_buffered_bytes: unknown key"),
        # Route limits in [server], server keys in a route.
        (config({"messages_per_second": 5}), "server.messages_per_second: unknown key"),
        (config(ping_interval=5), "route[0].ping_interval: unknown key"),
        (config(limits={"ping_timeout": 5}), "route[0].limits.ping_timeout: unknown key"),
        (config({"compression": True}), "server.compression: unknown key"),
    ],
)
def test_unknown_keys(data: dict[str, Any], message: str) -> None:
    assert error_of(data) == message


def test_unknown_key_in_second_route_limits() -> None:
    data = config()
    data["route"].append(
        {"path": "/b", "app": "echo", "auth": ["anonymous"], "limits": {"bogus": 1}}
    )
    assert error_of(data) == "route[1].limits.bogus: unknown key"
