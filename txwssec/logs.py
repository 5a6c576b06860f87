"""
A cheaper text log observer for C{twistd wssec}, with twistd's exact output.

txwssec logs one line per session (accepted, expired, revoked...). Through
twistd's default observer, L{twisted.logger.textFileLogObserver}, each line
costs about 30 us of CPU: most of it in C{string.Formatter} (pure Python)
and in formatting the timestamp again for every event. L{ClassicLogFormatter}
renders the same text with C{str.format_map} and one timestamp per second,
about 3x cheaper, and hands every event it cannot render the same way
(tracebacks, legacy C{log.msg} events, C{"{f()}"} call fields, formats that
do not apply) to Twisted's own formatter.

C{twistd wssec} uses it when it would write to a file or to standard output
(see L{twistdLogObserver}); with C{--syslog} or C{--logger} twistd's own
observer is used, as always.

Every value a client chose (a path, a header value, an address from
C{X-Forwarded-For}, a certificate subject...) goes through L{bounded} before
it reaches a log event: cut to L{MAX_LOGGED_VALUE} characters with a visible
marker, control characters escaped so that no value can split a log line.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import threadable
from twisted.python.logfile import LogFile
from twisted.python.threadable import isInIOThread

_log = Logger(namespace="txwssec.logs")

#: The most characters of one client-supplied value that reach a log event.
MAX_LOGGED_VALUE = 256

#: What L{bounded} escapes: C0 and C1 controls, DEL, and the Unicode line and
#: paragraph separators (everything C{str.splitlines} breaks a line on).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def bounded(value: object, limit: int = MAX_LOGGED_VALUE) -> str:
    """
    C{value} (a client-supplied string, or anything C{str()} takes) made safe
    for a log line: its first C{limit} characters, then C{"…[N more chars]"}
    when it was longer, with every control character written C{\\xNN}
    (C{\\uNNNN} for the Unicode line separators). The result is at most
    C{6 * limit} characters plus the marker, whatever the client sent.
    """
    text = value if isinstance(value, str) else str(value)
    over = len(text) - limit
    if over > 0:
        text = text[:limit]
    text = _UNSAFE.sub(_escape, text)
    if over > 0:
        text += f"\u2026[{over} more chars]"
    return text


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class ClassicLogFormatter:
    """
    Formats an event exactly as L{formatEventAsClassicLogText} does
    (C{"<time> [<namespace>#<level>] <text>"}, continuation lines indented by
    a tab), faster for plain events.
    """

    def __init__(self, system: str = "") -> None:
        self._second: int | None = None
        self._stamp = ""
        #: Added to each line's system (C{" worker=0 pid=123"}).
        self._system = system

    def __call__(self, event: LogEvent) -> str | None:
        text = self._plain(event)
        if text is None:
            if self._system and "log_system" not in event:
                level = event.get("log_level")
                namespace = event.get("log_namespace", "-")
                system = f"{namespace}#{getattr(level, 'name', '-')}{self._system}"
                event = {**event, "log_system": system}
            return formatEventAsClassicLogText(event)
        return text

    def _plain(self, event: LogEvent) -> str | None:
        """The event's line, or L{None} when Twisted's formatter must do it."""
        format = event.get("log_format")
        when = event.get("log_time")
        level = event.get("log_level")
        if (
            type(format) is not str
            or "()" in format
            or when is None
            or level is None
            or "log_failure" in event
            or "log_system" in event
            or "log_flattened" in event
        ):
            return None
        try:
            text = format.format_map(event)
        except Exception:
            return None  # Twisted's formatter says what could not be formatted
        if not text:
            return None
        second = int(when)
        if second != self._second:
            # The default time format has whole seconds: one string per second.
            self._second, self._stamp = second, formatTime(when)
        namespace = event.get("log_namespace", "-")
        line = f"{self._stamp} [{namespace}#{level.name}{self._system}] {text}"
        return line.replace("\n", "\n\t") + "\n"


class LevelCheckedLogger(Logger):
    """
    A L{Logger} whose C{emit} checks the level against a set made once,
    instead of C{LogLevel.iterconstants()} (which sorts the levels again on
    every event): the same events, for a logger that writes a line per
    session.
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        """Emit a log event at C{level} (see L{Logger.emit})."""
        if level not in _LEVELS:
            super().emit(level, format, **kwargs)  # Twisted's own complaint
            return
        kwargs.update(
            log_logger=self,
            log_level=level,
            log_namespace=self.namespace,
            log_source=self.source,
            log_format=format,
            log_time=time.time(),
        )
        if "log_trace" in kwargs:
            kwargs["log_trace"].append((self, self.observer))  # type: ignore[attr-defined]
        self.observer(kwargs)

    def info(self, format: str | None = None, **kwargs: object) -> None:
        """Emit at "info" (see L{Logger.info}): the event made here at once."""
        kwargs.update(
            log_logger=self,
            log_level=LogLevel.info,
            log_namespace=self.namespace,
            log_source=self.source,
            log_format=format,
            log_time=time.time(),
        )
        if "log_trace" in kwargs:
            kwargs["log_trace"].append((self, self.observer))  # type: ignore[attr-defined]
        self.observer(kwargs)


