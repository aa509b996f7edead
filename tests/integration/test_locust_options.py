"""Locust's own -u, -r and -t drive the indexing load when given (the shape used to replace them)."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from loadtest.service import ServiceProcess

pytestmark = pytest.mark.slow  # a 20 s Locust run

ROOT = Path(__file__).resolve().parents[2]


def logged_at(log: str, event: str) -> datetime:
    (stamp,) = re.findall(rf"^\[([\d-]+ [\d:,]+)\] .*{event}", log, re.MULTILINE)
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")


def test_a_run_time_of_20s_ends_after_20s_with_the_users_asked_for(service: ServiceProcess, tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "--host", service.url,
         "-u", "2", "-r", "2", "-t", "20s", "--csv", str(tmp_path / "run"), "--only-summary"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    began, stopped = (logged_at(result.stderr, f"Shape test {event}") for event in ("starting", "stopping"))
    run = (stopped - began).total_seconds()
    print(f"locust -t 20s: load for {run:.1f} s, {elapsed:.1f} s with start-up (corpus) and shutdown")
    assert 20 <= run < 23  # the shape used to run its own 1200 s
    assert "will be ignored" not in result.stderr
    assert "(2 total users)" in result.stderr
    with (tmp_path / "run_stats.csv").open() as stats:
        (total,) = [row for row in csv.DictReader(stats) if row["Name"] == "Aggregated"]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
