"""
The command line as an operator meets it, through the real C{twistd} and
C{python -m txwssec}: a configuration error is one line naming the key path
(no usage block), C{--version} names txwssec's version, C{--help} points at
a command that prints the configuration reference, and that reference is
docs/configuration.rst, from a checkout and from an installed package.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from processes import REPO, TIMEOUT, TWISTD, repo_env

import txwssec
from txwssec import __main__ as cli

GOOD = """
[server]
listen = ["tcp:0:interface=127.0.0.1"]

[[route]]
path = "/echo"
app = "echo"
auth = ["anonymous"]
"""


def run(*args: str, cwd: Path) -> tuple[int, str, str]:
    """Run a command to completion: its status, standard output and error."""
    done = subprocess.run(
        list(args),
        cwd=cwd,
        env=repo_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    return done.returncode, done.stdout, done.stderr


def twistd(*args: str, cwd: Path) -> tuple[int, str, str]:
    return run(str(TWISTD), *args, cwd=cwd)


def python_m_txwssec(*args: str, cwd: Path = REPO) -> tuple[int, str, str]:
    return run(sys.executable, "-m", "txwssec", *args, cwd=cwd)


# -- configuration errors under twistd ------------------------------------------------


def write(folder: Path, content: str | bytes) -> Path:
    path = folder / "wssec.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (GOOD.replace("[server]", "[server]\nbogus = 1"), "server.bogus: unknown key"),
        (GOOD.replace('listen = ["tcp:0:interface=127.0.0.1"]', 'listen = "tcp:0"'), None),
        (GOOD.replace('auth = ["anonymous"]', 'auth = ["kerberos"]'), None),
        (GOOD.replace("[server]", "[server"), None),
        (b"# \xff\n" + GOOD.encode(), "not UTF-8"),
        (GOOD.replace("tcp:0:", "nonsense:0:"), None),
    ],
    ids=["unknown-key", "wrong-type", "unknown-method", "invalid-toml", "not-utf8", "endpoint"],
)
def test_config_error_is_one_line(tmp_path: Path, content: str | bytes, message: str) -> None:
    """
    Exactly the line C{check-config} prints, on standard error, status 1:
    no usage block, no traceback, nothing on standard output.
    """
    path = write(tmp_path, content)
    _, _, expected = python_m_txwssec("check-config", str(path), cwd=tmp_path)
    assert expected.startswith(f"{path}: ") and expected.count("\n") == 1
    if message:
        assert expected == f"{path}: {message}\n"

    status, out, err = twistd("-n", "--pidfile=", "wssec", "--config", str(path), cwd=tmp_path)

    assert (status, out, err) == (1, "", expected)


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    status, out, err = twistd("-n", "--pidfile=", "wssec", "--config", str(path), cwd=tmp_path)
    assert (status, out, err) == (1, "", f"{path}: cannot read: No such file or directory\n")


def test_unreadable_config_is_one_line(tmp_path: Path) -> None:
    """A path that cannot be read as a file (a folder: root reads any file)."""
    status, out, err = twistd("-n", "--pidfile=", "wssec", "--config", str(tmp_path), cwd=tmp_path)
    assert (status, out, err) == (1, "", f"{tmp_path}: cannot read: Is a directory\n")


def test_config_error_daemonizing(tmp_path: Path) -> None:
    """Without -n too: the error comes before twistd forks or writes a PID file."""
    path = write(tmp_path, GOOD.replace("[server]", "[server]\nbogus = 1"))
    status, out, err = twistd(
        f"--pidfile={tmp_path / 'twistd.pid'}", "wssec", "--config", str(path), cwd=tmp_path
    )
    assert (status, out, err) == (1, "", f"{path}: server.bogus: unknown key\n")
    assert not (tmp_path / "twistd.pid").exists()


def test_unknown_option_keeps_the_usage(tmp_path: Path) -> None:
    """A genuine usage error still shows the usage, then the error."""
    status, out, _ = twistd("-n", "--pidfile=", "wssec", "--bogus", cwd=tmp_path)
    assert status == 1
    assert "--config=" in out
    assert out.rstrip("\n").endswith(": option --bogus not recognized")


# -- --version -------------------------------------------------------------------------


def check_versions(text: str) -> None:
    lines = text.splitlines()
    assert lines[0] == f"txwssec {txwssec.__version__}"
    assert re.fullmatch(r"Twisted \d+\.\d+\.\d+\S*", lines[1])
    assert re.fullmatch(r"Autobahn \d+\.\d+\.\d+\S*", lines[2])
    assert re.fullmatch(r"Python 3\.\d+\.\d+\S*", lines[3])
    assert re.fullmatch(r"OpenSSL \d+\.\d+.* \(cryptography \d+\.\d+\.\d+\S*\)", lines[4])
    assert len(lines) == 5


def test_twistd_wssec_version(tmp_path: Path) -> None:
    status, out, err = twistd("wssec", "--version", cwd=tmp_path)
    assert (status, err) == (0, "")
    check_versions(out)


def test_python_m_txwssec_version(tmp_path: Path) -> None:
    status, out, err = python_m_txwssec("--version", cwd=tmp_path)
    assert (status, err) == (0, "")
    check_versions(out)


# -- --help and the configuration reference ------------------------------------------


def docs_reference() -> str:
    """docs/configuration.rst's "Configuration reference" section, found independently."""
    text = (REPO / "docs" / "configuration.rst").read_text(encoding="utf-8")
    start = text.index("Configuration reference\n=======================\n")
    end = re.compile(r"\n\n\S[^\n]*\n=+\n").search(text, start + 50)
    section = text[start : end.start() if end else len(text)]
    kept = [
        block
        for block in section.split("\n\n")
        if not re.match(r"\.\. (not-run|tested-by):", block)
    ]
    return "\n\n".join(kept).rstrip("\n") + "\n"