_LEVELS = frozenset(LogLevel.iterconstants())


def textLogObserver(outFile: IO[Any], system: str = "") -> ILogObserver:
    """
    A L{FileLogObserver} writing to C{outFile} with L{ClassicLogFormatter}
    (C{system} added to each line's system).
    """
    return FileLogObserver(outFile, ClassicLogFormatter(system))


#: The most bytes written at once when a write holds several lines: a pipe
#: writes up to this many bytes whole (POSIX C{PIPE_BUF}).
WHOLE = 4096


class _LostLines:
    """
    What a log file could not write (a full disk, a closed pipe): the lines
    counted, with the last error, and told once a write works again.

    @ivar _partial: a failed write cut a line (the next write ends it).
    @ivar _telling: the error that tells is being written (to this file).
    """

    _lost = 0
    _lostError = ""
    _partial = False
    _telling = False

    def _tellLost(self, path: object) -> None:
        """One error: how many lines were not written to C{path}, and why."""
        if not self._lost:
            return
        lost, self._lost = self._lost, 0
        _log.error(
            "{lost} log lines not written to {path}: {error}",
            lost=lost,
            path=path,
            error=bounded(self._lostError),
        )


class LineFile(_LostLines):
    """
    A log destination that several processes write at once (the workers of
    C{[server] workers} and their supervisor) without mixing their lines:
    a file opened with C{O_APPEND} (every write goes to its end, whole), or
    a descriptor the process inherited (standard output: a pipe writes up
    to L{WHOLE} bytes whole). Lines are gathered and written with
    C{os.write} once per turn of the reactor (at once while the reactor
    does not run, or from another thread), in writes of whole lines of at
    most L{WHOLE} bytes (a longer line alone).

    @param path: the file, or L{None} with C{fd}.
    @param fd: an inherited descriptor (not closed here).
    """

    def __init__(
        self, path: str | None = None, fd: int | None = None, reactor: Any = None
    ) -> None:
        assert (path is None) != (fd is None)
        self.path = path
        self._reactor = reactor
        self._lines: list[bytes] = []
        self._pending = False
        self._fd = fd if fd is not None else self._open()

    def _open(self) -> int:
        assert self.path is not None
        # O_NONBLOCK: a FIFO at the path (no reader) fails with ENXIO at once
        # instead of blocking the reactor in open(); writes then block again.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(self.path, flags, 0o644)
        os.set_blocking(fd, True)
        return fd

    def write(self, text: str) -> None:
        """Add C{text} (whole lines) to what the next L{flush} writes."""
        self._lines.append(text.encode("utf-8", "replace"))

    def flush(self) -> None:
        """Write the lines at the end of this turn of the reactor (or now)."""
        if self._pending or not self._lines:
            return
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        if reactor.running and isInIOThread():
            self._pending = True
            reactor.callLater(0, self.flushNow)
            if not hasattr(self, "_trigger"):
                # The last lines of a stopping reactor.
                self._trigger = reactor.addSystemEventTrigger("after", "shutdown", self.flushNow)
        else:
            self.flushNow()

    def flushNow(self) -> None:
        """Write the lines now."""
        self._pending = False
        lines, self._lines = self._lines, []
        chunk = b""
        for line in lines:
            if chunk and len(chunk) + len(line) > WHOLE:
                self._out(chunk)
                chunk = b""
            chunk += line
        if chunk:
            self._out(chunk)
        if self._lost and not self._failing and not self._telling:
            # Written again: say what was lost (the line comes in this file).
            self._telling = True
            try:
                self._tellLost(self.path if self.path is not None else f"descriptor {self._fd}")
            finally:
                self._telling = False

    _failing = False

    def _out(self, data: bytes) -> None:
        ended = self._partial
        if ended:
            data = b"\n" + data  # a line cut by a failed write ends here
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except InterruptedError:
                continue
            except OSError as error:
                # (a full disk, a closed pipe): counted, told once a write works
                written = len(data) - len(view)
                self._lost += bytes(view).count(b"\n") - (ended and not written)
                self._lostError = str(error)
                if written:
                    self._partial = not data[:written].endswith(b"\n")
                self._failing = True
                return
        self._failing = self._partial = False

    def reopen(self) -> None:
        """
        Open the file again at its path (after it was moved: logrotate).

        @raise OSError: the file cannot be opened; the one in use stays (its
            descriptor is not closed, so that no file or socket opened
            later gets its number and the log lines).
        """
        if self.path is None:
            return
        self.flushNow()
        fd = self._open()
        os.close(self._fd)
        self._fd = fd
        self._partial = False  # a cut line stays at the end of the file it was in

    def rotate(self) -> None:
        """As twistd's log file on SIGUSR1: the file becomes C{.1} (C{.1} C{.2}...)."""
        if self.path is None:
            return
        self.flushNow()
        numbers = sorted(_numbered(self.path), reverse=True)
        for number in numbers:
            os.rename(f"{self.path}.{number}", f"{self.path}.{number + 1}")
        if os.path.exists(self.path):
            os.rename(self.path, f"{self.path}.1")
        self.reopen()

    def close(self) -> None:
        """Write what is left; close the file (not an inherited descriptor)."""
        self.flushNow()
        if self.path is not None:
            os.close(self._fd)


