"""
The log of C{[server] workers}: one log, in the configured format, that
the supervisor and every worker write themselves.

Where the supervisor's log goes (L{destination}): the file of C{[log]
file}, twistd's C{--logfile}, or standard output (C{twistd -n}). Each
worker writes its own lines there, in whole lines
(L{txwssec.logs.LineFile}: a file opened with C{O_APPEND}, or the
supervisor's standard output inherited), each naming its worker: text
lines C{[NAMESPACE#LEVEL worker=INDEX pid=PID]}, JSON lines a last field
C{worker_pid}. Nothing is relayed through the supervisor (a relay cost
about 110 us of the supervisor's CPU per line, a line per session).

SIGUSR1: the supervisor reopens C{[log] file} (after logrotate moved it)
or rotates twistd's C{--logfile} as twistd does (C{.1}, C{.2}...), then
passes SIGUSR1 on: each worker reopens the file. Each process then writes
C{Log file reopened on SIGUSR1} (C{rotated}, for the supervisor with
twistd's C{--logfile}) as the new file's first line of its own, so an
operator (or a test) sees that every process has moved to the new file.

With C{--syslog} or C{--logger} (no file that several processes can
share), the workers' lines go to the supervisor as before
(L{txwssec.workers.worker.LogLines}).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.logger import ILogObserver

from txwssec.logs import LineFile, textLogObserver, twistdLogPath
from txwssec.ops.jsonlog import JSONEventObserver, jsonFileLogObserver
from txwssec.ops.settings import LogSettings

#: L{destination}'s answer for the standard output.
STDOUT = "-"


def destination(log: LogSettings, twistdOptions: Any) -> str | None:
    """
    Where the log goes: a file's absolute path, L{STDOUT}, or L{None}
    (C{--syslog}, C{--logger}, or no twistd options: relay the workers'
    lines through the supervisor).
    """
    if log.file != "-":
        return os.path.abspath(log.file)
    where = twistdLogPath(twistdOptions)
    if where is None or where == STDOUT:
        return where
    return os.path.abspath(where)


def line_file(where: str) -> LineFile:
    """The L{LineFile} of a L{destination} (standard output: descriptor 1)."""
    return LineFile(fd=1) if where == STDOUT else LineFile(path=where)


def observer(
    format: str,
    out: LineFile,
    events: JSONEventObserver | None = None,
    system: str = "",
    extra: Mapping[str, Any] | None = None,
) -> ILogObserver:
    """
    The log observer writing to C{out} in C{format} (a JSON log's C{events}
    observer writes its lines to C{out} too); C{system} is added to each
    text line's system, C{extra} last to each JSON line.
    """
    if format == "json":
        if events is not None:
            events.writeTo(out, extra=extra)
        return jsonFileLogObserver(out, extra)  # type: ignore[arg-type]
    return textLogObserver(out, system)  # type: ignore[arg-type]
