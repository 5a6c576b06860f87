"""
C{python -m txwssec}: the operator's helper commands, run as subprocesses.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from processes import REPO, TIMEOUT, repo_env

from txwssec.passwords import verify_password


def txwssec(
    *args: str, stdin: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run C{python -m txwssec ARGS} with C{stdin} piped (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "txwssec", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=repo_env(),
        cwd=cwd or REPO,
        timeout=TIMEOUT,
    )


# -- hash-password ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "prefix"),
    [
        ((), "scrypt:15:8:1:"),
        (("--scheme", "scrypt"), "scrypt:"),
        (("--scheme", "pbkdf2-sha256"), "pbkdf2-sha256:600000:"),
    ],
    ids=["default", "scrypt", "pbkdf2"],
)
def test_hash_password_from_stdin(args: tuple[str, ...], prefix: str) -> None:
    done = txwssec("hash-password", *args, stdin="s3cret pass\n")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    stored = done.stdout.strip()
    assert done.stdout == stored + "\n"
    assert stored.startswith(prefix)
    assert "s3cret" not in done.stdout
    assert verify_password("s3cret pass", stored)
    assert not verify_password("s3cret pass ", stored)
    assert not verify_password("s3cret", stored)


def test_hash_password_reads_only_the_first_line() -> None:
    """The line ending (LF or CRLF) is not part of the password; spaces are."""
    done = txwssec("hash-password", stdin="  spaced out \r\nsecond line\n")
    assert done.returncode == 0, done.stderr
    stored = done.stdout.strip()
    assert verify_password("  spaced out ", stored)
    assert not verify_password("spaced out", stored)


def test_hash_password_non_ascii() -> None:
    done = txwssec("hash-password", stdin="pässwörd✓\n")
    assert done.returncode == 0, done.stderr
    assert verify_password("pässwörd✓", done.stdout.strip())


def test_hash_password_salted() -> None:
    """The same password hashes differently each time."""
    first = txwssec("hash-password", stdin="same\n").stdout.strip()
    second = txwssec("hash-password", stdin="same\n").stdout.strip()
    assert first != second
    assert verify_password("same", first)
    assert verify_password("same", second)


@pytest.mark.parametrize("stdin", ["", "\n", "\r\n"], ids=["eof", "lf", "crlf"])
def test_hash_password_empty(stdin: str) -> None:
    done = txwssec("hash-password", stdin=stdin)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == "error: empty password\n"


def test_hash_password_unknown_scheme() -> None:
    done = txwssec("hash-password", "--scheme", "md5", stdin="pw\n")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "invalid choice: 'md5'" in done.stderr


def test_hash_password_refuses_a_password_argument() -> None:
    """The password is never taken from the command line."""
    done = txwssec("hash-password", "hunter2", stdin="")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "unrecognized arguments" in done.stderr


def test_hash_password_usable_in_config(tmp_path: Path) -> None:
    """The printed hash is accepted as [[consumer]] password."""
    stored = txwssec("hash-password", "--scheme", "pbkdf2-sha256", stdin="pw\n").stdout.strip()
    path = tmp_path / "wssec.toml"
    path.write_text(GOOD.replace('keys = ["john-key"]', f'password = "{stored}"'))
    path.write_text(
        path.read_text().replace('"key"', '"basic"').replace("[auth.key]", "[auth.basic]")
    )
    done = txwssec("check-config", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{path}: ok (1 routes, 1 consumers)\n"


# -- check-config -------------------------------------------------------------------

GOOD = """
[server]
listen = ["tcp:9080:interface=127.0.0.1"]

[auth.key]

[[consumer]]
name = "john"
keys = ["john-key"]

[[route]]
path = "/echo"
app = "echo"
auth = ["key"]
"""


def test_check_config_good(tmp_path: Path) -> None:
    path = tmp_path / "wssec.toml"
    path.write_text(GOOD)
    done = txwssec("check-config", str(path))
    assert done.returncode == 0
    assert done.stdout == f"{path}: ok (1 routes, 1 consumers)\n"
    assert done.stderr == ""


def test_check_config_quickstart() -> None:
    done = txwssec("check-config", "examples/quickstart.toml", cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "examples/quickstart.toml: ok (1 routes, 1 consumers)\n"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("[server]", "[server]\nbogus = 1", "server.bogus: unknown key"),
        ('auth = ["key"]', 'auth = ["kerberos"]', 'route[0].auth[0]: unknown method "kerberos"'),
        (
            'keys = ["john-key"]',
            'keys = ["john-key"]\n[[consumer]]\nname = "jane"\nkeys = ["x", "john-key"]',
            'consumer[1].keys[1]: key already belongs to consumer "john"',
        ),
        (
            'path = "/echo"',
            'path = "/echo"\nmax_message_size = "big"',
            "route[0].max_message_size: expected integer",
        ),
    ],
    ids=["unknown-key", "unknown-method", "key-reused", "wrong-type"],
)
def test_check_config_bad(tmp_path: Path, old: str, new: str, message: str) -> None:
    path = tmp_path / "wssec.toml"
    path.write_text(GOOD.replace(old, new))
    done = txwssec("check-config", str(path))
    assert done.returncode == 1
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"{path}: {message}")
    assert "Traceback" not in done.stderr


def test_check_config_exact_line(tmp_path: Path) -> None:
    path = tmp_path / "wssec.toml"
    path.write_text(GOOD.replace("[server]", "[server]\nbogus = 1"))
    done = txwssec("check-config", str(path))
    assert done.stderr == f"{path}: server.bogus: unknown key\n"


def test_check_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    done = txwssec("check-config", str(path))
    assert done.returncode == 1
    assert done.stderr == f"{path}: cannot read: No such file or directory\n"


def test_check_config_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "wssec.toml"
    path.write_text("[server\n")
    done = txwssec("check-config", str(path))
    assert done.returncode == 1
    assert done.stderr.startswith(f"{path}: invalid TOML: ")
    assert "Traceback" not in done.stderr


def test_check_config_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "wssec.toml"
    path.write_bytes(GOOD.replace("john", "jos\xe9").encode("latin-1"))
    done = txwssec("check-config", str(path))
    assert done.returncode == 1
    assert done.stderr == f"{path}: not UTF-8\n"


def test_no_command() -> None:
    done = txwssec()
    assert done.returncode == 2
    assert "usage: python -m txwssec" in done.stderr