class TwistdLogFile(LogFile, _LostLines):
    """
    Twisted's L{LogFile} (twistd's C{--logfile}: rotated at 1 MB and on
    SIGUSR1; C{[log] file}: reopened on SIGUSR1) that never loses the file
    in use: Twisted's closes it before it opens the next one, so when that
    fails (a directory at the path, the folder gone, no permission, no
    descriptor left) every later line is lost. Here the next file is opened
    first; when it cannot be, the error is raised and the lines go on to the
    file in use (after a rotation, the one renamed C{.1}).

    L{write} never raises: a line that cannot be written (a full disk) is
    counted, and once a write works again an error says how many were lost,
    where and why; a rotation by size that fails is logged and tried again
    after C{rotateLength} more bytes, the line written to the file in use.
    """

    _notRotated: OSError | None = None

    def reopen(self) -> None:
        """
        Open the file again at its path (after it was moved: logrotate).

        @raise OSError: it cannot be opened; the file in use stays.
        """
        inUse, size = self._file, self.size
        try:
            self._openFile()
        except BaseException:
            # Twisted's _openFile sets _file before its seek, which fails on
            # a FIFO: close that one, keep the file in use.
            if self._file is not inUse:
                self._file.close()
            self._file, self.size, self.closed = inUse, size, False
            raise
        inUse.close()
        self._partial = False  # a cut line stays at the end of the file it was in

    def write(self, data: str | bytes) -> None:
        """As Twisted's (rotated by size first), without raising."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        if self.shouldRotate():
            try:
                self.rotate()
            except OSError as error:
                self.size = 0  # again after rotateLength more bytes, not every line
                self._notRotated = error
        if not (self._partial or self._lost or self._notRotated is not None):
            # The common case, as Twisted's: one write of the whole line.
            try:
                written = self._file.write(data)
            except OSError:
                written = 0
            if written == len(data):
                self.size += written
                return
        else:
            written = 0
        self._writeCarefully(data, written or 0)

    def _writeCarefully(self, data: bytes, done: int) -> None:
        """
        L{write}'s C{data} after its first C{done} bytes: a cut line ended
        first, what cannot be written counted, and once a write works again
        the lost lines and a failed rotation told.
        """
        lines = max(data.count(b"\n"), 1)
        cut = self._partial
        if done:
            self.size += done
            cut = data[done - 1 : done] != b"\n"
            data = data[done:]
        elif cut:
            data = b"\n" + data  # a line cut by a failed write ends here
        view = memoryview(data)
        try:
            while view:
                written = self._file.write(view)
                if not written:  # (None: a non-blocking descriptor would block)
                    raise BlockingIOError(errno.EAGAIN, "log file not writable now")
                view = view[written:]
        except OSError as error:
            self._lost += lines
            self._lostError = str(error)
            written = len(data) - len(view)
            if written:
                self._partial = not data[:written].endswith(b"\n")
            elif done:
                self._partial = cut
            self.size += written
            return
        self._partial = False
        self.size += len(data)
        if self._telling:
            return
        self._telling = True
        try:
            if self._notRotated is not None:
                problem, self._notRotated = self._notRotated, None
                _log.error(
                    "Log file {path} not rotated: {error}",
                    path=self.path,
                    error=bounded(str(problem)),
                )
            self._tellLost(self.path)
        finally:
            self._telling = False

    def shouldRotate(self) -> bool:
        """
        As Twisted's: past C{rotateLength}. When the folder or the file cannot
        be written, L{rotate} raises, and L{write} says so (Twisted's skipped
        the rotation without a word, and the file grew without end).
        """
        return bool(self.rotateLength and self.size >= self.rotateLength)

    def rotate(self) -> None:
        """
        As Twisted's: C{.N} becomes C{.N+1} (the oldest beyond
        C{maxRotatedFiles} removed), the file C{.1}, then a new file.

        @raise OSError: the folder or the file cannot be written (nothing
            renamed), or the new file cannot be opened (the lines go on to
            C{.1}).
        """
        if not self._rotatable():
            raise PermissionError(errno.EACCES, "log file not writable", self.path)
        inUse = os.fstat(self._file.fileno())
        for number in sorted(self.listLogs(), reverse=True):
            name = f"{self.path}.{number}"
            if (
                self.maxRotatedFiles is not None
                and number >= self.maxRotatedFiles
                # not the file in use (renamed by a rotation whose new file
                # could not be opened): its lines would go to a deleted file
                and not os.path.samestat(os.stat(name), inUse)
            ):
                os.remove(name)
            else:
                os.rename(name, f"{self.path}.{number + 1}")
        if os.path.exists(self.path):
            os.rename(self.path, f"{self.path}.1")
        self.reopen()

    def _rotatable(self) -> bool:
        return os.access(self.directory, os.W_OK) and (
            not os.path.exists(self.path) or os.access(self.path, os.W_OK)
        )


threadable.synchronize(TwistdLogFile)  # write and rotate hold its lock, as Twisted's


class ReopenableLog(Protocol):
    """A log file that SIGUSR1 reopens or rotates (L{LineFile}, L{TwistdLogFile})."""

    @property
    def path(self) -> str | None: ...

    def reopen(self) -> None: ...

    def rotate(self) -> None: ...


def on_usr1(out: ReopenableLog, rotate: bool, then: Callable[[], None] | None = None) -> Any:
    """
    The SIGUSR1 handler of C{out}: reopen (C{[log] file}, and in a worker)
    or rotate (twistd's C{--logfile}), say so in the new file (or, when it
    cannot be opened, in the file in use), then C{then} (the supervisor of
    C{[server] workers} passes the signal on).
    """

    def handler(signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        def act() -> None:
            try:
                if rotate:
                    out.rotate()
                else:
                    out.reopen()
            except OSError as error:
                _log.error(
                    "Log file {path} not {action} on SIGUSR1: {error}",
                    path=out.path,
                    action="rotated" if rotate else "reopened",
                    error=bounded(str(error)),
                )
            else:
                _log.info(
                    "Log file {action} on SIGUSR1", action="rotated" if rotate else "reopened"
                )
            if then is not None:
                then()

        reactor.callFromThread(act)  # type: ignore[attr-defined]

    return handler


def _numbered(path: str) -> list[int]:
    """The numbers of C{path}'s rotated files (C{path.1}, C{path.2}...)."""
    folder, name = os.path.split(os.path.abspath(path))
    found = []
    for entry in os.listdir(folder):
        suffix = entry[len(name) + 1 :]
        if entry.startswith(name + ".") and suffix.isdigit():
            found.append(int(suffix))
    return found


