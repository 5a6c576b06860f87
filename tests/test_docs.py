"""
Every code block in README.rst and docs/*.rst is run by a test, or marked.

A block is one of:

* a ``python`` block with no marker: run as a script in a new interpreter;
* a ``toml`` block with no marker: read by the configuration loader
  (C{txwssec.config.parse}), merged into a minimal configuration when it is a
  fragment, with the example files it names next to it;
* marked ``.. tested-by: tests/FILE.py::TEST`` on the line before its
  paragraph: that test runs it (the test must exist);
* marked ``.. not-run: REASON``: it cannot run in a test (a browser, systemd,
  a shell session against a running server, a fragment); Python and TOML
  ones are still checked to parse.

Cross-references (```Section`_`` and ```text <file.rst#anchor>`_``) must
point to a heading or a file that exists.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.rst", *sorted((ROOT / "docs").glob("*.rst"))]
MARKER = re.compile(r"^\s*\.\. (not-run|tested-by): *(\S.*)$")


@dataclass(frozen=True)
class Block:
    """One code block of a document."""

    path: Path
    line: int  # 1-based line of the directive, or of the "::" line
    language: str  # "python", "toml", ... or "literal" for "::"
    source: str  # dedented
    marker: str  # "", "not-run", "tested-by"
    argument: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def blocks(path: Path) -> list[Block]:
    """The code blocks of the reStructuredText file at C{path}."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for number, line in enumerate(lines):
        directive = re.match(r"^\s*\.\. code-block:: *(\S+)\s*$", line)
        stripped = line.rstrip()
        literal = (
            not directive
            and stripped.endswith("::")
            and not stripped.lstrip().startswith("..")
            and not stripped.endswith(":::")
        )
        if not (directive or literal):
            continue
        # The paragraph that introduces the block, and the line before it.
        start = number
        while not directive and start > 0 and lines[start - 1].strip():
            start -= 1
        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marked = MARKER.match(lines[before]) if before >= 0 else None
        # The indented body.
        body_start = number + 1
        while body_start < len(lines) and not lines[body_start].strip():
            body_start += 1
        base = _indent(line)
        item = re.match(r"^\s*(?:[*-]|\d+\.|#\.)\s+", lines[start])
        if literal and start == number and item:
            base = len(item.group(0))
        elif literal and start < number:
            base = _indent(line)
        if body_start == len(lines) or _indent(lines[body_start]) <= base:
            continue  # "::" ending a paragraph without a block (not in these docs)
        end = body_start
        while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
            end += 1
        body = lines[body_start:end]
        cut = min(_indent(x) for x in body if x.strip())
        found.append(
            Block(
                path,
                number + 1,
                directive.group(1) if directive else "literal",
                "\n".join(x[cut:] for x in body).strip("\n") + "\n",
                marked.group(1) if marked else "",
                marked.group(2).strip() if marked else "",
            )
        )
    return found


ALL = [block for path in DOCS for block in blocks(path)]


def test_blocks_found() -> None:
    """The parser sees the blocks (a broken parser would make the rest vacuous)."""
    assert len(ALL) > 50
    assert {"python", "toml", "literal"} <= {block.language for block in ALL}


@pytest.mark.parametrize("block", ALL, ids=[block.where for block in ALL])
def test_every_block_is_run_or_marked(block: Block) -> None:
    if block.marker == "":
        assert block.language in ("python", "toml"), (
            f"{block.where}: a {block.language} block needs '.. tested-by: TEST' or "
            "'.. not-run: REASON' on the line before its paragraph"
        )
    elif block.marker == "tested-by":
        file, _, name = block.argument.partition("::")
        test = ROOT / file
        assert test.is_file(), f"{block.where}: no {file}"
        assert f"def {name}(" in test.read_text(encoding="utf-8"), f"{block.where}: no {name}"
    else:
        assert len(block.argument) > 3, f"{block.where}: not-run needs a reason"


