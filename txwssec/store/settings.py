"""
C{[state]}: where the state store lives (L{txwssec.store}).

C{backend = "memory"} (the default) keeps it in this process. C{backend =
"redis"} shares it through a Redis server (C{url}: C{redis://} or, with
TLS, C{rediss://}, C{[user:password@]host[:port][/db]}) under key names
starting with C{prefix}. A password in the URL is never logged: the
settings' L{StateSettings.location} leaves it out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from txwssec._schema import Table

#: The backends C{[state] backend} takes.
BACKENDS = ("memory", "redis")

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "wssec:"


@dataclass(frozen=True)
class StateSettings:
    """
    C{[state]}, read.

    @ivar backend: C{"memory"} or C{"redis"}.
    @ivar host: the Redis host; C{port}, C{db}, C{tls} likewise.
    @ivar username: the Redis ACL user, if the URL names one.
    @ivar password: the Redis password, if the URL has one (never logged).
    @ivar prefix: the start of every key and channel name.
    @ivar timeout: seconds a Redis call may take before the handshake that
        waits for it gets 503 (and the connection is made again).
    """

    backend: str = "memory"
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    prefix: str = DEFAULT_PREFIX
    timeout: float = 2.0

    @property
    def location(self) -> str:
        """The URL without its credentials: what the log may show."""
        scheme = "rediss" if self.tls else "redis"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.db}"


DEFAULT_STATE = StateSettings()


def state_settings(table: Table) -> StateSettings:
    """Read C{[state]}: errors name C{state.backend}, C{state.url}..."""
    backend = table.string("backend", "memory")
    if backend not in BACKENDS:
        raise table.error("backend", 'expected "memory" or "redis"')
    url = table.string("url", DEFAULT_URL)
    prefix = table.string("prefix", DEFAULT_PREFIX)
    if not 0 < len(prefix) <= 64 or not prefix.isprintable():
        raise table.error("prefix", "expected 1 to 64 printable characters")
    timeout = table.number("timeout", 2.0, minimum=0.05)
    table.finish()
    try:
        parsed = _parse_url(url)
    except ValueError as error:
        raise table.error("url", str(error)) from None
    if backend == "redis":
        try:
            import txredisapi  # type: ignore[import-untyped]  # noqa: F401
        except ImportError:
            raise table.error(
                "backend", "redis needs txredisapi: pip install 'txwssec[redis]'"
            ) from None
    return StateSettings(backend, prefix=prefix, timeout=timeout, **parsed)


def _parse_url(url: str) -> dict[str, Any]:
    """C{redis://[user:password@]host[:port][/db]} (or C{rediss://}) as settings."""
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError:
        raise ValueError("expected redis://[user:password@]host[:port][/db]") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("expected redis://[user:password@]host[:port][/db] (or rediss://)")
    if parts.query or parts.fragment:
        raise ValueError("expected no query or fragment")
    path = parts.path.strip("/")
    if path and not (path.isdigit() and int(path) < 100_000):
        raise ValueError("the database must be a number, as in redis://host:6379/0")
    return {
        "host": parts.hostname,
        "port": port,
        "db": int(path) if path else 0,
        "tls": parts.scheme == "rediss",
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password is not None else None,
    }
