"""Fidelity and speed of each precision against float32, on the bundled model and the corpus.

    make fidelity                      # 640 texts of the standard-library corpus
    FIDELITY_TEXTS=256 make fidelity

For each variant it prints texts/s (one pass, in-process, batches of 32 sorted by tokens), the model's weight bytes, the
process RSS after it (the variants load one after another in one process, so RSS only ever grows),
the minimum and mean cosine of each text's vector to its float32 vector, and how many of each text's 10
nearest neighbours among all the texts stay the same. Variants: float32; bfloat16 and float16 under
autocast (what the service runs: the linear layers' weights held in the dtype, the rest float32); bfloat16
with all the weights cast (half the weight memory). ``EMBEDDING_DTYPE=auto`` must only ever pick a dtype that
keeps min cosine >= 0.999 and 10-NN overlap >= 0.98 here (the service also probes at start-up;
``tests/integration/test_fidelity.py`` checks).
Writes ``reports/fidelity.json``. Numbers only: nothing here passes or fails.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil

from app.backend import SentenceTransformerBackend, cosines, pick_dtype
from app.config import Settings
from loadtest.corpus import build_corpus, sample
from loadtest.service import BUNDLED_MODEL

REPORTS = Path("reports")
MIN_COSINE = 0.999
MIN_KNN_OVERLAP = 0.98
VARIANTS = ("float32", "bfloat16", "float16", "bfloat16-weights", "openvino-float32", "openvino-bfloat16")


@dataclass(frozen=True)
class Fidelity:
    variant: str
    texts_per_s: float
    weight_bytes: int
    rss_bytes: int
    min_cosine: float
    mean_cosine: float
    knn_overlap: float

    @property
    def passes(self) -> bool:
        return self.min_cosine >= MIN_COSINE and self.knn_overlap >= MIN_KNN_OVERLAP


def knn_overlap(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> float:
    """Mean share of each text's k nearest neighbours (cosine, itself excluded) that both vector sets agree on."""

    def neighbours(vectors: np.ndarray) -> np.ndarray:
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argsort(-similarity, axis=1)[:, :k]

    ref, cand = neighbours(reference), neighbours(candidate)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref, cand, strict=True)]))


def encode_all(
    backend: SentenceTransformerBackend, texts: list[str], batch_size: int = Settings.batch_size
) -> tuple[np.ndarray, float]:
    """Vectors in the texts' order, and texts/s, encoding batches sorted by tokens as the service's planner sorts a
    window: the least padding any batching of these texts can have."""
    tokens = backend.prepare(texts).token_counts
    order = sorted(range(len(texts)), key=lambda i: tokens[i])
    backend.finish(backend.encode(backend.prepare(texts[:8])))  # warm-up at this dtype
    started = time.perf_counter()
    parts = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        parts.append((chunk, backend.finish(backend.encode(backend.prepare([texts[i] for i in chunk])))))
    rate = len(texts) / (time.perf_counter() - started)
    out = np.zeros((len(texts), parts[0][1].shape[1]), dtype=np.float32)
    for chunk, vectors in parts:
        out[chunk] = vectors
    return out, rate


def load(variant: str) -> SentenceTransformerBackend:
    """The bundled model on CPU computing in ``variant``'s precision (``openvino-``: in OpenVINO)."""
    runtime = "openvino" if variant.startswith("openvino-") else "torch"
    dtype = variant.removeprefix("openvino-").removesuffix("-weights")
    backend = SentenceTransformerBackend(BUNDLED_MODEL, "cpu", dtype=dtype, backend=runtime)
    backend.load()
    if variant.endswith("-weights"):
        backend.cast_weights(dtype)
    return backend


def measure(texts: list[str], variants: tuple[str, ...] = VARIANTS) -> list[Fidelity]:
    """Each variant against float32 on ``texts`` (float32 first: the reference)."""
    reference: np.ndarray | None = None
    results = []
    for variant in ("float32", *(v for v in variants if v != "float32")):
        backend = load(variant)
        vectors, rate = encode_all(backend, texts)
        if reference is None:
            reference = vectors
        cos = cosines(reference, vectors)
        rss = psutil.Process().memory_info().rss
        results.append(
            Fidelity(
                variant,
                rate,
                backend.weight_bytes(),
                rss,
                float(cos.min()),
                float(cos.mean()),
                knn_overlap(reference, vectors),
            )
        )
    return results


def main() -> None:
    n = int(os.environ.get("FIDELITY_TEXTS", "640"))
    texts = [d.text for d in sample(build_corpus(), n, seed=1)]
    auto, why = pick_dtype("auto", "cpu")
    print(f"fidelity: {n} texts, model {BUNDLED_MODEL}, {os.cpu_count()} CPUs; auto picks {auto} ({why})")
    print(
        f"  {'variant':<18} {'texts/s':>8} {'weights MB':>10} {'RSS MB':>8} {'min cos':>9} {'mean cos':>9} {'10-NN':>7}"
    )
    results = measure(texts)
    for r in results:
        print(
            f"  {r.variant:<18} {r.texts_per_s:8.1f} {r.weight_bytes / 1e6:10.1f} {r.rss_bytes / 1e6:8.0f}"
            f" {r.min_cosine:9.5f} {r.mean_cosine:9.6f} {r.knn_overlap:7.1%}  {'ok' if r.passes else 'below the bar'}"
        )
    REPORTS.mkdir(exist_ok=True)
    report = {
        "texts": n,
        "auto": auto,
        "auto_reason": why,
        "results": [{**asdict(r), "passes": r.passes} for r in results],
    }
    (REPORTS / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
