"""The Locust suite end to end, briefly, in both load profiles: service, Locust, RSS samples, verdict, plot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.sampler import read_csv

ROOT = Path(__file__).resolve().parents[2]


CHECKS = {"slope_per_min", "steady", "peak", "lost_requests"}
PROFILES = {
    # profile: (users, the request names Locust reports, the service's environment)
    "indexing": (3, ["/embed [index]", "/v1/embeddings [search]"], {}),
    # At most 64 whole documents a request: a slow CPU answers several within the minute.
    "whole-documents": (2, ["/embed [whole documents]"], {"EMBEDDING_MAX_INPUTS": "64"}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[subprocess.Popen[bytes], Path]]]:
    """Both profiles at once, each with its own service on its own port: the verdict is on each service's RSS and
    lost requests, which a neighbour's load slows but does not change (a minute each, side by side instead of one
    after the other)."""
    started: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for profile, (users, _, env) in PROFILES.items():
        out = tmp_path_factory.mktemp(profile) / "loadtest"
        command = [sys.executable, "-m", "loadtest.run", "--duration", "60", "--ramp", "10", "--users", str(users)]
        with (out.parent / "stdout.txt").open("wb") as stdout:
            process = subprocess.Popen(
                [*command, "--profile", profile, "--out", str(out)],
                cwd=ROOT,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,
            )
        started[profile] = (process, out)
    yield started
    for process, _ in started.values():
        if process.poll() is None:  # a test that failed early: its service and Locust go too
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("profile", list(PROFILES))
def test_a_short_load_run_produces_samples_a_verdict_and_a_plot(
    runs: dict[str, tuple[subprocess.Popen[bytes], Path]], profile: str
) -> None:
    _, names, _ = PROFILES[profile]
    process, out = runs[profile]
    returncode = process.wait(timeout=600)
    result = subprocess.CompletedProcess(process.args, returncode, (out.parent / "stdout.txt").read_text())
    print(result.stdout)
    verdict = json.loads((out / "verdict.json").read_text())
    # The service as shipped stays within its steady and peak bounds and loses no request, even in a minute. The
    # slope is printed, not required: fitted over the last 30 s of a sawtooth (a cleanup every 50 requests, trims
    # between batches) it swings by tens of MB/min on the same build (+30.2, -2.6 and -15.3 in three runs on
    # 2026-12-03); its bound, 0.5% of the baseline a minute, needs the 5-minute runs of `make loadtest`. A service
    # that leaks fails the same verdict, slope included: tests/integration/test_leak.py.
    failed = [c for c in verdict["checks"] if not c["passed"] and c["name"] != "slope_per_min"]
    assert failed == [], result.stdout[-3000:]
    assert verdict["passed"] == (result.returncode == 0)  # the exit code says what the verdict says
    assert (verdict["profile"], verdict["locust_exit"]) == (profile, 0)
    assert verdict["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert {c["name"] for c in verdict["checks"]} == CHECKS
    assert next(c for c in verdict["checks"] if c["name"] == "lost_requests")["passed"]
    assert verdict["texts_per_s"] > 0
    assert verdict["peak_bytes"] >= verdict["baseline_bytes"] > 100e6
    for name in names:
        assert verdict["latency_ms"][name]["count"] > 0
        assert verdict["latency_ms"][name]["failures"] == 0

    samples = read_csv(out / "samples.csv")
    assert len(samples) >= 25  # one every 2 s
    assert samples[-1].inputs > samples[0].inputs
    assert (out / "rss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ("PASS" if verdict["passed"] else "FAIL") in result.stdout
