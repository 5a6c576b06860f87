"""
The JSON log (C{[log] format = "json"}): one flat JSON object per line.

Two pieces:

- L{JSONEventObserver}, an observer of a server's events
  (L{txwssec.events}) that puts each event in the Twisted log as it is: its
  name and its named fields (in place of the text lines of
  L{txwssec.observers.TextLogObserver});
- L{JSONFormatter}, the formatter of a L{twisted.logger.FileLogObserver}
  that writes every log event as one line: C{time} (ISO 8601, UTC),
  C{level}, C{event} and C{namespace} first, then the event's fields. Log
  events that are not txwssec events (twistd's own lines, "listening
  on ...") get C{"event": "log"} and their text in C{message}. A failure
  becomes C{error} (its type and message, bounded) and C{traceback}.

No credential is ever a field of an event, so none reaches this log.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from txwssec import events
from txwssec.logs import bounded, textLogObserver, twistdLogObserver

#: The key under which a txwssec event's name travels in a Twisted log event.
EVENT_KEY = "wssec_event"
#: The key of its fields.
FIELDS_KEY = "wssec_fields"

_server = Logger(namespace="txwssec.server")
_gateway = Logger(namespace="txwssec.proxy")

#: Events logged above C{info}.
_LEVELS: Mapping[str, LogLevel] = {
    events.HANDSHAKE_ERROR: LogLevel.error,
    events.APPLICATION_ERROR: LogLevel.error,
    events.UPSTREAM_FAILED: LogLevel.warn,
    events.UPSTREAM_LOST: LogLevel.warn,
}


class JSONEventObserver:
    """
    Puts every event of a server in the Twisted log, for L{JSONFormatter}:
    namespace C{txwssec.proxy} for the gateway's upstream events,
    C{txwssec.server} for the others.
    """

    __slots__ = ()

    def __call__(self, event: str, fields: Mapping[str, Any]) -> None:
        logger = _gateway if event.startswith("upstream.") else _server
        level = _LEVELS.get(event, LogLevel.info)
        logger.emit(level, "{wssec_event}", wssec_event=event, wssec_fields=dict(fields))


class JSONFormatter:
    """Formats a Twisted log event as one flat JSON object and a newline."""

    def __call__(self, event: LogEvent) -> str:
        when = event.get("log_time")
        level = event.get("log_level")
        line: dict[str, Any] = {
            "time": _iso(when),
            "level": level.name if level is not None else "info",
        }
        name = event.get(EVENT_KEY)
        fields = event.get(FIELDS_KEY)
        if isinstance(name, str) and isinstance(fields, Mapping):
            line["event"] = name
            line["namespace"] = event.get("log_namespace", "-")
            for key, value in fields.items():
                if isinstance(value, Failure):
                    _failure(line, value)
                elif key not in line:
                    line[key] = value
        else:
            line["event"] = "log"
            line["namespace"] = event.get("log_namespace", "-")
            line["message"] = formatEvent(event)
            failure = event.get("log_failure")
            if isinstance(failure, Failure):
                _failure(line, failure)
        return json.dumps(line, default=str, ensure_ascii=False, separators=(",", ":")) + "\n"


def _iso(when: float | None) -> str:
    if when is None:
        return ""
    stamp = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _failure(line: dict[str, Any], failure: Failure) -> None:
    kind = failure.type.__name__ if failure.type is not None else "Exception"
    line["error"] = f"{kind}: {bounded(failure.value)}"
    line["traceback"] = failure.getTraceback()


def jsonFileLogObserver(outFile: IO[Any]) -> ILogObserver:
    """A L{FileLogObserver} writing JSON lines to C{outFile}."""
    return FileLogObserver(outFile, JSONFormatter())


def reopening_log_file(path: str) -> Any:
    """
    The log file at C{path}, never rotated by size, reopened on SIGUSR1 (for
    logrotate's "move, then signal").
    """
    log_file = LogFile.fromFullPath(path, rotateLength=None)
    if hasattr(signal, "SIGUSR1"):

        def reopen(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.reopen)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, reopen)
    return log_file


def log_observer(format: str, file: str, twistdOptions: Any) -> ILogObserver | None:
    """
    The observer of C{twistd wssec}'s log for C{[log]}: in C{format}
    (C{"text"} or C{"json"}), to twistd's log file (C{file = "-"}) or to
    the file at C{file}.

    @return: L{None} when twistd's own observer must be used (C{--syslog},
        C{--logger}; see L{twistdLogObserver}).
    """
    if file != "-":
        out = reopening_log_file(file)
        if format == "json":
            return jsonFileLogObserver(out)
        return textLogObserver(out)
    if format == "json":
        return twistdLogObserver(twistdOptions, jsonFileLogObserver)
    return twistdLogObserver(twistdOptions)


__all__ = [
    "JSONEventObserver",
    "JSONFormatter",
    "jsonFileLogObserver",
    "log_observer",
    "reopening_log_file",
]
