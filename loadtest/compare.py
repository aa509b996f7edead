"""The same load under the memory policies off, legacy and smart, drawn in one figure.

    python -m loadtest.compare --duration 600 --out reports/compare

Runs loadtest/run.py once per policy (a fresh service each time), then writes
``compare.png`` (the three RSS curves and a table of start, peak, end, slope,
throughput and cleanups) and ``compare.json``. Exits 1 when ``smart`` fails its verdict.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from loadtest.run import parse_args, run
from loadtest.sampler import read_csv
from loadtest.verdict import plot_comparison

POLICIES = ("off", "legacy", "smart")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    base_out = args.out if args.out != Path("reports/loadtest") else Path("reports/compare")
    runs = []
    for policy in POLICIES:
        args.policy, args.out = policy, base_out / policy
        verdict = run(args)
        print(verdict.summary(), flush=True)
        runs.append((verdict, read_csv(args.out / "samples.csv")))
    plot_comparison(runs, base_out / "compare.png")
    (base_out / "compare.json").write_text(json.dumps([v.to_dict() for v, _ in runs], indent=2))
    smart = runs[-1][0]
    off = runs[0][0]
    print(f"smart throughput / off: {smart.texts_per_s / off.texts_per_s:.3f}; figure: {base_out / 'compare.png'}")
    sys.exit(0 if smart.passed else 1)


if __name__ == "__main__":
    main()
