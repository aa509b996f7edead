"""Throughput of memory policies, measured side by side in interleaved rounds.

    python -m loadtest.throughput --policies off,smart --rounds 5
    make throughput

One question, answered fairly: how much throughput does a policy cost? Sequential
load runs cannot tell at the level of a few percent. On a shared 2-core machine two
10-minute legs of the same behaviour (``off`` and ``legacy``, which never fired)
came out 7% apart. So this starts one service per policy, keeps them all up, and
sends each the same mixed-length requests in turn, round after round, reversing the
order every other round. Drift of the machine then falls on every policy alike.
Prints texts/s per round, the median per policy with its ratio to the first policy,
and the RSS after each round; writes ``reports/throughput.json``. Numbers only:
nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from loadtest.bench import chunks, through_service
from loadtest.corpus import build_corpus, sample
from loadtest.service import running_service
from loadtest.verdict import MB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Interleaved throughput of memory policies.")
    parser.add_argument("--policies", default="off,smart", help="comma-separated; ratios are to the first")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--texts", type=int, default=1024, help="texts per round and policy")
    parser.add_argument("--request-size", type=int, default=32, help="texts per request")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("reports/throughput.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    texts = [d.text for d in sample(build_corpus(), args.texts, seed=3)]
    requests_ = chunks(texts, args.request_size)
    rates: dict[str, list[float]] = {p: [] for p in policies}
    rss: dict[str, list[float]] = {p: [] for p in policies}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        services = {
            policy: stack.enter_context(
                running_service(args.out.with_name(f"throughput-{policy}.log"), {"EMBEDDING_MEMORY_POLICY": policy})
            )
            for policy in policies
        }
        for round_ in range(args.rounds):
            order = policies if round_ % 2 == 0 else policies[::-1]
            for policy in order:
                service = services[policy]
                rates[policy].append(through_service(service.url, requests_, args.clients))
                rss[policy].append((service.metric("embedding_memory_rss_bytes") or 0) / MB)
                print(
                    f"round {round_ + 1}  {policy:<7} {rates[policy][-1]:6.1f} texts/s  RSS {rss[policy][-1]:.0f} MB",
                    flush=True,
                )
    first = statistics.median(rates[policies[0]])
    summary: dict[str, dict[str, Any]] = {}
    for policy in policies:
        median = statistics.median(rates[policy])
        summary[policy] = {
            "median_texts_per_s": round(median, 1),
            "ratio": round(median / first, 3),
            "texts_per_s": [round(r, 1) for r in rates[policy]],
            "rss_mb_after_round": [round(r) for r in rss[policy]],
        }
        print(f"{policy:<7} median {median:6.1f} texts/s, {median / first:.3f} x {policies[0]}")
    result = {
        "texts_per_round": len(texts),
        "request_size": args.request_size,
        "clients": args.clients,
        "policies": summary,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
