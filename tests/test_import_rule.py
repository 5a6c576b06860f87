"""
C{python -m txwssec check-config} and C{twistd wssec} import a route's
C{app = "module:Class"} by the same rule: the current directory is not on
the path; the module must be importable (installed, or on C{PYTHONPATH}).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from processes import TIMEOUT, TWISTD, free_port, repo_env

APP = """
from txwssec import SecureServerProtocol


class Hello(SecureServerProtocol):
    pass
"""


def folder_with_app(tmp_path: Path) -> Path:
    (tmp_path / "localapp.py").write_text(APP)
    (tmp_path / "w.toml").write_text(
        f"""
[server]
listen = ["tcp:{free_port()}:interface=127.0.0.1"]

[[route]]
path = "/hello"
app = "localapp:Hello"
auth = ["anonymous"]
"""
    )
    return tmp_path


def run(args: list[str], cwd: Path, pythonpath: str = "") -> subprocess.CompletedProcess[str]:
    env = repo_env()
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env["PYTHONPATH"]])
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def test_check_config_does_not_import_from_the_current_directory(tmp_path: Path) -> None:
    """The same answer as twistd's: the module in the current directory is not found."""
    folder = folder_with_app(tmp_path)
    checked = run([sys.executable, "-m", "txwssec", "check-config", "w.toml"], folder)
    assert checked.returncode == 1
    assert "route[0].app: cannot import localapp" in checked.stderr
    served = run([str(TWISTD), "-n", "--pidfile=", "wssec", "--config", "w.toml"], folder)
    assert served.returncode == 1
    assert "route[0].app: cannot import localapp" in served.stderr


def test_check_config_imports_from_pythonpath(tmp_path: Path) -> None:
    """On PYTHONPATH, the module is found."""
    folder = folder_with_app(tmp_path)
    checked = run([sys.executable, "-m", "txwssec", "check-config", "w.toml"], folder, str(folder))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == "w.toml: ok (1 routes, 0 consumers)\n"