def twistdLogPath(options: Any) -> str | None:
    """
    Where twistd logs for its command line C{options} (its C{ServerOptions}):
    C{"-"} for the standard output (C{-n} and no log file, or C{--logfile -}),
    else the log file's path (C{--logfile}, default C{twistd.log}).

    @return: L{None} where twistd's own observer must be used: C{--syslog},
        C{--logger}, C{--logfile -} without C{-n} (which twistd refuses), or
        options that are not twistd's.
    """
    try:
        logger, syslog = options.get("logger"), options.get("syslog")
        path, nodaemon = options.get("logfile"), options.get("nodaemon")
    except AttributeError:
        return None
    if logger or syslog:
        return None
    if path == "-" or (nodaemon and not path):
        return "-" if nodaemon else None
    return str(path or "twistd.log")


def twistdLogObserver(
    options: Any, make: Callable[[IO[Any]], ILogObserver] = textLogObserver
) -> ILogObserver | None:
    """
    The observer twistd would make for its command line C{options} (its
    C{ServerOptions}), with L{ClassicLogFormatter}: the same file (C{--logfile},
    default C{twistd.log}; standard output with C{-n} and no log file, or with
    C{--logfile -}), rotated on SIGUSR1 like twistd's. C{make} makes the
    observer of that file (L{textLogObserver}: twistd's text lines).

    @return: L{None} where twistd's own observer must be used: C{--syslog},
        C{--logger}, C{--logfile -} without C{-n} (which twistd refuses), or
        options that are not twistd's.
    """
    where = twistdLogPath(options)
    if where is None:
        return None
    if where == "-":
        return make(sys.stdout)
    logFile = TwistdLogFile.fromFullPath(where)
    if hasattr(signal, "SIGUSR1") and not signal.getsignal(signal.SIGUSR1):
        signal.signal(signal.SIGUSR1, on_usr1(logFile, rotate=True))
    return make(logFile)
