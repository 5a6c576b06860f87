"""
Readiness: the checks C{GET /readyz} runs (see L{txwssec.ops}). Anything
a server depends on (its listeners, a JWKS fetcher, a networked state
store) adds a check to its factory's L{Readiness}: a callable that answers
L{None} when ready, or a short reason (no secrets: it is shown to whoever
can reach the admin listener).
"""

from __future__ import annotations

from collections.abc import Callable

#: A readiness check: L{None} when ready, else a short reason.
Check = Callable[[], "str | None"]


class Readiness:
    """Named readiness checks, run in the order they were added."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}

    def add(self, name: str, check: Check) -> None:
        """Add (or replace) the check called C{name}."""
        self._checks[name] = check

    def remove(self, name: str) -> None:
        """Remove the check called C{name}, if there is one."""
        self._checks.pop(name, None)

    def reasons(self) -> list[str]:
        """
        Why the server is not ready: one C{"<name>: <reason>"} per check that
        is not (a check that raises counts as not ready); empty when ready.
        """
        reasons = []
        for name, check in list(self._checks.items()):
            try:
                reason = check()
            except Exception as error:
                reason = f"check failed ({type(error).__name__})"
            if reason is not None:
                reasons.append(f"{name}: {reason}")
        return reasons
