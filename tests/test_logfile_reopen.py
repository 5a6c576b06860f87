"""
A single-process C{twistd wssec}'s log file on SIGUSR1 (the workers' log
is L{txwssec.logs.LineFile}, tests/test_attack7_logs.py): C{[log] file}
is reopened (logrotate's "move, then signal"), twistd's C{--logfile}
rotated (C{.1}, C{.2}...). A file that cannot be opened again (a directory
in its place, its folder gone) must leave the process writing to the file
it had, and the log must say so there; Twisted's own C{LogFile} closed the
file in use first, so every later line (the audit log) was lost.
"""

from __future__ import annotations

import shutil
import signal
import socket
from pathlib import Path

import pytest
from processes import TIMEOUT, free_port, twistd
from test_ops_twistd import wait_until

from txwssec.logs import TwistdLogFile


def test_a_failed_reopen_keeps_writing_to_the_file_in_use(tmp_path: Path) -> None:
    """
    The moved file cannot be replaced (a directory at its path): the error
    is raised, and the next lines go to the moved file.
    """
    log = TwistdLogFile.fromFullPath(str(tmp_path / "wssec.log"), rotateLength=None)
    log.write("before\n")
    (tmp_path / "wssec.log").rename(tmp_path / "moved.log")
    (tmp_path / "wssec.log").mkdir()
    with pytest.raises(IsADirectoryError):
        log.reopen()
    log.write("after\n")
    log.close()
    assert (tmp_path / "moved.log").read_text() == "before\nafter\n"


def test_a_reopen_moves_to_the_new_file(tmp_path: Path) -> None:
    log = TwistdLogFile.fromFullPath(str(tmp_path / "wssec.log"), rotateLength=None)
    log.write("before\n")
    (tmp_path / "wssec.log").rename(tmp_path / "moved.log")
    log.reopen()
    log.write("after\n")
    log.close()
    assert (tmp_path / "moved.log").read_text() == "before\n"
    assert (tmp_path / "wssec.log").read_text() == "after\n"


def test_a_failed_rotation_keeps_writing_to_the_rotated_file(tmp_path: Path) -> None:
    """
    The file is renamed C{.1} but a new one cannot be made (its folder is
    taken away between the two): the lines go on to C{.1}; the next rotation
    that can make the file does, shifting C{.1} to C{.2}.
    """
    folder = tmp_path / "logs"
    folder.mkdir()
    log = TwistdLogFile.fromFullPath(str(folder / "wssec.log"), rotateLength=None)
    log.write("one\n")
    real_open = TwistdLogFile._openFile

    def refuse(self: TwistdLogFile) -> None:
        raise PermissionError(13, "Permission denied", self.path)

    TwistdLogFile._openFile = refuse  # type: ignore[method-assign]
    try:
        with pytest.raises(PermissionError):
            log.rotate()
    finally:
        TwistdLogFile._openFile = real_open  # type: ignore[method-assign]
    log.write("two\n")
    assert (folder / "wssec.log.1").read_text() == "one\ntwo\n"
    assert not (folder / "wssec.log").exists()
    log.rotate()
    log.write("three\n")
    log.close()
    assert (folder / "wssec.log.2").read_text() == "one\ntwo\n"
    assert not (folder / "wssec.log.1").exists()
    assert (folder / "wssec.log").read_text() == "three\n"


def test_rotation_keeps_twisteds_numbering_and_limit(tmp_path: Path) -> None:
    """
    As Twisted's C{LogFile.rotate}: C{.N} becomes C{.N+1}, the oldest
    beyond C{maxRotatedFiles} removed.
    """
    log = TwistdLogFile.fromFullPath(
        str(tmp_path / "wssec.log"), rotateLength=None, maxRotatedFiles=2
    )
    for text in ("one\n", "two\n", "three\n"):
        log.write(text)
        log.rotate()
    log.write("four\n")
    log.close()
    assert (tmp_path / "wssec.log.1").read_text() == "three\n"
    assert (tmp_path / "wssec.log.2").read_text() == "two\n"
    assert not (tmp_path / "wssec.log.3").exists()
    assert (tmp_path / "wssec.log").read_text() == "four\n"


def test_rotation_by_size_still_happens(tmp_path: Path) -> None:
    log = TwistdLogFile.fromFullPath(str(tmp_path / "wssec.log"), rotateLength=10)
    log.write("0123456789\n")
    log.write("next\n")
    log.close()
    assert (tmp_path / "wssec.log.1").read_text() == "0123456789\n"
    assert (tmp_path / "wssec.log").read_text() == "next\n"


def write_config(folder: Path, log_file: str) -> tuple[Path, int]:
    port = free_port()
    config = folder / "wssec.toml"
    config.write_text(
        f"""
[server]
listen = ["tcp:{port}:interface=127.0.0.1"]

[log]
format = "text"
file = "{log_file}"

[auth.key]
header = "apikey"

[[consumer]]
name = "john"
keys = ["john-key-5d1e9a"]

[[route]]
path = "/echo"
app = "echo"
auth = ["key"]
"""
    )
    return config, port


def refuse_one(port: int) -> None:
    """A handshake without a key: one 'refused' line in the log."""
    request = (
        b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        assert sock.recv(100).startswith(b"HTTP/1.1 401 ")


def test_log_file_not_reopened_on_sigusr1_keeps_the_log(tmp_path: Path) -> None:
    """
    C{[log] file} under a single-process C{twistd wssec}: logrotate moves
    the file, but a directory is in its place: the moved file gets the
    error and every later line; once the path is free, SIGUSR1 moves the
    log to a new file, whose first line says so.
    """
    log = tmp_path / "wssec.log"
    moved = tmp_path / "wssec.log.1"
    config, port = write_config(tmp_path, str(log))
    server = twistd(config, tmp_path)
    try:
        wait_until(lambda: log.exists() and f"listening on tcp:{port}" in log.read_text())
        log.rename(moved)
        log.mkdir()
        server.process.send_signal(signal.SIGUSR1)
        wait_until(lambda: "on SIGUSR1" in moved.read_text())
        refuse_one(port)
        wait_until(lambda: "refused" in moved.read_text())
        assert f"Log file {log} not reopened on SIGUSR1: " in moved.read_text()
        assert "Is a directory" in moved.read_text()
        shutil.rmtree(log)
        server.process.send_signal(signal.SIGUSR1)
        wait_until(lambda: log.is_file() and "Log file reopened on SIGUSR1" in log.read_text())
        refuse_one(port)
        wait_until(lambda: "refused" in log.read_text())
    finally:
        server.stop()
    assert moved.read_text().count("refused") == 1
    assert log.read_text().count("refused") == 1


def test_twistd_logfile_rotated_on_sigusr1_says_so(tmp_path: Path) -> None:
    """twistd's C{--logfile}: SIGUSR1 rotates it, as twistd does, and the new file says so."""
    log = tmp_path / "twistd.log"
    config, port = write_config(tmp_path, "-")
    server = twistd(config, tmp_path, f"--logfile={log}")
    try:
        wait_until(lambda: log.exists() and f"listening on tcp:{port}" in log.read_text())
        server.process.send_signal(signal.SIGUSR1)
        wait_until(lambda: log.exists() and "Log file rotated on SIGUSR1" in log.read_text())
        refuse_one(port)
        wait_until(lambda: "refused" in log.read_text())
    finally:
        server.stop()
    rotated = (tmp_path / "twistd.log.1").read_text()
    assert f"listening on tcp:{port}" in rotated and "refused" not in rotated
