"""
C{[state]} (txwssec.store.settings): the default (memory), a valid Redis
configuration, and errors naming the key; the URL's password is never in
an error, the settings' repr or their printable location.
"""

from __future__ import annotations

from typing import Any

import pytest

from txwssec.config import parse
from txwssec.errors import ConfigError
from txwssec.store.settings import DEFAULT_STATE


def minimal(**tables: Any) -> dict[str, Any]:
    return {
        "auth": {"key": {}},
        "consumer": [{"name": "john", "keys": ["john-key"]}],
        "route": [{"path": "/echo", "app": "echo", "auth": ["key"]}],
        **tables,
    }


def error(state: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(minimal(state=state))
    return str(caught.value)


def test_memory_is_the_default() -> None:
    assert parse(minimal()).state == DEFAULT_STATE
    state = parse(minimal(state={})).state
    assert (state.backend, state.prefix, state.timeout) == ("memory", "wssec:", 2.0)
    assert state.location == "redis://127.0.0.1:6379/0"


def test_redis_valid() -> None:
    state = parse(
        minimal(
            state={
                "backend": "redis",
                "url": "rediss://app:s3cr%40t@redis.internal:6380/2",
                "prefix": "chat:",
                "timeout": 0.5,
            }
        )
    ).state
    assert (state.backend, state.host, state.port, state.db, state.tls) == (
        "redis",
        "redis.internal",
        6380,
        2,
        True,
    )
    assert (state.username, state.password) == ("app", "s3cr@t")
    assert (state.prefix, state.timeout) == ("chat:", 0.5)
    assert state.location == "rediss://redis.internal:6380/2"
    assert "s3cr" not in repr(state)


def test_redis_url_defaults() -> None:
    state = parse(minimal(state={"backend": "redis", "url": "redis://[::1]"})).state
    assert (state.host, state.port, state.db, state.password) == ("::1", 6379, 0, None)
    assert state.location == "redis://[::1]:6379/0"


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"backend": "etcd"}, 'state.backend: expected "memory" or "redis"'),
        ({"backend": 1}, "state.backend: expected string"),
        ({"url": 6379}, "state.url: expected string"),
        ({"url": "http://127.0.0.1:6379"}, "state.url: expected redis://"),
        ({"url": "redis://"}, "state.url: expected redis://"),
        ({"url": "redis://host:port"}, "state.url: expected redis://"),
        ({"url": "redis://host:6379/zero"}, "state.url: the database must be a number"),
        ({"url": "redis://host:6379/0?timeout=1"}, "state.url: expected no query"),
        ({"prefix": ""}, "state.prefix: expected 1 to 64 printable characters"),
        ({"prefix": 1}, "state.prefix: expected string"),
        ({"timeout": 0}, "state.timeout:"),
        ({"timeout": "1"}, "state.timeout: expected number"),
        ({"hosts": []}, "state.hosts: unknown key"),
    ],
)
def test_errors_name_the_key(state: Any, message: str) -> None:
    assert message in error(state)


def test_a_password_is_never_in_an_error() -> None:
    text = error({"backend": "redis", "url": "redis://:hunter2@host:port"})
    assert text.startswith("state.url:")
    assert "hunter2" not in text
