"""
A strict reader for TOML tables: typed getters that name the key path in
every error, and a final check that no unknown key was left unread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from txwssec.errors import ConfigError

_TYPE_NAMES = {str: "string", int: "integer", bool: "boolean", float: "number", list: "array"}


class Table:
    """
    One TOML table being read. Every getter records the key as known;
    L{finish} raises for any key that no getter asked for.
    """

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path, "expected a table")
        self.data: Mapping[str, Any] = data
        self.path = path
        self._known: set[str] = set()

    def key_path(self, key: str) -> str:
        """The dotted path of C{key} in this table."""
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ConfigError:
        """A L{ConfigError} naming C{key} of this table."""
        return ConfigError(self.key_path(key), message)

    def has(self, key: str) -> bool:
        """Whether C{key} is present (marks it known)."""
        self._known.add(key)
        return key in self.data

    def _get(self, key: str, kind: type, default: Any, required: bool) -> Any:
        self._known.add(key)
        if key not in self.data:
            if required:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.error(key, f"expected {_TYPE_NAMES[kind]}")
        return value

    def string(self, key: str, default: str = "", *, required: bool = False) -> str:
        """A string value."""
        value: str = self._get(key, str, default, required)
        return value

    def boolean(self, key: str, default: bool = False) -> bool:
        """A boolean value."""
        value: bool = self._get(key, bool, default, False)
        return value

    def integer(
        self, key: str, default: int = 0, *, minimum: int | None = 0, required: bool = False
    ) -> int:
        """An integer value, at least C{minimum} (non-negative by default)."""
        value: int = self._get(key, int, default, required)
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}")
        return value

    def number(self, key: str, default: float = 0.0, *, minimum: float = 0.0) -> float:
        """An integer or float value, finite and at least C{minimum}."""
        value: float = self._get(key, float, default, False)
        if not math.isfinite(value):
            # TOML has nan and inf; 0 is how a limit or timeout is turned off.
            raise self.error(key, "must be a finite number (0 turns it off)")
        if value < minimum:
            raise self.error(key, f"must be at least {minimum:g}")
        return value

    def strings(
        self, key: str, default: tuple[str, ...] = (), *, required: bool = False
    ) -> tuple[str, ...]:
        """A list of strings. A single string is not accepted."""
        value = self._get(key, list, list(default), required)
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{self.key_path(key)}[{index}]", "expected string")
        return tuple(value)

    def table(self, key: str) -> Table:
        """A sub-table (empty when absent)."""
        self._known.add(key)
        return Table(self.data.get(key, {}), self.key_path(key))

    def tables(self, key: str) -> list[Table]:
        """An array of tables (C{[[key]]}), each with an indexed path."""
        self._known.add(key)
        value = self.data.get(key, [])
        if not isinstance(value, list):
            raise self.error(key, "expected an array of tables")
        return [Table(item, f"{self.key_path(key)}[{i}]") for i, item in enumerate(value)]

    def finish(self) -> None:
        """Raise for the first key that no getter asked for."""
        for key in self.data:
            if key not in self._known:
                raise self.error(key, "unknown key")
