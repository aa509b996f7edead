"""Reduced precision on the real bundled model: what EMBEDDING_DTYPE=auto may pick keeps the vectors, and what
the service computes matches sentence-transformers' own float32 encoding."""

from __future__ import annotations

import numpy as np
import pytest

from app.backend import SentenceTransformerBackend, cosines, resolve_model
from loadtest.corpus import build_corpus, sample
from loadtest.fidelity import MIN_COSINE, MIN_KNN_OVERLAP, Fidelity, encode_all, knn_overlap, measure
from loadtest.service import BUNDLED_MODEL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [d.text for d in sample(build_corpus(), 64, seed=2)]


@pytest.fixture(scope="module")
def results(texts: list[str]) -> dict[str, Fidelity]:
    return {r.variant: r for r in measure(texts, ("float32", "bfloat16"))}


def test_bfloat16_keeps_every_vector_and_its_neighbours(results: dict[str, Fidelity]) -> None:
    """bfloat16 is what auto picks on CPUs that compute it (and on most GPUs): it must hold the bar anywhere."""
    bf16 = results["bfloat16"]
    print(f"\nbfloat16: min cosine {bf16.min_cosine:.5f}, 10-NN overlap {bf16.knn_overlap:.1%}")
    assert bf16.min_cosine >= MIN_COSINE
    assert bf16.knn_overlap >= MIN_KNN_OVERLAP


def test_what_auto_serves_here_matches_sentence_transformers_own_float32(texts: list[str]) -> None:
    """The service's whole path at EMBEDDING_DTYPE=auto (its start-up probe, its cut and tokenizing, batching,
    pooling, normalisation, in whatever dtype auto picks on this machine) against the library's own encode() in
    float32: an independent reference on every machine, whether auto picks bfloat16 or float32 here.
    (Which dtype auto picks for which CPU flags is tests/unit/test_dtype.py's.)"""
    from sentence_transformers import SentenceTransformer

    backend = SentenceTransformerBackend(BUNDLED_MODEL, "cpu", dtype="auto")
    info = backend.load()
    served, _ = encode_all(backend, texts)
    library = SentenceTransformer(resolve_model(BUNDLED_MODEL).location, device="cpu")
    reference = library.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    cos = cosines(reference, served)
    print(f"\nauto = {info.dtype}: min cosine {cos.min():.5f} to sentence-transformers' float32")
    assert cos.min() >= MIN_COSINE
    assert knn_overlap(reference, served) >= MIN_KNN_OVERLAP


def test_the_bar_rejects_a_precision_that_loses_too_much() -> None:
    """What the checks above would catch: vectors rounded to 4 bits per component (int8-like loss or worse)."""
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((64, 384)).astype(np.float32)
    crude = np.round(reference * 2) / 2
    assert cosines(reference, crude).min() < MIN_COSINE
    assert knn_overlap(reference, reference) == 1.0
    assert knn_overlap(reference, reference + rng.standard_normal(reference.shape) * 2) < MIN_KNN_OVERLAP
