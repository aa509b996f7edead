"""The same load under the memory policies off, legacy and smart, drawn in one figure.

    python -m loadtest.compare --duration 600 --out reports/compare
    python -m loadtest.compare --policies off,smart   # a subset, same figure and table

Runs loadtest/run.py once per policy (a fresh service each time), then writes
``compare.png`` (the three RSS curves and a table of start, peak, end, slope,
throughput and cleanups) and ``compare.json``. Exits 1 when ``smart`` fails its verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.reasons import MemoryPolicy
from loadtest.run import parse_args, run
from loadtest.sampler import read_csv
from loadtest.verdict import plot_comparison

POLICIES = (MemoryPolicy.OFF, MemoryPolicy.LEGACY, MemoryPolicy.SMART)  # the baseline first


def main(argv: list[str] | None = None) -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, run in this order")
    chosen, rest = extra.parse_known_args(argv)
    policies = [p for p in chosen.policies.split(",") if p]
    if not policies or any(p not in POLICIES for p in policies):
        sys.exit(f"--policies takes a comma-separated subset of {','.join(POLICIES)}")
    args = parse_args(rest)
    base_out = args.out if args.out != Path("reports/loadtest") else Path("reports/compare")
    runs = []
    for policy in policies:
        args.policy, args.out = policy, base_out / policy
        verdict = run(args)
        print(verdict.summary(), flush=True)
        runs.append((verdict, read_csv(args.out / "samples.csv")))
    plot_comparison(runs, base_out / "compare.png")
    (base_out / "compare.json").write_text(json.dumps([v.to_dict() for v, _ in runs], indent=2))
    by_policy = {v.policy: v for v, _ in runs}
    smart, off = by_policy.get(MemoryPolicy.SMART), by_policy.get(MemoryPolicy.OFF)
    if smart is not None and off is not None:
        ratio = smart.texts_per_s / off.texts_per_s
        print(f"smart throughput / off: {ratio:.3f}")
    print(f"figure: {base_out / 'compare.png'}")
    sys.exit(0 if smart is None or smart.passed else 1)


if __name__ == "__main__":
    main()
