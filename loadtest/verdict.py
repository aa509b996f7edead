"""Does memory level off? The load-test verdict, computed from sampled RSS, and its plots.

Checks, after the warm-up (the ramp plus one minute) is excluded:
  slope        the linear fit of RSS over the last half of the run rises less than ``max_slope`` per minute
               (default 0.5% of the baseline a minute: unbounded growth at that rate adds half the baseline
               in 100 minutes, while the fit's noise on a 10-minute half stays well under it)
  steady       the median RSS of the last half is at most 1.15 x the loaded-and-warmed baseline
  peak         the highest RSS is at most 1.5 x the baseline (the kernel's own high-water mark where the run
               read it, so that no spike between two samples is missed)
  peak_band    for intfloat/multilingual-e5-small only: the peak is at most 2 GB (the first design's 1.5-2 GB band)
  lost         no request was lost: each was answered, or refused early with Retry-After (Locust's failures: 0)
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.reasons import CleanupReason
from loadtest.sampler import REASONS, Sample

CLEANUP_COLOURS = {
    CleanupReason.THRESHOLD: "red",
    CleanupReason.PERIODIC: "purple",
    CleanupReason.REQUEST_COUNT: "brown",
    CleanupReason.MANUAL: "black",
    CleanupReason.LIMIT: "magenta",
    CleanupReason.LEGACY: "olive",
}

MB = 1_000_000
STEADY_FACTOR = 1.15
PEAK_FACTOR = 1.5
SLOPE_SHARE_PER_MIN = 0.005
E5_SMALL = "intfloat/multilingual-e5-small"
E5_SMALL_PEAK_BAND = (1_500_000_000, 2_000_000_000)


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    bound: float
    passed: bool


@dataclass
class Verdict:
    """The numbers of one run and whether memory levelled off."""

    model: str
    policy: str
    duration_s: float
    warmup_s: float
    baseline_bytes: float
    peak_bytes: float
    end_bytes: float
    steady_bytes: float
    slope_bytes_per_min: float
    requests_per_s: float
    texts_per_s: float
    cleanups: dict[str, int]
    checks: list[Check] = field(default_factory=list)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        lines = [
            f"{'PASS' if self.passed else 'FAIL'}: {self.model}, policy {self.policy}, {self.duration_s / 60:.1f} min",
            f"  RSS baseline {self.baseline_bytes / MB:.0f} MB, peak {self.peak_bytes / MB:.0f} MB, "
            f"end {self.end_bytes / MB:.0f} MB, last-half median {self.steady_bytes / MB:.0f} MB, "
            f"slope {self.slope_bytes_per_min / MB:+.2f} MB/min",
            f"  throughput {self.texts_per_s:.1f} texts/s, {self.requests_per_s:.2f} requests/s",
            f"  cleanups: {', '.join(f'{k} {n}' for k, n in self.cleanups.items())}",
        ]
        for name, stats in self.latency_ms.items():
            lines.append(
                f"  {name}: p50 {stats['p50']:.0f} ms, p95 {stats['p95']:.0f} ms, {stats['count']:.0f} requests"
            )
        lines += [
            f"  [{'ok' if c.passed else 'FAILED'}] {c.name}: {c.value:.0f} (bound {c.bound:.0f})"
            if c.name == "lost_requests"
            else f"  [{'ok' if c.passed else 'FAILED'}] {c.name}: {c.value / MB:.2f} MB (bound {c.bound / MB:.2f} MB)"
            for c in self.checks
        ]
        return "\n".join(lines)


def slope_per_minute(samples: list[Sample]) -> float:
    """Bytes per minute of a least-squares line through the samples."""
    if len(samples) < 3:
        return 0.0
    t = np.array([s.t_s for s in samples])
    rss = np.array([s.rss_bytes for s in samples])
    return float(np.polyfit(t, rss, 1)[0] * 60)


def judge(
    samples: list[Sample],
    *,
    model: str,
    policy: str,
    warmup_s: float,
    max_slope_bytes_per_min: float | None = None,
    latency_ms: dict[str, dict[str, float]] | None = None,
    high_water_bytes: float | None = None,
    lost_requests: int | None = None,
) -> Verdict:
    """The verdict for one run's samples (the first sample is the loaded-and-warmed baseline); with
    ``high_water_bytes`` (the worker's VmHWM over the run) the peak is at least that; with ``lost_requests``
    (Locust's failures) a check that none was lost."""
    if len(samples) < 4:
        raise ValueError(f"too few samples to judge a run: {len(samples)}")
    baseline = samples[0].rss_bytes
    duration = samples[-1].t_s - samples[0].t_s
    after_warmup = [s for s in samples if s.t_s >= warmup_s] or samples
    half = samples[0].t_s + duration / 2
    last_half = [s for s in after_warmup if s.t_s >= half] or after_warmup[-3:]
    slope = slope_per_minute(last_half)
    steady = statistics.median(s.rss_bytes for s in last_half)
    peak = max([s.rss_bytes for s in samples] + ([high_water_bytes] if high_water_bytes else []))
    slope_bound = max_slope_bytes_per_min if max_slope_bytes_per_min is not None else SLOPE_SHARE_PER_MIN * baseline
    checks = [
        Check("slope_per_min", slope, slope_bound, slope < slope_bound),
        Check("steady", steady, STEADY_FACTOR * baseline, steady <= STEADY_FACTOR * baseline),
        Check("peak", peak, PEAK_FACTOR * baseline, peak <= PEAK_FACTOR * baseline),
    ]
    if model == E5_SMALL:
        checks.append(Check("peak_band", peak, E5_SMALL_PEAK_BAND[1], peak <= E5_SMALL_PEAK_BAND[1]))
    if lost_requests is not None:
        checks.append(Check("lost_requests", lost_requests, 0, lost_requests == 0))
    first, last = samples[0], samples[-1]
    return Verdict(
        model=model,
        policy=policy,
        duration_s=duration,
        warmup_s=warmup_s,
        baseline_bytes=baseline,
        peak_bytes=peak,
        end_bytes=last.rss_bytes,
        steady_bytes=steady,
        slope_bytes_per_min=slope,
        requests_per_s=(last.requests - first.requests) / duration if duration else 0.0,
        texts_per_s=(last.inputs - first.inputs) / duration if duration else 0.0,
        cleanups={str(r): int(getattr(last, f"cleanups_{r}") - getattr(first, f"cleanups_{r}")) for r in REASONS},
        checks=checks,
        latency_ms=latency_ms or {},
    )


def _rate(samples: list[Sample]) -> tuple[list[float], list[float]]:
    times, rates = [], []
    for a, b in itertools.pairwise(samples):
        if b.t_s > a.t_s:
            times.append(b.t_s / 60)
            rates.append((b.inputs - a.inputs) / (b.t_s - a.t_s))
    return times, rates


def plot_run(samples: list[Sample], verdict: Verdict, path: Path, thresholds: dict[str, float]) -> None:
    """RSS over time with the bounds and thresholds, cleanups marked, texts/s on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 6))
    minutes = [s.t_s / 60 for s in samples]
    ax.plot(minutes, [s.rss_bytes / MB for s in samples], color="tab:blue", lw=1.6, label="RSS")
    base = verdict.baseline_bytes / MB
    ax.axhline(base, color="grey", ls=":", lw=1, label=f"baseline {base:.0f} MB")
    ax.axhline(base * STEADY_FACTOR, color="tab:green", ls="--", lw=1, label=f"steady bound {STEADY_FACTOR}x")
    ax.axhline(base * PEAK_FACTOR, color="tab:orange", ls="--", lw=1, label=f"peak bound {PEAK_FACTOR}x")
    y_top = 1.25 * max(verdict.peak_bytes / MB, base * PEAK_FACTOR)  # room above the peak for the legend
    off_scale = []
    for name, value in thresholds.items():
        if value / MB <= y_top:
            ax.axhline(value / MB, color="tab:red", ls="-.", lw=1, label=f"{name} {value / MB:.0f} MB")
        else:
            off_scale.append(f"{name} {value / MB:.0f} MB")
    if off_scale:
        note = "configured thresholds above the plot: " + ", ".join(off_scale)
        ax.text(0.01, 0.98, note, transform=ax.transAxes, fontsize=8, va="top", alpha=0.7)
    ax.axvline(verdict.warmup_s / 60, color="black", lw=0.8, alpha=0.4)
    ax.text(verdict.warmup_s / 60, ax.get_ylim()[0], " warm-up", fontsize=8, va="bottom", alpha=0.6)
    for number, reason in enumerate(REASONS):
        key = f"cleanups_{reason}"
        marks = [b for a, b in itertools.pairwise(samples) if getattr(b, key) > getattr(a, key)]
        if marks:
            ax.scatter(
                [m.t_s / 60 for m in marks],
                [m.rss_bytes / MB for m in marks],
                marker="v",
                s=28,
                color=CLEANUP_COLOURS.get(reason, f"C{number}"),  # a reason added later still plots
                zorder=5,
                label=f"cleanup: {reason} ({len(marks)})",
            )
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(0, y_top)
    rate_ax = ax.twinx()
    times, rates = _rate(samples)
    rate_ax.plot(times, rates, color="tab:grey", alpha=0.35, lw=0.8, label="texts/s")
    rate_ax.set_ylabel("texts/s")
    handles = ax.get_legend_handles_labels()
    rate_handles = rate_ax.get_legend_handles_labels()
    ax.legend(handles[0] + rate_handles[0], handles[1] + rate_handles[1], loc="lower right", fontsize=8, ncol=2)
    status = "PASS" if verdict.passed else "FAIL"
    ax.set_title(
        f"{status}: {verdict.model}, policy {verdict.policy}; slope {verdict.slope_bytes_per_min / MB:+.2f} MB/min, "
        f"peak {verdict.peak_bytes / MB:.0f} MB, {verdict.texts_per_s:.1f} texts/s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comparison(runs: list[tuple[Verdict, list[Sample]]], path: Path) -> None:
    """The RSS curves of several runs of the same load in one figure, with a table of their numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, table_ax) = plt.subplots(2, 1, figsize=(12, 8), gridspec_kw={"height_ratios": [3, 1]})
    for verdict, samples in runs:
        ax.plot([s.t_s / 60 for s in samples], [s.rss_bytes / MB for s in samples], lw=1.4, label=verdict.policy)
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(0, max(v.peak_bytes for v, _ in runs) / MB * 1.2)
    ax.legend(loc="lower right")
    ax.set_title(f"Same load under each memory policy ({runs[0][0].model})")
    table_ax.axis("off")
    rows = [
        [
            v.policy,
            f"{v.baseline_bytes / MB:.0f}",
            f"{v.peak_bytes / MB:.0f}",
            f"{v.end_bytes / MB:.0f}",
            f"{v.slope_bytes_per_min / MB:+.2f}",
            f"{v.texts_per_s:.1f}",
            ", ".join(f"{k} {n}" for k, n in v.cleanups.items() if n) or "none",
        ]
        for v, _ in runs
    ]
    header = ["policy", "start MB", "peak MB", "end MB", "slope MB/min", "texts/s", "cleanups"]
    table = table_ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