def _python_compiles(source: str, where: str) -> None:
    compile(source, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture(scope="module")
def example_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The examples, development certificates under the names the docs use."""
    from txwssec.devcert import write_dev_certificates

    folder = tmp_path_factory.mktemp("docs") / "examples"
    shutil.copytree(ROOT / "examples", folder, ignore=shutil.ignore_patterns("dev-certs"))
    write_dev_certificates(folder)
    write_dev_certificates(folder / "dev-certs")
    shutil.copy(folder / "ca.pem", folder / "internal-ca.pem")
    return folder


#: Values the configuration reference abbreviates, and valid ones for the loader.
PLACEHOLDERS = {
    '"base64:..."': '"base64:' + "A" * 43 + '="',
    '"sha256:<64 hex>"': '"sha256:' + "0" * 64 + '"',
    '"sha256:9f86d0..."': '"sha256:'
    + "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    + '"',
}


TOML = [b for b in ALL if b.language == "toml" and b.marker == ""]
PYTHON = [b for b in ALL if b.language == "python" and b.marker == ""]


@pytest.mark.parametrize("block", TOML, ids=[block.where for block in TOML])
def test_toml_block_loads(block: Block, example_folder: Path) -> None:
    """A configuration block is accepted by the loader, as a fragment if need be."""
    from txwssec.config import parse
    from txwssec.passwords import hash_password

    source = block.source.replace('"scrypt:15:8:1:..."', f'"{hash_password("pw")}"')
    for placeholder, value in PLACEHOLDERS.items():
        source = source.replace(placeholder, value)
    data = tomllib.loads(source)
    base: dict[str, Any] = {
        "server": {"listen": ["tcp:0:interface=127.0.0.1"]},
        "consumer": [{"name": "john", "keys": ["john-key"]}],
    }
    methods = sorted(data.get("auth", {}))
    if "route" not in data:
        base["route"] = [{"path": "/echo", "app": "echo", "auth": [*methods, "key"]}]
    used = {method for route in data.get("route", []) for method in route.get("auth", [])}
    if "jwt" in used and "jwt" not in methods:
        base["auth"] = {"jwt": {"algorithms": ["HS256"], "secret": "s" * 32}}
    merged = _merge(base, data)
    unused = [method for method in methods if method not in used]
    if "route" in data and unused:  # a catalogue of methods: one more route uses them
        merged["route"] = [*data["route"], {"path": "/_docs", "app": "echo", "auth": unused}]
    config = parse(merged, example_folder)
    assert config.policy.routes


@pytest.mark.parametrize("block", PYTHON, ids=[block.where for block in PYTHON])
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    """A Python block runs to completion as a script."""
    done = subprocess.run(
        [sys.executable, "-c", block.source],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{block.where}:\n{done.stderr}"


NOT_RUN = [b for b in ALL if b.marker == "not-run" and b.language in ("python", "toml")]


@pytest.mark.parametrize("block", NOT_RUN, ids=[block.where for block in NOT_RUN])
def test_not_run_blocks_parse(block: Block) -> None:
    """A Python or TOML block that cannot run still parses."""
    if block.language == "python":
        _python_compiles(block.source, block.where)
    else:
        tomllib.loads(block.source)


# -- cross-references -----------------------------------------------------------------


def _anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def headings(path: Path) -> set[str]:
    """The section titles of an .rst file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return {
        lines[i - 1].strip()
        for i in range(1, len(lines))
        if re.fullmatch(r"([=\-~^])\1+", lines[i])
        and lines[i - 1].strip()
        and not re.fullmatch(r"([=\-~^])\1+", lines[i - 1])
    }


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_references_resolve(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    own = headings(path)
    for match in re.finditer(r"`([^`]+?)`_(?!_)", text):
        label = " ".join(match.group(1).split())
        link = re.fullmatch(r"(.*?)\s*<([^>]+)>", label)
        if link is None:
            assert label in own, f"{path.name}: `{label}`_ names no heading of this file"
            continue
        target = link.group(2)
        if "://" in target:
            continue
        file, _, fragment = target.partition("#")
        linked = (path.parent / file).resolve()
        assert linked.is_file(), f"{path.name}: {target}: no such file"
        if fragment:
            assert fragment in {_anchor(h) for h in headings(linked)}, (
                f"{path.name}: {target}: no such heading"
            )


def test_no_design_md() -> None:
    """Users have no DESIGN.md: the docs do not send them to one."""
    for path in [*DOCS, *(ROOT / "docs").glob("*.md")]:
        assert "DESIGN.md" not in path.read_text(encoding="utf-8"), path
