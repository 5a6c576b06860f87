"""
The log of C{[server] workers}, written by every worker itself
(L{txwssec.workers.logs}, L{txwssec.logs.LineFile}): where it goes, whole
lines, reopening and twistd's rotation; and through C{twistd wssec
--logfile} with two workers, one text log that names each line's worker,
rotated on SIGUSR1 for the supervisor and the workers alike.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from processes import WORKERS_STARTING, Process, twistd
from test_workers import Server, config_text, free_admin_port, spread, wait_until
from twisted.internet.task import Clock

from txwssec.devcert import write_dev_certificates
from txwssec.logs import WHOLE, LineFile
from txwssec.ops.settings import LogSettings
from txwssec.workers.logs import STDOUT, destination

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")


class Writes:
    """A descriptor's writes, seen through a pipe."""

    def __init__(self) -> None:
        self.read, self.write = os.pipe()
        os.set_blocking(self.read, False)

    def chunks(self, file: LineFile, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
        seen: list[bytes] = []
        real = os.write

        def write(fd: int, data: bytes) -> int:
            seen.append(bytes(data))
            return real(fd, data)

        monkeypatch.setattr(os, "write", write)
        file.flushNow()
        monkeypatch.undo()
        return seen


class Reactor(Clock):
    running = True

    def addSystemEventTrigger(self, *args: object) -> None:
        self.trigger = args


def test_line_file_writes_whole_lines_once_per_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = Writes()
    reactor = Reactor()
    out = LineFile(fd=pipe.write, reactor=reactor)
    lines = [f"line {i} {'x' * 1000}\n" for i in range(9)]
    for line in lines:
        out.write(line)
        out.flush()
    # Nothing yet: once, at the end of the reactor's turn.
    with pytest.raises(BlockingIOError):
        os.read(pipe.read, 1)
    assert len(reactor.getDelayedCalls()) == 1
    chunks = pipe.chunks(out, monkeypatch)
    assert all(len(chunk) <= WHOLE and chunk.endswith(b"\n") for chunk in chunks)
    assert b"".join(chunks).decode() == "".join(lines)
    assert len(chunks) == 3
    # A line longer than WHOLE is written alone, whole.
    out.write("y" * (WHOLE * 2) + "\n")
    out.write("short\n")
    assert [len(c) for c in pipe.chunks(out, monkeypatch)] == [WHOLE * 2 + 1, 6]


def test_line_file_appends_reopens_and_rotates(tmp_path: Path) -> None:
    path = tmp_path / "wssec.log"
    path.write_text("before\n")
    stopped = Reactor()
    stopped.running = False
    out = LineFile(path=str(path), reactor=stopped)
    out.write("one\n")
    out.flush()  # the reactor does not run: at once
    assert path.read_text() == "before\none\n"
    path.rename(tmp_path / "moved.log")  # logrotate, then SIGUSR1
    out.reopen()
    out.write("two\n")
    out.flush()
    assert path.read_text() == "two\n"
    out.rotate()  # twistd's --logfile: .1, then .2
    out.write("three\n")
    out.rotate()
    out.write("four\n")
    out.close()
    assert [(tmp_path / n).read_text() for n in ("wssec.log.2", "wssec.log.1", "wssec.log")] == [
        "two\n",
        "three\n",
        "four\n",
    ]


class Options(dict[str, object]):
    """twistd's options, as far as destination reads them."""


@pytest.mark.parametrize(
    ("file", "options", "expected"),
    [
        ("/var/log/wssec.log", {}, "/var/log/wssec.log"),
        ("-", {"nodaemon": True}, STDOUT),
        ("-", {"nodaemon": True, "logfile": "-"}, STDOUT),
        ("-", {"nodaemon": True, "logfile": "/tmp/t.log"}, "/tmp/t.log"),
        ("-", {"nodaemon": False}, os.path.abspath("twistd.log")),
        ("-", {"nodaemon": True, "syslog": True}, None),
        ("-", {"nodaemon": True, "logger": "x.y"}, None),
        ("-", None, None),
    ],
)
def test_destination(file: str, options: object, expected: str | None) -> None:
    given = Options(options) if isinstance(options, dict) else options
    assert destination(LogSettings(file=file), given) == expected


WORKER_LINE = re.compile(r"\[txwssec\.server#info worker=(\d) pid=(\d+)\] .*accepted")
#: A worker's line once it has reopened the log on SIGUSR1.
REOPENED = re.compile(r"\[txwssec\.logs#info worker=\d pid=(\d+)\] Log file reopened on SIGUSR1")


def test_workers_write_one_text_log_rotated_on_sigusr1(tmp_path: Path) -> None:
    """
    twistd --logfile with two workers: the sessions' lines of both workers
    in the one file, each naming its worker; SIGUSR1 rotates it (as twistd
    does) and every process goes on in the new file.
    """
    write_dev_certificates(tmp_path / "dev-certs")
    log = tmp_path / "wssec.log"
    path = tmp_path / "wssec.toml"
    admin = free_admin_port()
    path.write_text(config_text(admin))
    process: Process = twistd(path, tmp_path, f"--logfile={log}")
    try:
        wait_until(
            lambda: log.exists() and "2 workers serving" in log.read_text(), WORKERS_STARTING
        )
        process.lines[:] = log.read_text().splitlines(keepends=True)
        server = Server(process, admin)
        clients = spread(server)
        wait_until(lambda: len(WORKER_LINE.findall(log.read_text())) == len(clients))
        found = {(m[0], int(m[1])) for m in WORKER_LINE.findall(log.read_text())}
        assert {pid for _, pid in found} == set(server.pids().values())
        process.process.send_signal(signal.SIGUSR1)
        wait_until((tmp_path / "wssec.log.1").exists)
        # Each worker says so in the new file once it writes there.
        pids = set(server.pids().values())
        wait_until(lambda: {int(pid) for pid in REOPENED.findall(log.read_text())} == pids)
        assert "Log file rotated on SIGUSR1" in log.read_text()  # the supervisor
        # Both workers write the new file (and the supervisor: see below).
        more = spread(server)
        wait_until(lambda: len(WORKER_LINE.findall(log.read_text())) == len(more))
        after = {int(m[1]) for m in WORKER_LINE.findall(log.read_text())}
        assert after == set(server.pids().values())
        assert len(WORKER_LINE.findall((tmp_path / "wssec.log.1").read_text())) == len(clients)
        for client in clients + more:
            client.close()
        assert process.stop() == 0
        assert "wssec stopping 2 workers" in log.read_text()
    finally:
        process.kill()
