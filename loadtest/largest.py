"""The largest legal requests at once: worker RSS peak and what each client got.

    python -m loadtest.largest --concurrency 1,4,16
    python -m loadtest.largest --model path/to/model --concurrency 1,4 --env EMBEDDING_MEMORY_LIMIT_BYTES=900MB

Starts the service as ``make run`` does, warms it with ordinary indexing requests, then for each
concurrency sends that many requests at once, each of ``EMBEDDING_MAX_INPUTS`` whole documents of
``EMBEDDING_MAX_INPUT_CHARS`` characters (the body limit's worth, truncation on). The worker's RSS peak is the
kernel's own high-water mark (``VmHWM``, reset before each round through ``/proc/PID/clear_refs``), so no
spike between two samples is missed. Prints one line per round and writes ``largest.json`` into ``--out``.
Numbers only: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

from loadtest.corpus import build_corpus, sample
from loadtest.service import BUNDLED_MODEL, ServiceProcess

MB = 1_000_000


@dataclass
class Round:
    """One round: ``concurrency`` largest requests sent at once."""

    concurrency: int
    baseline_bytes: int
    peak_bytes: int
    after_bytes: int
    statuses: dict[str, int]
    seconds: list[float]
    retry_after: list[str] = field(default_factory=list)

    def line(self) -> str:
        slowest = max(self.seconds) if self.seconds else 0.0
        return (
            f"{self.concurrency:>3} at once: peak {self.peak_bytes / MB:,.0f} MB "
            f"({self.peak_bytes / self.baseline_bytes:.2f}x the warmed {self.baseline_bytes / MB:,.0f} MB), "
            f"after {self.after_bytes / MB:,.0f} MB; answers {self.statuses}, slowest {slowest:.1f} s"
        )


def documents(count: int, chars: int) -> list[str]:
    """``count`` different ASCII documents of exactly ``chars`` characters (standard-library prose)."""
    corpus = [d.text for d in build_corpus() if d.kind == "passage" and d.text.isascii()]
    prose = " ".join(corpus).replace('"', "'").replace("\\", "/")
    step = max(1, (len(prose) - chars) // max(1, count))
    return [(prose * 2)[i * step : i * step + chars] for i in range(count)]


def send_round(url: str, body: bytes, concurrency: int, timeout_s: float) -> list[tuple[int, float, str]]:
    """``concurrency`` POST /embed of ``body`` at once: (status, seconds, Retry-After) of each; 0 when none came."""

    def one(_: int) -> tuple[int, float, str]:
        started = time.perf_counter()
        try:
            r = requests.post(
                f"{url}/embed", data=body, headers={"Content-Type": "application/json"}, timeout=timeout_s
            )
            return r.status_code, time.perf_counter() - started, r.headers.get("Retry-After", "")
        except requests.RequestException:
            return 0, time.perf_counter() - started, ""

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, range(concurrency)))


def measure(service: ServiceProcess, body: bytes, concurrency: int, timeout_s: float, settle_s: float) -> Round:
    baseline = service.worker_rss()
    service.reset_peak_rss()
    answers = send_round(service.url, body, concurrency, timeout_s)
    peak = service.worker_rss("VmHWM")
    time.sleep(settle_s)
    statuses: dict[str, int] = {}
    for status, _, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return Round(
        concurrency,
        baseline,
        peak,
        service.worker_rss(),
        statuses,
        [round(s, 2) for _, s, _ in answers],
        sorted({r for _, _, r in answers if r}),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated rounds")
    parser.add_argument("--model", default=BUNDLED_MODEL)
    parser.add_argument("--inputs", type=int, default=512, help="texts per request (EMBEDDING_MAX_INPUTS)")
    parser.add_argument("--chars", type=int, default=32_760, help="characters per text (fits 16 MiB at 512)")
    parser.add_argument("--timeout", type=float, default=600.0, help="each client's timeout, seconds")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after a round before reading RSS")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("reports/largest"))
    args = parser.parse_args(argv)
    env = {"EMBEDDING_MODEL": args.model, **dict(item.split("=", 1) for item in args.env)}
    body = json.dumps({"inputs": documents(args.inputs, args.chars), "truncate": True}).encode()
    args.out.mkdir(parents=True, exist_ok=True)
    service = ServiceProcess(args.out / "service.log", env).start()
    try:
        service.wait_ready(300)
        warm = [d.text for d in sample(build_corpus(), 256, seed=1)]
        for i in range(0, len(warm), 32):
            requests.post(f"{service.url}/embed", json={"inputs": warm[i : i + 32]}, timeout=120).raise_for_status()
        time.sleep(args.settle)
        print(f"{args.model}: body {len(body) / MB:.1f} MB ({args.inputs} x {args.chars} characters)")
        rounds = []
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            result = measure(service, body, concurrency, args.timeout, args.settle)
            print(result.line(), flush=True)
            rounds.append(result)
        memory = requests.get(f"{service.url}/memory", timeout=10).json()
    finally:
        service.terminate()
    report = {"model": args.model, "env": env, "body_bytes": len(body), "rounds": [asdict(r) for r in rounds]}
    report["thresholds"] = memory.get("thresholds")
    (args.out / "largest.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
