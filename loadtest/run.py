"""One load run end to end: a fresh service, headless Locust, RSS sampled from /metrics, the verdict.

    python -m loadtest.run --duration 1200 --users 6 --policy smart --out reports/loadtest
    python -m loadtest.run --profile whole-documents --duration 600 --users 4 --out reports/whole-documents

Writes into ``--out``: ``samples.csv`` (RSS and counters every few seconds),
Locust's own ``locust_stats*.csv``, ``verdict.json``, ``rss.png`` and the
service log. Exits 1 when memory does not level off (see loadtest/verdict.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import requests

from app.reasons import MemoryPolicy
from loadtest.sampler import MetricsSampler, read_csv, write_csv
from loadtest.service import BUNDLED_MODEL, running_service
from loadtest.verdict import Verdict, judge, plot_run

ROOT = Path(__file__).resolve().parents[1]
PROFILES = {"indexing": "loadtest/locustfile.py", "whole-documents": "loadtest/whole_documents.py"}
"""Each load profile's locustfile."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Run the indexing load and judge the memory curve.")
    parser.add_argument("--duration", type=float, default=float(env("LOAD_DURATION_S", "1200")), help="seconds")
    parser.add_argument("--users", type=int, default=int(env("LOAD_USERS", "6")))
    parser.add_argument("--ramp", type=float, default=float(env("LOAD_RAMP_S", "60")), help="ramp-up seconds")
    parser.add_argument("--soak", type=float, default=float(env("LOAD_SOAK_S", "0")), help="extra soak seconds")
    parser.add_argument(
        "--policy",
        type=MemoryPolicy,
        default=MemoryPolicy(env("EMBEDDING_MEMORY_POLICY", MemoryPolicy.SMART)),
        choices=list(MemoryPolicy),
        help="the service's EMBEDDING_MEMORY_POLICY",
    )
    parser.add_argument("--model", default=env("LOAD_MODEL", BUNDLED_MODEL), help="EMBEDDING_MODEL of the service")
    parser.add_argument(
        "--profile",
        choices=list(PROFILES),
        default=env("LOAD_PROFILE", "indexing"),
        help="indexing: batches of passages, sentences and titles, and searches; whole-documents: up to the "
        "maximum texts per request of up to the maximum characters each, truncation on",
    )
    parser.add_argument("--out", type=Path, default=Path(env("LOAD_OUT", "reports/loadtest")))
    parser.add_argument("--sample-interval", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument(
        "--max-slope-mb-per-min", type=float, default=None, help="slope bound (default: 0.5%% of baseline)"
    )
    return parser.parse_args(argv)


def locust_latency(stats_csv: Path) -> dict[str, dict[str, float]]:
    """p50/p95 and counts per request name from Locust's stats CSV."""
    latency: dict[str, dict[str, float]] = {}
    if not stats_csv.exists():
        return latency
    with stats_csv.open(newline="") as src:
        for row in csv.DictReader(src):
            if row["Name"] and row["Request Count"] != "0":
                latency[row["Name"]] = {
                    "p50": float(row["50%"]),
                    "p95": float(row["95%"]),
                    "count": float(row["Request Count"]),
                    "failures": float(row["Failure Count"]),
                }
    return latency


def failures(stats_csv: Path) -> int:
    """Requests Locust counted as failed (the Aggregated row): lost, not answered nor refused with Retry-After."""
    if not stats_csv.exists():
        return 0
    with stats_csv.open(newline="") as src:
        return sum(int(row["Failure Count"]) for row in csv.DictReader(src) if row["Name"] == "Aggregated")


def run_locust(url: str, args: argparse.Namespace) -> int:
    command = [
        sys.executable, "-m", "locust", "-f", str(ROOT / PROFILES[args.profile]),
        "--headless", "--host", url, "--csv", str(args.out / "locust"), "--only-summary",
        "--load-users", str(args.users), "--load-duration", str(args.duration),
        "--load-ramp", str(args.ramp), "--load-soak", str(args.soak),
        "--loglevel", "WARNING",
    ]  # fmt: skip
    with (args.out / "locust.log").open("wb") as log:
        return subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def run(args: argparse.Namespace) -> Verdict:
    """Start the service, drive the load, sample RSS, and judge; the artefacts land in ``args.out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"EMBEDDING_MODEL": args.model, "EMBEDDING_MEMORY_POLICY": args.policy}
    with running_service(args.out / "service.log", env) as service:
        memory = requests.get(f"{service.url}/memory", timeout=10).json()
        service.reset_peak_rss()
        sampler = MetricsSampler(service.url, args.sample_interval).start()
        locust_code = run_locust(service.url, args)
        samples = sampler.stop()
        high_water = service.worker_rss("VmHWM")
        model = requests.get(f"{service.url}/info", timeout=10).json()["model"]
    write_csv(args.out / "samples.csv", samples)
    verdict = judge(
        read_csv(args.out / "samples.csv"),
        model=model,
        policy=args.policy,
        warmup_s=args.ramp + 60,
        max_slope_bytes_per_min=args.max_slope_mb_per_min * 1e6 if args.max_slope_mb_per_min else None,
        latency_ms=locust_latency(args.out / "locust_stats.csv"),
        high_water_bytes=high_water,
        lost_requests=failures(args.out / "locust_stats.csv"),
    )
    thresholds = {"elevated": memory["thresholds"]["elevated_bytes"], "high": memory["thresholds"]["high_bytes"]}
    plot_run(samples, verdict, args.out / "rss.png", thresholds)
    report = {**verdict.to_dict(), "profile": args.profile, "locust_exit": locust_code}
    (args.out / "verdict.json").write_text(json.dumps(report, indent=2))
    return verdict


def main(argv: list[str] | None = None) -> None:
    verdict = run(parse_args(argv))
    print(verdict.summary())
    sys.exit(0 if verdict.passed else 1)


if __name__ == "__main__":
    main()
