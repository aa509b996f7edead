"""The rehearsal's verdict (the rehearsal itself: tests/e2e/test_replicas.py): what it calls a failure."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from loadtest.rehearsal import READY_AGAIN_S, Balancer, Summary, judge
from loadtest.service import free_port

MB = 1_000_000
GOOD = Summary(
    seconds=20.0,
    limit_bytes=700 * MB,
    requests=40,
    statuses={"200": 40},
    retried_elsewhere=3,
    served={"a": 30, "b": 10},
    b_taken_out=2,
    b_out_s=6,
    b_ready_after_load_s=0.3,
    b_back_after_load_s=1.2,
    b_rejected_by_prometheus=3,
    b_peak_rss_bytes=900 * MB,
    a_peak_rss_bytes=1100 * MB,
)


def test_a_rehearsal_that_went_as_it_should_passes() -> None:
    assert judge(GOOD) == []
    assert judge(dataclasses.replace(GOOD, b_ready_after_load_s=READY_AGAIN_S)) == []  # shedding's minimum, and 2 s


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"statuses": {"200": 39, "503": 1}}, "requests failed"),
        ({"b_taken_out": 0}, "never taken out"),
        ({"b_out_s": 0}, "never taken out"),
        ({"b_ready_after_load_s": None}, f"not ready within {READY_AGAIN_S} s"),
        ({"b_ready_after_load_s": READY_AGAIN_S + 0.5}, f"not ready within {READY_AGAIN_S} s"),
        ({"b_back_after_load_s": None}, "did not come back"),
        ({"b_peak_rss_bytes": 650 * MB}, "Prometheus did not see"),
    ],
)
def test_each_failure_is_named(change: dict[str, object], complaint: str) -> None:
    failed = judge(dataclasses.replace(GOOD, **change))  # type: ignore[arg-type]
    assert len(failed) == 1
    assert complaint in failed[0]


def test_the_balancer_starts_in_a_directory_given_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """make rehearsal writes to reports/rehearsal: haproxy took the relative admin socket's path for host:port and
    refused its configuration, and the rehearsal ended before its load ("haproxy never saw replica a ready")."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    balancer = Balancer(Path("reports"), free_port(), free_port())
    try:
        assert balancer.wait_up("a", 2) is None  # nothing listens there: haproxy runs and says so
        assert balancer.proc.poll() is None, (tmp_path / "reports" / "haproxy.log").read_text()
        assert balancer.server("a")["status"] in ("DOWN", "no check")
    finally:
        balancer.terminate()
