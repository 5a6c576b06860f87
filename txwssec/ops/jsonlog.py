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
import time
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

from txwssec import events
from txwssec.logs import TwistdLogFile, bounded, on_usr1, textLogObserver, twistdLogObserver

#: The key under which a txwssec event's name travels in a Twisted log event.
EVENT_KEY = "wssec_event"
#: The key of its fields.
FIELDS_KEY = "wssec_fields"

_server = Logger(namespace="txwssec.server")
_gateway = Logger(namespace="txwssec.proxy")

#: Events the JSON log leaves out: C{session.opened} has their fields.
_UNLOGGED = frozenset({events.HANDSHAKE_ACCEPTED})

#: Events logged above C{info}.
_LEVELS: Mapping[str, LogLevel] = {
    events.HANDSHAKE_ERROR: LogLevel.error,
    events.APPLICATION_ERROR: LogLevel.error,
    events.UPSTREAM_FAILED: LogLevel.warn,
    events.UPSTREAM_LOST: LogLevel.warn,
    events.UPSTREAM_WSSEC_DROPPED: LogLevel.warn,
    events.CONFIG_RELOAD_FAILED: LogLevel.error,
}


class JSONEventObserver:
    """
    Puts every event of a server in the log, for L{JSONFormatter}:
    namespace C{txwssec.proxy} for the gateway's upstream events,
    C{txwssec.server} for the others.

    Until L{writeTo} is called, each event goes through the Twisted log (to
    whatever observes it); after, its line is written straight to the
    JSON log's file, which is several times cheaper per event (the file
    that C{twistd wssec}'s log observer writes to, so that the lines stay
    in order).
    """

    __slots__ = ("_lines",)

    def __init__(self) -> None:
        self._lines: JSONLines | None = None

    def writeTo(
        self, out: IO[Any] | Any, reactor: Any = None, extra: Mapping[str, Any] | None = None
    ) -> None:
        """
        Write the lines to C{out} (a file, or a L{LogFile}) from now on, with
        the fields of C{extra} last (a worker's C{worker_pid}).
        """
        self._lines = JSONLines(out, reactor, extra)

    def __call__(self, event: str, fields: Mapping[str, Any]) -> None:
        if event in _UNLOGGED:
            return
        namespace = "txwssec.proxy" if event.startswith("upstream.") else "txwssec.server"
        level = _LEVELS.get(event, LogLevel.info)
        lines = self._lines
        if lines is not None:
            lines.write(level.name, event, namespace, fields)
            return
        logger = _gateway if namespace == "txwssec.proxy" else _server
        logger.emit(level, "{wssec_event}", wssec_event=event, wssec_fields=dict(fields))


class JSONLines:
    """
    Writes txwssec events as JSON lines to a file, flushed once per turn of
    the reactor (a line is out before the reactor waits again; a burst of
    sessions costs one write).
    """

    __slots__ = ("_clock", "_extra", "_flush", "_pending", "_reactor", "_write")

    def __init__(
        self, out: IO[Any] | Any, reactor: Any = None, extra: Mapping[str, Any] | None = None
    ) -> None:
        self._extra = extra
        self._write = out.write
        self._flush = out.flush
        self._clock = _Clock()
        self._pending = False
        self._reactor = reactor

    def write(self, level: str, event: str, namespace: str, fields: Mapping[str, Any]) -> None:
        line = {
            "time": self._clock.stamp(time.time()),
            "level": level,
            "event": event,
            "namespace": namespace,
        }
        _add_fields(line, fields)
        if self._extra:
            line.update(self._extra)
        self._write(_dumps(line) + "\n")
        if not self._pending:
            self._pending = True
            reactor = self._reactor
            if reactor is None:
                from twisted.internet import reactor
            reactor.callLater(0, self._flushNow)

    def _flushNow(self) -> None:
        self._pending = False
        self._flush()


class JSONFormatter:
    """Formats a Twisted log event as one flat JSON object and a newline."""

    def __init__(self, extra: Mapping[str, Any] | None = None) -> None:
        self._clock = _Clock()
        #: Fields added last to every line (a worker's C{worker_pid}).
        self._extra = extra

    def __call__(self, event: LogEvent) -> str:
        when = event.get("log_time")
        level = event.get("log_level")
        line: dict[str, Any] = {
            "time": self._clock.stamp(when) if when is not None else "",
            "level": level.name if level is not None else "info",
        }
        name = event.get(EVENT_KEY)
        fields = event.get(FIELDS_KEY)
        if isinstance(name, str) and isinstance(fields, Mapping):
            line["event"] = name
            line["namespace"] = event.get("log_namespace", "-")
            _add_fields(line, fields)
        else:
            line["event"] = "log"
            line["namespace"] = event.get("log_namespace", "-")
            line["message"] = formatEvent(event)
            failure = event.get("log_failure")
            if isinstance(failure, Failure):
                _failure(line, failure)
        if self._extra:
            line.update(self._extra)
        return _dumps(line) + "\n"


_dumps = json.JSONEncoder(default=str, ensure_ascii=False, separators=(",", ":")).encode


def _add_fields(line: dict[str, Any], fields: Mapping[str, Any]) -> None:
    for key, value in fields.items():
        if isinstance(value, Failure):
            _failure(line, value)
        elif key not in line:
            line[key] = value


class _Clock:
    """ISO 8601 UTC times with milliseconds, the date part made once a second."""

    __slots__ = ("_second", "_stamp")

    def __init__(self) -> None:
        self._second = -1
        self._stamp = ""

    def stamp(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._stamp}.{int((when - second) * 1000):03d}Z"


def _failure(line: dict[str, Any], failure: Failure) -> None:
    kind = failure.type.__name__ if failure.type is not None else "Exception"
    line["error"] = f"{kind}: {bounded(failure.value)}"
    line["traceback"] = failure.getTraceback()


def jsonFileLogObserver(outFile: IO[Any], extra: Mapping[str, Any] | None = None) -> ILogObserver:
    """A L{FileLogObserver} writing JSON lines to C{outFile} (C{extra}: see L{JSONFormatter})."""
    return FileLogObserver(outFile, JSONFormatter(extra))


def reopening_log_file(path: str) -> Any:
    """
    The log file at C{path}, never rotated by size, reopened on SIGUSR1 (for
    logrotate's "move, then signal").
    """
    log_file = TwistdLogFile.fromFullPath(path, rotateLength=None)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, on_usr1(log_file, rotate=False))
    return log_file


def log_observer(
    format: str, file: str, twistdOptions: Any, events: JSONEventObserver | None = None
) -> ILogObserver | None:
    """
    The observer of C{twistd wssec}'s log for C{[log]}: in C{format}
    (C{"text"} or C{"json"}), to twistd's log file (C{file = "-"}) or to
    the file at C{file}. A JSON log's C{events} observer then writes its
    lines to the same file (see L{JSONEventObserver.writeTo}).

    @return: L{None} when twistd's own observer must be used (C{--syslog},
        C{--logger}; see L{twistdLogObserver}).
    """

    def json_to(out: Any) -> ILogObserver:
        if events is not None:
            events.writeTo(out)
        return jsonFileLogObserver(out)

    if file != "-":
        out = reopening_log_file(file)
        return json_to(out) if format == "json" else textLogObserver(out)
    if format == "json":
        return twistdLogObserver(twistdOptions, json_to)
    return twistdLogObserver(twistdOptions)


__all__ = [
    "JSONEventObserver",
    "JSONFormatter",
    "jsonFileLogObserver",
    "log_observer",
    "reopening_log_file",
]
