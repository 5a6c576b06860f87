"""
Reading kosoku's Autobahn-format reports, and the summaries made of them:
the console table and ``RESULTS.md``.
"""

from __future__ import annotations

import fnmatch
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The categories of the summary, in table order. Anything else is FAILED.
CATEGORIES = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
#: Verdicts for the closing handshake that do not fail a case.
ACCEPTABLE_CLOSE = ("OK", "INFORMATIONAL", "NON-STRICT")


@dataclass(frozen=True)
class CaseOutcome:
    """One case of one target, as its index entry and per-case report say."""

    case_id: str
    behavior: str
    behavior_close: str
    remote_close_code: int | None
    report: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def category(self) -> str:
        """OK, NON-STRICT, INFORMATIONAL, UNIMPLEMENTED or FAILED."""
        if self.behavior_close not in ACCEPTABLE_CLOSE:
            return "FAILED"
        if self.behavior in CATEGORIES[:4]:
            return self.behavior
        return "FAILED"

    @property
    def raw(self) -> str:
        """The verdicts as kosoku wrote them, e.g. C{OK / UNCLEAN}."""
        return f"{self.behavior} / {self.behavior_close}"


@dataclass
class TargetResult:
    """The outcome of one target: its cases, or why it has none."""

    name: str
    description: str
    cases: dict[str, CaseOutcome] = field(default_factory=dict)
    duration: float = 0.0
    error: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ran(self) -> bool:
        """Whether the target produced a report."""
        return self.error is None

    def counts(self) -> Counter[str]:
        """Cases per category."""
        return Counter(case.category for case in self.cases.values())

    def not_ok(self) -> list[CaseOutcome]:
        """The cases that are not OK, in case order."""
        return [c for c in self.sorted_cases() if c.category != "OK"]

    def sorted_cases(self) -> list[CaseOutcome]:
        return sorted(self.cases.values(), key=lambda c: case_key(c.case_id))


def case_key(case_id: str) -> tuple[int, ...]:
    """Sort key for case ids: C{1.2.10} after C{1.2.9}."""
    return tuple(int(part) if part.isdigit() else 0 for part in case_id.split("."))


def read_reports(folder: Path) -> dict[str, CaseOutcome]:
    """
    The cases of kosoku's C{index.json} in C{folder}, with each case's JSON
    report (for explanations).

    @raise FileNotFoundError: when kosoku wrote no index.
    """
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    cases: dict[str, CaseOutcome] = {}
    for entries in index.values():
        for case_id, entry in entries.items():
            report: dict[str, Any] = {}
            report_file = folder / str(entry.get("reportfile", ""))
            if report_file.is_file():
                report = json.loads(report_file.read_text(encoding="utf-8"))
            cases[case_id] = CaseOutcome(
                case_id=case_id,
                behavior=str(entry.get("behavior")),
                behavior_close=str(entry.get("behaviorClose")),
                remote_close_code=entry.get("remoteCloseCode"),
                report=report,
            )
    return cases


# -- the console summary ---------------------------------------------------------


