"""Throughput benchmark: in-process encoding versus the same texts through the service.

    make bench                       # 1024 texts of the standard-library corpus
    BENCH_TEXTS=2048 make bench

Three runs over the same mixed-length texts, each after its own warm-up:
  1. in-process: ``SentenceTransformer.encode`` in length-sorted batches of 32;
  2. service, 16 concurrent clients each sending single texts;
  3. service, 4 concurrent clients each sending 32-text requests.
It prints texts/s and the ratio of each service run to in-process, and writes
``reports/bench.json``. Numbers only: nothing here passes or fails.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from loadtest.corpus import build_corpus, sample
from loadtest.service import BUNDLED_MODEL, ServiceProcess

REPORTS = Path("reports")
TARGETS = {"service_32_texts": 0.9, "service_single_texts": 0.8}


def in_process(texts: list[str], batch_size: int = 32) -> float:
    """Texts per second of the model alone, length-sorted batches (sentence-transformers sorts)."""
    import torch
    from sentence_transformers import SentenceTransformer

    from app.backend import resolve_model, usable_cpus

    torch.set_num_threads(usable_cpus())
    model = SentenceTransformer(resolve_model(BUNDLED_MODEL).location, device="cpu")
    model.encode(texts[:64], batch_size=batch_size)
    started = time.perf_counter()
    model.encode(texts, batch_size=batch_size)
    return len(texts) / (time.perf_counter() - started)


def through_service(url: str, requests_: Sequence[list[str]], clients: int) -> float:
    """Texts per second when ``clients`` threads send the given requests."""
    sessions = [requests.Session() for _ in range(clients)]

    def send(i: int) -> int:
        response = sessions[i % clients].post(
            f"{url}/v1/embeddings", json={"input": requests_[i], "encoding_format": "base64"}, timeout=300
        )
        response.raise_for_status()
        return len(requests_[i])

    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(send, range(min(len(requests_), clients * 2))))  # warm-up
        started = time.perf_counter()
        done = sum(pool.map(send, range(len(requests_))))
    return done / (time.perf_counter() - started)


def chunks(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def timed(label: str, run: Callable[[], float]) -> float:
    rate = run()
    print(f"  {label:<34} {rate:8.1f} texts/s", flush=True)
    return rate


def main() -> None:
    n = int(os.environ.get("BENCH_TEXTS", "1024"))
    texts = [d.text for d in sample(build_corpus(), n, seed=1)]
    words = sum(len(t.split()) for t in texts)
    print(f"benchmark: {n} texts, {words / n:.0f} words on average, model {BUNDLED_MODEL}, {os.cpu_count()} CPUs")
    base = timed("in-process, batches of 32", lambda: in_process(texts))
    REPORTS.mkdir(exist_ok=True)
    service = ServiceProcess(REPORTS / "bench-service.log").start()
    try:
        service.wait_ready()
        single = timed("service, 16 clients x 1 text", lambda: through_service(service.url, chunks(texts, 1), 16))
        batched = timed("service, 4 clients x 32 texts", lambda: through_service(service.url, chunks(texts, 32), 4))
    finally:
        service.terminate()
    result = {
        "texts": n,
        "in_process_texts_per_s": round(base, 1),
        "service_single_texts_per_s": round(single, 1),
        "service_32_texts_per_s": round(batched, 1),
        "ratio_single_texts": round(single / base, 3),
        "ratio_32_texts": round(batched / base, 3),
        "targets": TARGETS,
    }
    single_target, batched_target = TARGETS["service_single_texts"], TARGETS["service_32_texts"]
    print(
        f"ratio to in-process: single texts {result['ratio_single_texts']:.2f} (target {single_target}),"
        f" 32-text requests {result['ratio_32_texts']:.2f} (target {batched_target})"
    )
    (REPORTS / "bench.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
