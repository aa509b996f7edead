"""Throughput benchmark: the model in-process versus the same texts through the service.

    make bench                       # 1024 texts of the standard-library corpus
    BENCH_TEXTS=2048 make bench

Over the same mixed-length texts, each run after its own warm-up:
  1. in-process in float32, and in-process at the dtype ``EMBEDDING_DTYPE=auto`` picks on this machine
     (length-sorted batches of 32, the service's own backend);
  2. the service at the auto dtype: 4 clients x 32-text requests (through OpenAI's /v1/embeddings with
     base64 vectors, then text-embeddings-inference's /embed with JSON numbers), 16 clients x single texts,
     and 8 clients x 1-64 random texts.
It prints texts/s and each service run's ratio to in-process at the same dtype, and writes
``reports/bench.json``. Numbers only: nothing here passes or fails.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from loadtest.corpus import build_corpus, sample
from loadtest.service import BUNDLED_MODEL, ServiceProcess

REPORTS = Path("reports")
TARGETS = {"service_32_texts": 1.0, "service_single_texts": 0.8}


def in_process(texts: list[str], dtype: str) -> float:
    """Texts per second of the service's backend alone at ``dtype``, length-sorted batches of 32."""
    from loadtest.fidelity import encode_all, load

    _, rate = encode_all(load(dtype), texts)
    return rate


def through_service(url: str, requests_: Sequence[list[str]], clients: int, protocol: str = "openai") -> float:
    """Texts per second when ``clients`` threads send the given requests: OpenAI's (base64 vectors, what its
    client asks for) or text-embeddings-inference's (vectors as JSON numbers)."""
    sessions = [requests.Session() for _ in range(clients)]

    def send(i: int) -> int:
        if protocol == "tei":
            response = sessions[i % clients].post(f"{url}/embed", json={"inputs": requests_[i]}, timeout=300)
        else:
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


def random_requests(texts: list[str], seed: int = 7) -> list[list[str]]:
    """The texts cut into requests of 1 to 64 texts, sizes drawn at random (an indexer's uneven batches)."""
    rng, out, i = random.Random(seed), [], 0
    while i < len(texts):
        size = rng.randint(1, 64)
        out.append(texts[i : i + size])
        i += size
    return out


def main() -> None:
    from app.backend import pick_dtype

    n = int(os.environ.get("BENCH_TEXTS", "1024"))
    texts = [d.text for d in sample(build_corpus(), n, seed=1)]
    words = sum(len(t.split()) for t in texts)
    auto, why = pick_dtype("auto", "cpu")
    print(f"benchmark: {n} texts, {words / n:.0f} words on average, model {BUNDLED_MODEL}, {os.cpu_count()} CPUs")
    print(f"auto dtype: {auto} ({why})")
    fp32 = timed("in-process, float32", lambda: in_process(texts, "float32"))
    base = fp32 if auto == "float32" else timed(f"in-process, {auto}", lambda: in_process(texts, auto))
    REPORTS.mkdir(exist_ok=True)
    service = ServiceProcess(REPORTS / "bench-service.log", env={"EMBEDDING_DTYPE": "auto"}).start()
    try:
        service.wait_ready()
        batched = timed("service, 4 clients x 32 texts", lambda: through_service(service.url, chunks(texts, 32), 4))
        tei = timed(
            "  the same through TEI's /embed", lambda: through_service(service.url, chunks(texts, 32), 4, "tei")
        )
        single = timed("service, 16 clients x 1 text", lambda: through_service(service.url, chunks(texts, 1), 16))
        mixed = timed(
            "service, 8 clients x 1-64 texts", lambda: through_service(service.url, random_requests(texts), 8)
        )
    finally:
        service.terminate()
    result = {
        "texts": n,
        "auto_dtype": auto,
        "auto_reason": why,
        "in_process_float32_texts_per_s": round(fp32, 1),
        "in_process_auto_texts_per_s": round(base, 1),
        "service_32_texts_per_s": round(batched, 1),
        "service_32_texts_tei_per_s": round(tei, 1),
        "service_single_texts_per_s": round(single, 1),
        "service_random_1_64_texts_per_s": round(mixed, 1),
        "ratio_32_texts": round(batched / base, 3),
        "ratio_single_texts": round(single / base, 3),
        "ratio_random_1_64_texts": round(mixed / base, 3),
        "targets": TARGETS,
    }
    print(
        f"ratio to in-process at {auto}: 32-text requests {result['ratio_32_texts']:.2f}"
        f" (target {TARGETS['service_32_texts']}), single texts {result['ratio_single_texts']:.2f}"
        f" (target {TARGETS['service_single_texts']}), 1-64 random {result['ratio_random_1_64_texts']:.2f}"
    )
    (REPORTS / "bench.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
