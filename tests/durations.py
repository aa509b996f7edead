"""Where `make test`'s time goes, from the JUnit reports it writes (reports/junit*.xml: the modules run in
parallel, then the tests that run alone).

    python -m tests.durations                        # the 25 slowest tests and the time by module
    python -m tests.durations --slowest 40 --tsv reports/durations.tsv

Every test's duration (setup, call and teardown together, as JUnit counts it) goes to the TSV, slowest first, so
that a later run can be compared with this one; docs/testing.md keeps the time by module.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPORTS = Path("reports")


@dataclass(frozen=True)
class Case:
    module: str
    name: str
    seconds: float
    outcome: str


def cases(report: Path) -> list[Case]:
    """Every test case of a pytest JUnit report, slowest first."""
    found = []
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        module = case.get("classname", "").split(".")
        path = "/".join(module[: next((i + 1 for i, p in enumerate(module) if p.startswith("test_")), len(module))])
        found.append(Case(f"{path}.py", case.get("name", ""), float(case.get("time", 0)), outcome))
    return sorted(found, key=lambda c: -c.seconds)


def wall_seconds(report: Path) -> float:
    """How long the run that wrote ``report`` took, its workers side by side."""
    root = ET.parse(report).getroot()
    suite = root if root.tag == "testsuite" else next(root.iter("testsuite"))
    return float(suite.get("time", 0))


def by_module(found: list[Case]) -> list[tuple[str, int, float]]:
    """(module, tests, seconds), the most time first."""
    totals: dict[str, list[float]] = defaultdict(list)
    for case in found:
        totals[case.module].append(case.seconds)
    return sorted(((m, len(s), sum(s)) for m, s in totals.items()), key=lambda row: -row[2])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("reports", nargs="*", type=Path, help="JUnit reports (default: reports/junit*.xml)")
    parser.add_argument("--slowest", type=int, default=25)
    parser.add_argument("--tsv", type=Path, help="write every test's duration here")
    args = parser.parse_args(argv)
    reports = args.reports or sorted(REPORTS.glob("junit*.xml"))
    missing = [str(report) for report in reports if not report.exists()]
    if not reports or missing:
        sys.stderr.write(f"{', '.join(missing) or REPORTS}: no JUnit report (make test writes them)\n")
        return 1
    found = sorted((case for report in reports for case in cases(report)), key=lambda c: -c.seconds)
    if args.tsv is not None:
        args.tsv.parent.mkdir(parents=True, exist_ok=True)
        rows = [f"{c.seconds:.2f}\t{c.outcome}\t{c.module}::{c.name}" for c in found]
        args.tsv.write_text("seconds\toutcome\ttest\n" + "\n".join(rows) + "\n")
    total = sum(c.seconds for c in found)
    out = sys.stdout
    runs = ", ".join(f"{report.name} {wall_seconds(report) / 60:.1f}" for report in reports)
    out.write(f"{len(found)} tests, {total / 60:.1f} minutes of tests (wall minutes: {runs}); ")
    out.write(f"the {args.slowest} slowest:\n")
    for case in found[: args.slowest]:
        out.write(f"{case.seconds:8.1f} s  {case.module}::{case.name}\n")
    out.write("by module:\n")
    for module, count, seconds in by_module(found):
        out.write(f"{seconds:8.1f} s  {count:4d} tests  {module}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