def test_help_points_to_a_command(tmp_path: Path) -> None:
    status, out, _ = twistd("wssec", "--help", cwd=tmp_path)
    assert status == 0
    text = " ".join(out.split())
    assert "'python -m txwssec config-reference' prints its reference" in text
    assert "'python -m txwssec check-config FILE' checks one" in text
    assert "README" not in text


def test_config_reference_prints_docs_page(tmp_path: Path) -> None:
    status, out, err = python_m_txwssec("config-reference", cwd=tmp_path)
    assert (status, err) == (0, "")
    assert out == docs_reference()
    assert out.startswith("Configuration reference\n=======================\n\n")
    assert "``python -m txwssec check-config FILE``" in out
    assert "[server]" in out
    assert ".. not-run" not in out and ".. tested-by" not in out  # the docs tests' markers


def test_config_reference_from_installed_package(tmp_path: Path) -> None:
    """
    Installed (not editable) there is no checkout: the package carries
    docs/configuration.rst, copied in by setup.py when it is built. The
    source is copied first (the files git knows, as a release has them), so
    the build leaves nothing in the checkout.
    """
    source = tmp_path / "source"
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=TIMEOUT
    ).stdout.decode()
    for name in [*filter(None, listed.split("\0")), "setup.py", "MANIFEST.in"]:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
    target = tmp_path / "installed"
    installing = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, source],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installing.returncode == 0, installing.stderr
    assert (target / "txwssec" / "docs" / "configuration.rst").is_file()
    assert not (target / "docs").exists()
    printing = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, txwssec, txwssec.__main__ as cli; "
            "print(txwssec.__file__, file=sys.stderr); sys.exit(cli.main(sys.argv[1:]))",
            "config-reference",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert printing.returncode == 0, printing.stderr
    assert printing.stderr.startswith(str(target / "txwssec")), printing.stderr
    assert printing.stdout == docs_reference()


def test_config_reference_reads_the_checkout_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without a packaged copy (editable install) the checkout's file is the reference."""
    monkeypatch.setattr(cli, "CHECKOUT_REFERENCE", tmp_path / "configuration.rst")
    with pytest.raises(FileNotFoundError):
        cli.config_reference()  # editable, no checkout file: nothing to print
    (tmp_path / "configuration.rst").write_text(
        "Configuration reference\n=======================\n\nx\n"
    )
    assert cli.config_reference() == "Configuration reference\n=======================\n\nx\n"


def test_reference_section_ends_at_next_heading() -> None:
    readme = (
        "Intro\n=====\n\ntext\n\nConfiguration reference\n=======================\n\n"
        "body\n\n``x``\n-----\n\nsub\n\nSecurity defaults\n=================\n\nmore\n"
    )
    assert cli.reference_section(readme) == (
        "Configuration reference\n=======================\n\nbody\n\n``x``\n-----\n\nsub\n"
    )
