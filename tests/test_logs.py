"""
txwssec's text log formatter must write exactly what twistd's own would,
for every kind of event, and twistd wssec must pick the same destination.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from processes import free_port, quickstart
from twisted.application.service import Application
from twisted.logger import FileLogObserver, ILogObserver, LogLevel, formatEventAsClassicLogText
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.scripts.twistd import ServerOptions

from txwssec.logs import ClassicLogFormatter, twistdLogObserver
from txwssec.tap import makeService


class Thing:
    name = "thing-name"

    def __repr__(self) -> str:
        return "<Thing>"


def event(log_format: Any, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "log_format": log_format,
        "log_time": 1763737200.75,
        "log_level": LogLevel.info,
        "log_namespace": "txwssec.server",
    }
    base.update(fields)
    return base


def failure() -> Failure:
    try:
        raise ValueError("boom")
    except ValueError:
        return Failure()


EVENTS = {
    "plain": event("accepted {peer} on {route}", peer="tcp4:127.0.0.1:1", route="/key"),
    "repr-and-spec": event("{thing!r} {n:>5} {x:.2f}", thing=Thing(), n=3, x=1.5),
    "attribute-and-index": event("{thing.name} {items[1]}", thing=Thing(), items=[1, 2]),
    "multi-line": event("first\nsecond {x}", x="a\nb"),
    "braces-in-values": event("value {v}", v="{not a field}"),
    "missing-field": event("accepted {peer}"),
    "call-field": event("{f()}", f=lambda: "called"),
    "failure": event("failed {x}", x=1, log_failure=failure()),
    "legacy-system": event("{log_text}", log_text="legacy", log_system="-"),
    "no-format": event(None),
    "empty-format": event(""),
    "bytes-format": event(b"bytes {x}", x=1),
    "no-level": event("no level {x}", x=1, log_level=None),
    "no-namespace": {k: v for k, v in event("x").items() if k != "log_namespace"},
    "warn-level": event("limit {limit}", limit="limit.message_rate", log_level=LogLevel.warn),
    "latin-1-and-emoji": event("héllo {x}", x="🔒"),
}


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_same_text_as_twisted(name: str) -> None:
    formatter = ClassicLogFormatter()
    expected = formatEventAsClassicLogText(dict(EVENTS[name]))
    assert formatter(dict(EVENTS[name])) == expected
    # Twice: the second line reuses the cached timestamp.
    assert formatter(dict(EVENTS[name])) == expected


def test_timestamp_changes_with_the_second() -> None:
    formatter = ClassicLogFormatter()
    for when in (100.0, 100.999, 101.0, 99.5, 101.2):
        one = event("at {x}", x=1, log_time=when)
        assert formatter(dict(one)) == formatEventAsClassicLogText(dict(one))


class Options(dict[str, Any]):
    """The parts of twistd's ServerOptions that choose the log destination."""

    def __init__(self, **values: Any) -> None:
        super().__init__(logger=None, syslog=False, logfile=None, nodaemon=False)
        self.update(values)


def test_twistd_options_choose_the_destination(tmp_path: Path, sigusr1: None) -> None:
    assert twistdLogObserver(Options(logger=lambda: None)) is None
    assert twistdLogObserver(Options(syslog=True)) is None
    assert twistdLogObserver(Options(logfile="-")) is None  # twistd refuses it
    assert twistdLogObserver(object()) is None
    for options in (Options(nodaemon=True), Options(nodaemon=True, logfile="-")):
        observer: Any = twistdLogObserver(options)
        assert observer._outFile is sys.stdout
    path = tmp_path / "wssec.log"
    observer = twistdLogObserver(Options(logfile=str(path)))
    assert isinstance(observer._outFile, LogFile)
    observer(event("hello {who}", who="file"))
    observer._outFile.close()
    assert path.read_text().endswith("[txwssec.server#info] hello file\n")


@pytest.fixture
def sigusr1() -> Any:
    """Restore SIGUSR1's handler (a log file observer installs a rotation one)."""
    previous = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, previous)


def application_observer(tmp_path: Path, *twistd_args: str) -> Any:
    """The log observer C{twistd ARGS wssec --config ...} gives its application."""
    options = ServerOptions()
    config = quickstart(tmp_path, free_port())
    options.parseOptions([*twistd_args, "wssec", "--config", str(config)])
    application = Application("wssec")
    makeService(options.subOptions).setServiceParent(application)
    return application.getComponent(ILogObserver, None)


def test_twistd_wssec_installs_the_formatter(tmp_path: Path, sigusr1: None) -> None:
    path = tmp_path / "wssec.log"
    observer = application_observer(tmp_path, "--logfile", str(path))
    assert isinstance(observer, FileLogObserver)
    observer(event("hello {who}", who="twistd"))
    assert path.read_text().endswith("[txwssec.server#info] hello twistd\n")
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)
    assert isinstance(application_observer(tmp_path, "-n"), FileLogObserver)


def test_twistd_keeps_its_own_observer_for_syslog_and_logger(tmp_path: Path) -> None:
    assert application_observer(tmp_path, "--syslog") is None
    logger = "twisted.logger.globalLogPublisher"
    assert application_observer(tmp_path, "-n", "--logger", logger) is None
