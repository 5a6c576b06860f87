"""
The operations tables of the configuration: C{[admin]} (the admin listener
and its token) and C{[log]} (the log's format and file), read from TOML into
values with errors that name the key path.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from txwssec._schema import Table
from txwssec.errors import ConfigError
from txwssec.listen import Description

#: Where the admin listener listens unless told: loopback only.
DEFAULT_ADMIN_LISTEN = ("tcp:9900:interface=127.0.0.1",)

#: The log formats.
LOG_FORMATS = ("text", "json")

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class AdminSettings:
    """
    C{[admin]}: the admin listener.

    @ivar listen: listen descriptions (loopback by default).
    @ivar token_digest: the SHA-256 digest of the admin token (32 bytes),
        or L{None}: then the endpoints that need the token answer 403.
    """

    listen: tuple[str, ...] = DEFAULT_ADMIN_LISTEN
    token_digest: bytes | None = None


@dataclass(frozen=True)
class LogSettings:
    """
    C{[log]}: C{format} (C{"text"} or C{"json"}) and C{file} (C{"-"}: twistd's
    log; or a path, reopened on SIGUSR1).
    """

    format: str = "text"
    file: str = "-"


#: The default C{[log]}.
DEFAULT_LOG = LogSettings()


def parse_token_digest(text: str) -> bytes:
    """
    The digest of C{"sha256:<64 lowercase hex digits>"}.

    @raise ValueError: any other text.
    """
    match = _DIGEST.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError('expected "sha256:" and 64 hex digits (the SHA-256 of the token)')
    return bytes.fromhex(match.group(1))


def is_loopback(description: Description) -> bool:
    """Whether a listener is reachable from this host only (loopback, UNIX)."""
    if description.kind == "unix":
        return True
    if description.kind == "systemd":
        return description.kwargs.get("domain") == "UNIX"
    interface = description.kwargs.get("interface", "")
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def admin_settings(
    table: Table,
    check: Callable[[str], object] = Description.parse,
    resolve: Callable[[str], str] = str,
) -> AdminSettings:
    """
    Read C{[admin]}. A listener off loopback needs a token: without one the
    configuration is refused (the admin API is never open by default).
    C{check} raises for a description that is not a valid endpoint;
    C{resolve} gives a description its file names as the listener opens
    them (L{txwssec.listen.resolve_files}).
    """
    listen = tuple(resolve(text) for text in table.strings("listen", DEFAULT_ADMIN_LISTEN))
    if not listen:
        raise table.error("listen", "needs at least one endpoint")
    digest = None
    if table.has("token"):
        try:
            digest = parse_token_digest(table.string("token"))
        except ValueError as error:
            raise table.error("token", str(error)) from None
    table.finish()
    for index, text in enumerate(listen):
        where = f"{table.key_path('listen')}[{index}]"
        try:
            check(text)
            description = Description.parse(text)
        except Exception as error:
            raise ConfigError(where, f"invalid endpoint {text!r}: {error}") from None
        if digest is None and not is_loopback(description):
            raise ConfigError(
                where,
                f"{text!r} is reachable from other hosts: set admin.token "
                '("sha256:<hex>") or listen on a loopback interface',
            )
    return AdminSettings(listen, digest)


def log_settings(table: Table) -> LogSettings:
    """Read C{[log]}."""
    format = table.string("format", "text")
    if format not in LOG_FORMATS:
        raise table.error("format", 'expected "text" or "json"')
    file = table.string("file", "-")
    if not file:
        raise table.error("file", 'expected "-" (twistd\'s log) or a path')
    table.finish()
    return LogSettings(format, file)


def health_path(table: Table) -> str:
    """C{[server] health_path}: empty (off) or an absolute path, no query."""
    path = table.string("health_path", "")
    if path and (
        not path.startswith("/") or any(c in path for c in "?# ") or not path.isprintable()
    ):
        raise table.error("health_path", 'expected "" or a path like "/healthz" (no query)')
    return path
