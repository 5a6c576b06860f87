"""
Attacks on the workers' log reopen on SIGUSR1 (attack7): a file that
cannot be opened again (its directory removed, a full file system, no
permission) must leave the process writing where it wrote before, never
to a descriptor number the kernel gives to something else (a client's
socket), and the supervisor must still pass SIGUSR1 on to its workers.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import pytest_twisted
from conftest import CapturedLog
from twisted.internet import reactor
from twisted.internet.task import deferLater

from txwssec.logs import LineFile, on_usr1


def test_a_failed_reopen_keeps_the_file_in_use(tmp_path: Path) -> None:
    """
    Reopening fails (the directory is gone): the error is raised, and the
    lines still go to the file in use, not to whatever is opened next on
    the descriptor number it had.
    """
    folder = tmp_path / "logs"
    folder.mkdir()
    out = LineFile(str(folder / "server.log"))
    before = os.open(folder / "server.log", os.O_RDONLY)
    shutil.rmtree(folder)
    with pytest.raises(FileNotFoundError):
        out.reopen()
    other = tmp_path / "other"
    fd = os.open(other, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        out.write("session.closed consumer=alice\n")
        out.flushNow()
    finally:
        os.close(fd)
    assert other.read_bytes() == b""
    try:
        assert os.read(before, 100) == b"session.closed consumer=alice\n"
    finally:
        os.close(before)
        out.close()


@pytest_twisted.ensureDeferred
async def test_a_failed_reopen_on_sigusr1_is_logged_and_passed_on(
    tmp_path: Path, captured_log: CapturedLog
) -> None:
    """
    SIGUSR1 with a log file that cannot be opened again: the operator log
    says so (the path), no 'reopened' line, and C{then} (the supervisor
    passing SIGUSR1 to its workers) still runs.
    """
    folder = tmp_path / "logs"
    folder.mkdir()
    path = str(folder / "server.log")
    out = LineFile(path)
    passed: list[bool] = []
    handler = on_usr1(out, rotate=False, then=lambda: passed.append(True))
    shutil.rmtree(folder)
    handler(10, None)
    for _ in range(5):
        await deferLater(reactor, 0, lambda: None)  # type: ignore[arg-type]
    out.close()
    assert passed == [True]
    assert captured_log.matching(log_format="Log file {action} on SIGUSR1") == []
    failed = captured_log.matching(log_namespace="txwssec.logs", path=path)
    assert len(failed) == 1
    assert "No such file or directory" in str(failed[0]["error"])
