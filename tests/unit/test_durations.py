"""tests/durations.py: make test's JUnit reports read back as the slowest tests and the time by module."""

from __future__ import annotations

from pathlib import Path

from tests.durations import by_module, cases, main

REPORT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4" time="150.5">
<testcase classname="tests.unit.test_engine" name="test_fast" time="0.25" />
<testcase classname="tests.e2e.test_upgrade" name="test_under_load" time="236.69" />
<testcase classname="tests.e2e.test_upgrade" name="test_killed[during-pip]" time="34.51"><failure message="x"/>
</testcase>
<testcase classname="tests.unit.test_app.TestRoutes" name="test_in_a_class" time="1.5" />
</testsuite></testsuites>
"""
ALONE = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="1" time="61.2">
<testcase classname="tests.integration.test_calibration" name="test_measures" time="60.0" />
</testsuite></testsuites>
"""


def test_the_slowest_first_and_the_time_by_module(tmp_path: Path, capsys: object) -> None:
    report, alone = tmp_path / "junit.xml", tmp_path / "junit-alone.xml"
    report.write_text(REPORT)
    alone.write_text(ALONE)
    found = cases(report)
    assert [(c.module, c.name, c.seconds, c.outcome) for c in found] == [
        ("tests/e2e/test_upgrade.py", "test_under_load", 236.69, "passed"),
        ("tests/e2e/test_upgrade.py", "test_killed[during-pip]", 34.51, "failure"),
        ("tests/unit/test_app.py", "test_in_a_class", 1.5, "passed"),
        ("tests/unit/test_engine.py", "test_fast", 0.25, "passed"),
    ]
    assert by_module(found)[0] == ("tests/e2e/test_upgrade.py", 2, 271.2)
    tsv = tmp_path / "durations.tsv"
    assert main([str(report), str(alone), "--slowest", "2", "--tsv", str(tsv)]) == 0
    rows = tsv.read_text().splitlines()
    assert rows[1] == "236.69\tpassed\ttests/e2e/test_upgrade.py::test_under_load"
    assert rows[2] == "60.00\tpassed\ttests/integration/test_calibration.py::test_measures"  # both, slowest first
    printed = capsys.readouterr().out  # type: ignore[attr-defined]
    assert printed.startswith(
        "5 tests, 5.5 minutes of tests (wall minutes: junit.xml 2.5, junit-alone.xml 1.0); the 2 slowest:"
    )
    assert "test_in_a_class" not in printed.split("by module:")[0]  # only the two slowest above it
    assert main([str(tmp_path / "missing.xml")]) == 1
