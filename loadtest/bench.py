"""Throughput benchmark: the model in-process versus the same texts through the service.

    make bench                       # 1024 texts of the standard-library corpus
    BENCH_TEXTS=2048 make bench
    EMBEDDING_DTYPE=float32 make bench   # another dtype than the one auto picks here

On a CPU with AVX-512 or AMX, what an AVX2-only CPU runs (float32, no wider kernels) can be approximated by capping
the libraries' instruction sets: ``MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
EMBEDDING_DTYPE=float32 make bench`` (OpenVINO's CPU plugin reads the last one too; the caches and clocks stay
this CPU's).

Over the same mixed-length texts, each run after its own warm-up, on each runtime (torch, and OpenVINO:
``EMBEDDING_BACKEND``):
  1. in-process in float32, and in-process at the dtype ``EMBEDDING_DTYPE`` names (``auto``: what it picks here)
     (the service's own backend, batches of 32 texts sorted by their tokens: the model's own speed), and the same
     texts 16 at a time in random order, each 16 cut into batches as the service's planner cuts a window: the most
     16 single-text clients can give the model, since they never have more texts waiting. Each is the best of
     :data:`IN_PROCESS_PASSES` passes over the texts (the first meets every batch shape for the first time, as a
     service does only after a start);
  2. the service at the auto dtype: 4 clients x 32-text requests (through OpenAI's /v1/embeddings with
     base64 vectors, then text-embeddings-inference's /embed with JSON numbers), 16 clients x single texts,
     and 8 clients x 1-64 random texts.
It prints the CPU's flags, texts/s and each service run's ratio to in-process on the same runtime at the same
dtype (single texts also to the 16-at-a-time rate), and writes ``reports/bench.json``. Numbers only: nothing here
passes or fails.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import requests

from loadtest.corpus import build_corpus, sample
from loadtest.service import BUNDLED_MODEL, ServiceProcess

if TYPE_CHECKING:
    from app.backend import SentenceTransformerBackend

REPORTS = Path("reports")
TARGETS = {"service_32_texts": 1.0, "service_single_texts": 0.9}
SINGLE_TEXT_CLIENTS = 16
IN_PROCESS_PASSES = 3


def in_process(texts: list[str], dtype: str, backend: str = "torch", *, windows: bool) -> tuple[float, float | None]:
    """Texts per second of the service's backend alone at ``dtype`` on ``backend`` (torch or openvino): in batches
    sorted by tokens (:func:`loadtest.fidelity.encode_all`, the best of :data:`IN_PROCESS_PASSES`), and with
    ``windows`` :data:`SINGLE_TEXT_CLIENTS` random texts at a time (:func:`planned_windows`; else None)."""
    from app.backend import SentenceTransformerBackend
    from loadtest.fidelity import encode_all

    model = SentenceTransformerBackend(BUNDLED_MODEL, "cpu", dtype=dtype, backend=backend)
    info = model.load()
    rate = max(encode_all(model, texts)[1] for _ in range(IN_PROCESS_PASSES))
    if not windows:
        return rate, None
    return rate, planned_windows(model, texts, SINGLE_TEXT_CLIENTS, info.batch_overhead_tokens)


def planned_windows(model: SentenceTransformerBackend, texts: list[str], window: int, overhead: int) -> float:
    """Texts per second when the texts come ``window`` at a time in random order, each window cut into batches
    as the service's planner cuts it: the most that many single-text clients can give the model (they never have
    more texts waiting than there are clients, so the padding of a length-sorted corpus is out of reach)."""
    from app.config import Settings
    from app.engine import plan_batches

    tokens = model.prepare(texts).token_counts
    order = list(range(len(texts)))
    random.Random(3).shuffle(order)
    batches = []
    for start in range(0, len(order), window):
        ranked = sorted(order[start : start + window], key=lambda i: tokens[i], reverse=True)
        for span in plan_batches([tokens[i] for i in ranked], Settings.batch_size, overhead):
            batches.append([texts[i] for i in ranked[span]])

    times = []
    for _ in range(IN_PROCESS_PASSES):
        started = time.perf_counter()
        for batch in batches:
            model.finish(model.encode(model.prepare(batch)))
        times.append(time.perf_counter() - started)
    return len(texts) / min(times)


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


def in_process_timed(texts: list[str], dtype: str, backend: str, *, windows: bool) -> tuple[float, float | None]:
    """:func:`in_process`, printed."""
    rate, at_a_time = in_process(texts, dtype, backend, windows=windows)
    print(f"  {f'in-process {backend}, {dtype}':<34} {rate:8.1f} texts/s", flush=True)
    if at_a_time is not None:
        print(f"    {SINGLE_TEXT_CLIENTS} random texts at a time{'':<10} {at_a_time:8.1f} texts/s", flush=True)
    return rate, at_a_time


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


def service_rates(texts: list[str], env: dict[str, str], name: str) -> dict[str, float]:
    """The three loads (and the 32-text one through TEI's route) through a service started with ``env``."""
    service = ServiceProcess(REPORTS / f"bench-service-{name}.log", env=env).start()
    try:
        service.wait_ready(300)
        url = service.url
        loads: dict[str, tuple[str, list[list[str]], int, str]] = {
            "32_texts": (f"{name} service, 4 clients x 32 texts", chunks(texts, 32), 4, "openai"),
            "32_texts_tei": ("  the same through TEI's /embed", chunks(texts, 32), 4, "tei"),
            "single_texts": (
                f"{name} service, {SINGLE_TEXT_CLIENTS} clients x 1 text",
                chunks(texts, 1),
                SINGLE_TEXT_CLIENTS,
                "openai",
            ),
            "random_1_64_texts": (f"{name} service, 8 clients x 1-64 texts", random_requests(texts), 8, "openai"),
        }
        return {
            load: timed(label, lambda r=requests_, c=clients, p=protocol: through_service(url, r, c, p))
            for load, (label, requests_, clients, protocol) in loads.items()
        }
    finally:
        service.terminate()


def main() -> None:
    from app.backend import cpu_flags, pick_dtype

    n = int(os.environ.get("BENCH_TEXTS", "1024"))
    texts = [d.text for d in sample(build_corpus(), n, seed=1)]
    words = sum(len(t.split()) for t in texts)
    dtype, why = pick_dtype(os.environ.get("EMBEDDING_DTYPE", "auto").lower(), "cpu")
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx_vnni", "avx512_vnni"})
    print(f"benchmark: {n} texts, {words / n:.0f} words on average, model {BUNDLED_MODEL}, {os.cpu_count()} CPUs")
    print(f"CPU flags: {', '.join(flags) or 'none of avx2, avx512f, avx512_bf16, amx_bf16'}; dtype: {dtype} ({why})")
    rates = {
        (runtime, precision): in_process_timed(texts, precision, runtime, windows=precision == dtype)
        for runtime in ("torch", "openvino")
        for precision in dict.fromkeys(("float32", dtype))
    }
    (fp32, _), (base, windows) = rates["torch", "float32"], rates["torch", dtype]
    (ov_fp32, _), (ov_base, ov_windows) = rates["openvino", "float32"], rates["openvino", dtype]
    assert windows is not None and ov_windows is not None  # measured at the dtype
    REPORTS.mkdir(exist_ok=True)
    torch_rates = service_rates(texts, {"EMBEDDING_DTYPE": dtype, "EMBEDDING_BACKEND": "torch"}, "torch")
    openvino_rates = service_rates(texts, {"EMBEDDING_DTYPE": dtype, "EMBEDDING_BACKEND": "openvino"}, "openvino")
    result: dict[str, object] = {
        "texts": n,
        "cpu_flags": flags,
        "dtype": dtype,
        "dtype_reason": why,
        "in_process_float32_texts_per_s": round(fp32, 1),
        "in_process_dtype_texts_per_s": round(base, 1),
        "in_process_openvino_float32_texts_per_s": round(ov_fp32, 1),
        "in_process_openvino_dtype_texts_per_s": round(ov_base, 1),
        "in_process_dtype_windows_texts_per_s": round(windows, 1),
        "in_process_openvino_dtype_windows_texts_per_s": round(ov_windows, 1),
        "targets": TARGETS,
    }
    served = (("torch", torch_rates, base, windows), ("openvino", openvino_rates, ov_base, ov_windows))
    for name, loads, reference, at_a_time in served:
        for load, rate in loads.items():
            result[f"service_{name}_{load}_per_s"] = round(rate, 1)
            result[f"ratio_{name}_{load}"] = round(rate / reference, 3)
        result[f"ratio_{name}_single_texts_to_windows"] = round(loads["single_texts"] / at_a_time, 3)
        print(
            f"{name}: ratio to in-process {name} at {dtype}: 32-text requests {loads['32_texts'] / reference:.2f}"
            f" (target {TARGETS['service_32_texts']}), single texts {loads['single_texts'] / reference:.2f}"
            f" (target {TARGETS['service_single_texts']}; {loads['single_texts'] / at_a_time:.2f} of the model's"
            f" rate on {SINGLE_TEXT_CLIENTS} random texts at a time),"
            f" 1-64 random {loads['random_1_64_texts'] / reference:.2f}"
        )
    (REPORTS / "bench.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
