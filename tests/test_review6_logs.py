"""
Review 6: a single-process C{twistd wssec}'s log file (L{TwistdLogFile})
when what is at its path, or the disk, goes wrong.

- A FIFO at the path: Twisted's C{_openFile} sets C{_file} before its
  C{seek} fails (ESPIPE), so the "failed" reopen left the process writing
  to the FIFO (nobody reads it: after 64 KiB every write blocks the
  reactor) and dropped the file in use.
- A write that fails (a full disk, a symlink to /dev/full) raised out of
  C{write}: through the JSON log's direct path (L{JSONLines}) into the
  server, so that a refused handshake got no 401, only a dropped
  connection; the lines were lost without a word.
- A size rotation whose new file cannot be opened (no descriptor left)
  raised out of C{write} (the line lost) and was tried again on every
  line, renaming the file in use each time.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from txwssec.logs import TwistdLogFile
from txwssec.ops.jsonlog import JSONEventObserver


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_a_fifo_at_the_path_keeps_the_file_in_use(tmp_path: Path) -> None:
    log = TwistdLogFile.fromFullPath(str(tmp_path / "wssec.log"), rotateLength=None)
    log.write("before\n")
    (tmp_path / "wssec.log").rename(tmp_path / "moved.log")
    os.mkfifo(tmp_path / "wssec.log")
    before = _fds()
    for _ in range(3):
        with pytest.raises(OSError):
            log.reopen()
    assert _fds() == before
    log.write("after\n")
    log.close()
    assert (tmp_path / "moved.log").read_text() == "before\nafter\n"


def _events() -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    return seen


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_failed_write_does_not_raise_and_is_told_later(tmp_path: Path) -> None:
    """
    The path is a symlink to /dev/full (a full disk): writes fail, without
    raising; once a write works again, a line says how many were lost,
    where, and why.
    """
    path = tmp_path / "wssec.log"
    log = TwistdLogFile.fromFullPath(str(path), rotateLength=None)
    path.rename(tmp_path / "moved.log")
    path.symlink_to("/dev/full")
    log.reopen()
    log.write("lost 1\n")
    log.write("lost 2\n")
    path.unlink()
    log.reopen()
    seen = _events()
    try:
        log.write("back\n")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    log.close()
    assert path.read_text().startswith("back\n")
    [told] = [e for e in seen if e.get("log_namespace") == "txwssec.logs"]
    assert told["lost"] == 2
    assert told["path"] == str(path)
    assert "No space left" in told["error"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_the_json_log_on_a_full_disk_does_not_fail_the_server(tmp_path: Path) -> None:
    path = tmp_path / "wssec.log"
    path.symlink_to("/dev/full")
    log = TwistdLogFile.fromFullPath(str(path), rotateLength=None)
    observer = JSONEventObserver()
    observer.writeTo(log, Clock())
    observer("handshake.refused", {"status": 401, "reason": "no credentials"})


def test_a_failed_size_rotation_keeps_the_line_and_waits(tmp_path: Path) -> None:
    """
    The new file cannot be opened (no descriptor left): the line goes on to
    the file in use (now C{.1}), and the rotation is not tried again on the
    next line.
    """
    path = tmp_path / "wssec.log"
    log = TwistdLogFile.fromFullPath(str(path), rotateLength=20)
    log.write("0123456789012345678\n")

    def no_descriptor() -> None:
        raise OSError(errno.EMFILE, "Too many open files", str(path))

    log._openFile = no_descriptor  # type: ignore[method-assign]
    seen = _events()
    try:
        for n in range(3):
            log.write(f"line {n}\n")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    del log._openFile
    log.close()
    assert (
        tmp_path / "wssec.log.1"
    ).read_text() == "0123456789012345678\nline 0\nline 1\nline 2\n"
    assert not (tmp_path / "wssec.log.2").exists()
    told = [e for e in seen if e.get("log_namespace") == "txwssec.logs"]
    assert len(told) == 1
    assert "Too many open files" in told[0]["error"]


class _Disk:
    """A file on a disk with C{room} bytes left (C{room} may grow again)."""

    def __init__(self, file: Any, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data: Any) -> int:
        if not self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = self.file.write(bytes(data[: self.room]))
        self.room -= written
        return int(written)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def test_a_line_cut_by_a_full_disk_is_ended_before_the_next(tmp_path: Path) -> None:
    """
    A full disk cuts a line, more lines fail whole, then there is room
    again: the next line starts on a line of its own; a reopened file
    starts with its first line.
    """
    path = tmp_path / "wssec.log"
    log = TwistdLogFile.fromFullPath(str(path), rotateLength=None)
    disk = _Disk(log._file, 8)
    log._file = disk  # type: ignore[assignment]
    seen = _events()
    try:
        log.write("first line\n")
        log.write("lost\n")
        disk.room = 1000
        log.write("back\n")
        path.rename(tmp_path / "moved.log")
        disk.room = 4
        log.write("cut again\n")
        log._file = disk.file
        log.reopen()
        log.write("new\n")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    log.close()
    lines = (tmp_path / "moved.log").read_text().splitlines()
    assert lines[:2] == ["first li", "back"]
    assert lines[-1] == "cut "
    assert path.read_text() == "new\n"
    told = [e["lost"] for e in seen if e.get("log_namespace") == "txwssec.logs"]
    assert told == [2, 1]


def test_a_size_rotation_that_cannot_be_done_is_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The folder cannot be written (as a service user after a change of
    owner; root passes every access check): Twisted's C{LogFile} skipped
    the rotation without a word, on every line, and the file grew without
    end. Now it is logged, naming the path, once per C{rotateLength}; the
    lines go on to the file.
    """
    path = tmp_path / "wssec.log"
    log = TwistdLogFile.fromFullPath(str(path), rotateLength=20)
    log.write("0123456789012345678\n")
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    seen = _events()
    try:
        for n in range(3):
            log.write(f"line {n}\n")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    log.close()
    assert path.read_text() == "0123456789012345678\nline 0\nline 1\nline 2\n"
    told = [e for e in seen if e.get("log_namespace") == "txwssec.logs"]
    assert len(told) == 1
    assert told[0]["path"] == str(path)
    assert "not writable" in told[0]["error"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_a_fifo_at_the_path_does_not_block_a_workers_reopen(tmp_path: Path) -> None:
    """
    L{LineFile} (C{[server] workers}) opened the path write-only: on a FIFO
    without a reader, C{open} blocked, and with it the process's reactor,
    for ever. Now the reopen fails at once (ENXIO); the lines go on to the
    file in use.
    """
    from txwssec.logs import LineFile

    path = tmp_path / "wssec.log"
    out = LineFile(path=str(path))
    path.rename(tmp_path / "moved.log")
    os.mkfifo(path)
    pid = os.fork()
    if pid == 0:  # the child reopens: a blocked open must not block the test
        try:
            out.reopen()
        except OSError as error:
            os._exit(2 if error.errno == errno.ENXIO else 3)
        os._exit(0)
    for _ in range(100):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the reopen blocked on the FIFO")
    assert os.waitstatus_to_exitcode(status) == 2
    out.write("after\n")
    out.close()
    assert (tmp_path / "moved.log").read_text() == "after\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_workers_lines_lost_to_a_full_disk_are_told(tmp_path: Path) -> None:
    """
    L{LineFile} dropped the lines a full disk refused without a word
    ("nowhere to say it"); now, once a write works again, an error says how
    many, where and why.
    """
    from txwssec.logs import LineFile

    path = tmp_path / "wssec.log"
    path.symlink_to("/dev/full")
    out = LineFile(path=str(path))
    out.write("lost 1\nlost 2\n")
    out.flushNow()
    path.unlink()
    out.reopen()
    seen = _events()
    try:
        out.write("back\n")
        out.flushNow()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    out.close()
    assert path.read_text() == "back\n"
    [told] = [e for e in seen if e.get("log_namespace") == "txwssec.logs"]
    assert told["lost"] == 2
    assert told["path"] == str(path)
    assert "No space left" in told["error"]


def test_failed_rotations_never_remove_the_file_in_use(tmp_path: Path) -> None:
    """
    With C{maxRotatedFiles}, each rotation whose new file cannot be opened
    shifted the file in use one number up (C{.1}, C{.2}...) until it was
    past the limit and removed: every later line went to a deleted file.
    """
    path = tmp_path / "wssec.log"
    log = TwistdLogFile.fromFullPath(str(path), rotateLength=None, maxRotatedFiles=2)
    log.write("one\n")

    def no_descriptor() -> None:
        raise OSError(errno.EMFILE, "Too many open files", str(path))

    log._openFile = no_descriptor  # type: ignore[method-assign]
    for n in range(3):
        with pytest.raises(OSError):
            log.rotate()
        log.write(f"during {n}\n")
    del log._openFile
    assert os.fstat(log._file.fileno()).st_nlink == 1
    log.rotate()
    log.write("after\n")
    log.close()
    kept = sorted(p.read_text() for p in tmp_path.iterdir())
    assert "one\nduring 0\nduring 1\nduring 2\n" in kept
    assert path.read_text() == "after\n"
