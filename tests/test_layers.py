"""
The layers contract (.importlinter, docs/architecture.md) holds, and
`lint-imports` (run by .ci/run) fails on an import that breaks it: a value
module naming a protocol, even under TYPE_CHECKING, or a circle inside a
layer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run lint-imports on the txwssec package found in C{root}."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(root / ".importlinter")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A copy of the package and its contract, to break."""
    shutil.copytree(ROOT / "txwssec", tmp_path / "txwssec", ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def append(path: Path, code: str) -> None:
    path.write_text(path.read_text() + code)


def test_the_layers_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_copy_holds(copy: Path) -> None:
    # The copy is what the next tests break: unbroken, it passes.
    result = lint_imports(copy)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_value_naming_a_protocol_fails(copy: Path) -> None:
    append(
        copy / "txwssec" / "policy.py",
        "\nfrom typing import TYPE_CHECKING\n\n"
        "if TYPE_CHECKING:\n    from txwssec.server import SecureServerProtocol\n",
    )
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "txwssec.policy is not allowed to import txwssec.server" in result.stdout


def test_a_mechanism_importing_a_protocol_fails(copy: Path) -> None:
    append(copy / "txwssec" / "admission.py", "\nimport txwssec.gateway.relay\n")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "txwssec.admission is not allowed to import txwssec.gateway" in result.stdout


def test_a_circle_inside_a_layer_fails(copy: Path) -> None:
    # The protocol names its factory: server.protocol <-> server.factory.
    append(copy / "txwssec" / "server" / "context.py", "\nimport txwssec.server.factory\n")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "No cycles are allowed in txwssec.server" in result.stdout


def test_a_module_outside_every_layer_fails(copy: Path) -> None:
    (copy / "txwssec" / "stray.py").write_text('"""A module the contract does not place."""\n')
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "txwssec.stray" in result.stdout
