"""
The operations tables of the configuration: C{[admin]}, C{[log]} and
C{[server] health_path}: defaults, valid values, and errors naming the key.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from txwssec.config import parse
from txwssec.errors import ConfigError
from txwssec.ops.settings import DEFAULT_ADMIN_LISTEN

DIGEST = "sha256:" + hashlib.sha256(b"the-admin-token").hexdigest()


def minimal(**tables: Any) -> dict[str, Any]:
    return {
        "auth": {"key": {}},
        "consumer": [{"name": "john", "keys": ["john-key"]}],
        "route": [{"path": "/echo", "app": "echo", "auth": ["key"]}],
        **tables,
    }


def error(**tables: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(minimal(**tables))
    return str(caught.value)


def test_defaults() -> None:
    config = parse(minimal())
    assert config.admin is None  # no [admin]: no admin listener
    assert (config.log.format, config.log.file) == ("text", "-")
    assert config.policy.health_path == ""


def test_admin_defaults_to_loopback_without_token() -> None:
    config = parse(minimal(admin={}))
    assert config.admin is not None
    assert config.admin.listen == DEFAULT_ADMIN_LISTEN == ("tcp:9900:interface=127.0.0.1",)
    assert config.admin.token_digest is None


def test_admin_valid() -> None:
    config = parse(
        minimal(
            admin={
                "listen": ["tcp:9901:interface=0.0.0.0"],
                "token": DIGEST.upper()[:7] + DIGEST[7:],
            }
        )
    )
    assert config.admin is not None
    assert config.admin.listen == ("tcp:9901:interface=0.0.0.0",)
    assert config.admin.token_digest == hashlib.sha256(b"the-admin-token").digest()


@pytest.mark.parametrize(
    "token",
    ["the-admin-token", "sha256:abc", "sha256:" + "g" * 64, "sha1:" + "a" * 64, DIGEST + "00", ""],
)
def test_admin_token_must_be_a_digest(token: str) -> None:
    assert error(admin={"token": token}) == (
        'admin.token: expected "sha256:" and 64 hex digits (the SHA-256 of the token)'
    )


@pytest.mark.parametrize(
    "listen", ["tcp:9900", "tcp:9900:interface=0.0.0.0", "tcp6:9900:interface=\\:\\:"]
)
def test_admin_off_loopback_needs_a_token(listen: str) -> None:
    assert error(admin={"listen": [listen]}).startswith(
        f"admin.listen[0]: {listen!r} is reachable from other hosts: set admin.token"
    )
    assert parse(minimal(admin={"listen": [listen], "token": DIGEST})).admin is not None


@pytest.mark.parametrize("listen", ["unix:/tmp/wssec-admin.sock", "tcp6:0:interface=\\:\\:1"])
def test_admin_on_loopback_or_unix_without_token(listen: str) -> None:
    assert parse(minimal(admin={"listen": [listen]})).admin is not None


@pytest.mark.parametrize(
    "admin,message",
    [
        ({"listen": "tcp:9900"}, "admin.listen: expected"),
        ({"listen": []}, "admin.listen: needs at least one endpoint"),
        ({"listen": ["nonsense:1"]}, "admin.listen[0]: invalid endpoint 'nonsense:1'"),
        ({"token": 5}, "admin.token: expected"),
        ({"tokens": DIGEST}, "admin.tokens"),
        ("x", "admin: expected a table"),
    ],
)
def test_admin_errors(admin: Any, message: str) -> None:
    assert error(admin=admin).startswith(message)


def test_log_valid() -> None:
    config = parse(minimal(log={"format": "json", "file": "/var/log/wssec.log"}))
    assert (config.log.format, config.log.file) == ("json", "/var/log/wssec.log")


@pytest.mark.parametrize(
    "log,message",
    [
        ({"format": "xml"}, 'log.format: expected "text" or "json"'),
        ({"format": 1}, "log.format: expected"),
        ({"file": ""}, 'log.file: expected "-"'),
        ({"file": 1}, "log.file: expected"),
        ({"level": "info"}, "log.level"),
    ],
)
def test_log_errors(log: Any, message: str) -> None:
    assert error(log=log).startswith(message)


def test_health_path() -> None:
    assert parse(minimal(server={"health_path": "/healthz"})).policy.health_path == "/healthz"


@pytest.mark.parametrize("path", ["healthz", "/h?x=1", "/h#x", "/a b", 5])
def test_health_path_errors(path: Any) -> None:
    assert error(server={"health_path": path}).startswith("server.health_path: expected")
