"""
The revocations made through the supervisor's admin API, kept for the
workers that start later.

With the memory state backend each worker keeps its revocations in its own
memory: a worker that the supervisor starts again (after a crash) would
have forgotten them and accept a revoked token. So the supervisor writes
every revocation that the workers accepted (C{POST /revocations}) to a file
of its private directory (mode 0600), dropping those that have ended, and a
worker applies the file before it listens.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred

from txwssec.revocations import HORIZON

#: At most this many revocations are kept (the oldest ending go first).
MAX_KEPT = 100_000


class KeptRevocations:
    """
    The revocations to give to every new worker, in the file at C{path}.
    """

    def __init__(self, path: str = "") -> None:
        self.path = path
        self._kept: dict[tuple[str, str], dict[str, Any]] = {}

    def add(self, body: Mapping[str, Any], now: float | None = None) -> None:
        """Keep a revocation (the JSON body the workers accepted) and save."""
        now = time.time() if now is None else now
        if set(body) == {"jti", "expires_at"}:
            key, end = ("jti", str(body["jti"])), float(body["expires_at"])
        elif set(body) == {"consumer", "issued_before"}:
            key, end = ("consumer", str(body["consumer"])), float(body["issued_before"]) + HORIZON
        else:
            return
        self._kept[key] = {**body, "until": end}
        live = [item for item in self._kept.items() if item[1]["until"] > now]
        live.sort(key=lambda item: item[1]["until"])
        self._kept = dict(live[-MAX_KEPT:])
        self.save()

    def save(self) -> None:
        """Write the file (atomically: a worker never reads half of it)."""
        if not self.path:
            return
        records = [
            {k: v for k, v in record.items() if k != "until"} for record in self._kept.values()
        ]
        partial = f"{self.path}.new"
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            json.dump(records, out)
        os.replace(partial, self.path)


def apply_kept(path: str, revocations: Any) -> int:
    """
    Apply the kept revocations of the file at C{path} (if any) to a
    worker's L{txwssec.revocations.Revocations}; how many.
    """
    try:
        with open(path, encoding="utf-8") as source:
            records = json.load(source)
    except FileNotFoundError:
        return 0
    for record in records:
        if "jti" in record:
            stored = revocations.revoke_token(record["jti"], float(record["expires_at"]))
        else:
            before = float(record["issued_before"])
            stored = revocations.revoke_consumer(record["consumer"], before)
        if isinstance(stored, Deferred):
            # A shared store (Redis) is not connected yet when a worker
            # starts: it holds the revocations itself and refuses (503)
            # until this worker has loaded them; no unhandled error here.
            stored.addErrback(lambda failure: None)
    return len(records)
