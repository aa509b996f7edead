from __future__ import annotations

from dataclasses import fields

import pytest

from app.reasons import CleanupReason
from loadtest.sampler import REASONS, Sample
from loadtest.verdict import CLEANUP_COLOURS, E5_SMALL, judge, slope_per_minute

MB = 1_000_000


def run(rss_mb: list[float], step_s: float = 10.0) -> list[Sample]:
    return [
        Sample(t_s=i * step_s, rss_bytes=v * MB, requests=i * 5, inputs=i * 100, cleanups_periodic=i // 30)
        for i, v in enumerate(rss_mb)
    ]


def test_slope_is_in_bytes_per_minute() -> None:
    assert slope_per_minute(run([500 + i for i in range(20)])) == pytest.approx(6 * MB)


def test_flat_memory_after_warm_up_passes() -> None:
    samples = run([520, 560, 580] + [590, 585, 592, 588] * 30)  # plateau 1.13x the baseline
    verdict = judge(samples, model="m", policy="smart", warmup_s=60)
    assert verdict.passed
    assert verdict.baseline_bytes == 520 * MB
    assert verdict.peak_bytes == 592 * MB
    assert verdict.texts_per_s == pytest.approx(10.0)
    assert verdict.cleanups["periodic"] == 4


def test_memory_that_keeps_growing_fails_on_the_slope() -> None:
    samples = run([500 + 0.8 * i for i in range(120)])  # 4.8 MB/min, never levels off
    verdict = judge(samples, model="m", policy="off", warmup_s=60)
    assert not verdict.passed
    assert next(c.name for c in verdict.checks if not c.passed) == "slope_per_min"


def test_a_flat_but_too_high_plateau_fails_the_steady_and_peak_bounds() -> None:
    samples = run([500] + [800] * 100)
    failed = {c.name for c in judge(samples, model="m", policy="off", warmup_s=60).checks if not c.passed}
    assert failed == {"steady", "peak"}


def test_e5_small_also_has_an_absolute_peak_band() -> None:
    samples = run([1500] + [1650] * 100)
    checks = {c.name: c for c in judge(samples, model=E5_SMALL, policy="smart", warmup_s=60).checks}
    assert checks["peak_band"].bound == 2_000 * MB
    assert checks["peak_band"].passed


def test_too_few_samples_cannot_be_judged() -> None:
    with pytest.raises(ValueError, match="too few samples"):
        judge(run([500, 501]), model="m", policy="smart", warmup_s=0)


def test_every_cleanup_reason_is_sampled_and_plotted_in_a_colour_of_its_own() -> None:
    assert set(REASONS) == set(CleanupReason)
    assert {f"cleanups_{reason}" for reason in CleanupReason} <= {f.name for f in fields(Sample)}
    assert set(CLEANUP_COLOURS) == set(CleanupReason)
    assert len(set(CLEANUP_COLOURS.values())) == len(CLEANUP_COLOURS)


def test_a_spike_between_two_samples_counts_through_the_kernels_high_water_mark() -> None:
    samples = run([520, 560, 580] + [590, 585, 592, 588] * 30)
    sampled = judge(samples, model="m", policy="smart", warmup_s=60)
    spiked = judge(samples, model="m", policy="smart", warmup_s=60, high_water_bytes=790 * MB)
    assert sampled.passed and sampled.peak_bytes == 592 * MB
    assert spiked.peak_bytes == 790 * MB
    assert [c.name for c in spiked.checks if not c.passed] == ["peak"]  # 790 MB > 1.5 x 520 MB


def test_a_lost_request_fails_the_run_and_none_lost_passes() -> None:
    samples = run([520, 560, 580] + [590, 585, 592, 588] * 30)
    lost = judge(samples, model="m", policy="smart", warmup_s=60, lost_requests=1)
    none = judge(samples, model="m", policy="smart", warmup_s=60, lost_requests=0)
    assert [c.name for c in lost.checks if not c.passed] == ["lost_requests"]
    assert none.passed
    assert "[ok] lost_requests: 0 (bound 0)" in none.summary()