def table(results: Sequence[TargetResult]) -> list[str]:
    """A plain-text table: one row per target."""
    header = ("target", "cases", *CATEGORIES, "time")
    rows: list[tuple[str, ...]] = [header]
    for result in results:
        if not result.ran:
            rows.append((result.name, "-", *("-" for _ in CATEGORIES), _duration(result)))
            continue
        counts = result.counts()
        rows.append(
            (
                result.name,
                str(len(result.cases)),
                *(str(counts[c]) for c in CATEGORIES),
                _duration(result),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def details(result: TargetResult) -> list[str]:
    """The case ids that are not OK (and the raw verdicts of FAILED ones)."""
    if not result.ran:
        return [f"{result.name}: DID NOT RUN: {result.error}"]
    lines = []
    by_category: dict[str, list[CaseOutcome]] = {}
    for case in result.not_ok():
        by_category.setdefault(case.category, []).append(case)
    for category in CATEGORIES[1:]:
        cases = by_category.get(category)
        if not cases:
            continue
        if category == "FAILED":
            listed = ", ".join(f"{c.case_id} ({c.raw})" for c in cases)
        else:
            listed = ", ".join(c.case_id for c in cases)
        lines.append(f"{result.name}: {category}: {listed}")
    lines += [f"{result.name}: warning: {w}" for w in result.warnings]
    return lines


def _duration(result: TargetResult) -> str:
    seconds = round(result.duration)
    return f"{seconds // 60}m{seconds % 60:02d}s"


# -- RESULTS.md --------------------------------------------------------------------


@dataclass(frozen=True)
class Note:
    """An explanation of why cases matching C{pattern} are not OK."""

    pattern: str
    text: str
    targets: tuple[str, ...] = ()

    def applies(self, case_id: str, target: str) -> bool:
        if self.targets and target not in self.targets:
            return False
        return fnmatch.fnmatchcase(case_id, self.pattern)


def markdown(
    results: Sequence[TargetResult],
    header: Iterable[str],
    notes: Sequence[Note],
    findings: str = "",
) -> str:
    """
    RESULTS.md: header lines, the table, the findings (markdown), and every
    case that is not OK with the notes that explain it.
    """
    lines = list(header)
    lines += [
        "",
        "## Summary",
        "",
        "| target | what it measures | cases | OK | NON-STRICT | INFORMATIONAL "
        "| UNIMPLEMENTED | FAILED | time |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for result in results:
        if not result.ran:
            lines.append(
                f"| {result.name} | {_one_line(result.description)} "
                f"| did not run: {_one_line(result.error or '')} "
                "| | | | | | |"
            )
            continue
        counts = result.counts()
        cells = " | ".join(str(counts[c]) for c in CATEGORIES)
        lines.append(
            f"| {result.name} | {_one_line(result.description)} | {len(result.cases)} | {cells} "
            f"| {_duration(result)} |"
        )
    warnings = [(r.name, w) for r in results for w in r.warnings]
    if warnings:
        lines += ["", "Warnings:", ""]
        lines += [f"- {name}: {warning}" for name, warning in warnings]

    if findings.strip():
        lines += ["", findings.strip()]

    # Group the not-OK cases by case id, across targets.
    grouped: dict[str, list[tuple[TargetResult, CaseOutcome]]] = {}
    for result in results:
        for case in result.not_ok():
            grouped.setdefault(case.case_id, []).append((result, case))
    lines += ["", "## Cases not OK", ""]
    if not grouped:
        lines.append("None: every case is OK on every target.")
    for case_id in sorted(grouped, key=case_key):
        entries = grouped[case_id]
        report = entries[0][1].report
        lines += [f"### {case_id}", ""]
        if report.get("description"):
            lines.append(f"*Case:* {_one_line(report['description'])}  ")
        if report.get("expectation"):
            lines.append(f"*Expectation:* {_one_line(report['expectation'])}")
        lines.append("")
        lines += [
            "| target | verdict | close code | kosoku says |",
            "|---|---|--:|---|",
        ]
        for result, case in entries:
            said = "; ".join(
                _one_line(str(case.report.get(k, "")))
                for k in ("result", "resultClose")
                if case.report.get(k)
            )
            code = "" if case.remote_close_code is None else str(case.remote_close_code)
            lines.append(f"| {result.name} | {case.raw} | {code} | {said} |")
        lines.append("")
        unexplained = [r.name for r, _ in entries]
        for note in notes:
            targets = [r.name for r, _ in entries if note.applies(case_id, r.name)]
            if not targets:
                continue
            if len(targets) != len(entries):
                lines.append(f"*{', '.join(targets)}:* {note.text.strip()}")
            else:
                lines.append(note.text.strip())
            lines.append("")
            unexplained = [name for name in unexplained if name not in targets]
        if unexplained:
            lines += [
                f"**No explanation recorded for {', '.join(unexplained)}: investigate.**",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
