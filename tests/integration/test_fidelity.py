"""Reduced precision on the real bundled model: what EMBEDDING_DTYPE=auto may pick keeps the vectors."""

from __future__ import annotations

import numpy as np
import pytest

from app.backend import cosines, pick_dtype
from loadtest.corpus import build_corpus, sample
from loadtest.fidelity import MIN_COSINE, MIN_KNN_OVERLAP, Fidelity, knn_overlap, measure

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results() -> dict[str, Fidelity]:
    texts = [d.text for d in sample(build_corpus(), 64, seed=2)]
    return {r.variant: r for r in measure(texts, ("float32", "bfloat16"))}


def test_bfloat16_keeps_every_vector_and_its_neighbours(results: dict[str, Fidelity]) -> None:
    """bfloat16 is what auto picks on CPUs that compute it (and on most GPUs): it must hold the bar anywhere."""
    bf16 = results["bfloat16"]
    print(f"\nbfloat16: min cosine {bf16.min_cosine:.5f}, 10-NN overlap {bf16.knn_overlap:.1%}")
    assert bf16.min_cosine >= MIN_COSINE
    assert bf16.knn_overlap >= MIN_KNN_OVERLAP


def test_the_dtype_auto_picks_on_this_machine_holds_the_bar(results: dict[str, Fidelity]) -> None:
    auto, _ = pick_dtype("auto", "cpu")
    assert results[auto].passes


def test_the_bar_rejects_a_precision_that_loses_too_much() -> None:
    """What the checks above would catch: vectors rounded to 4 bits per component (int8-like loss or worse)."""
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((64, 384)).astype(np.float32)
    crude = np.round(reference * 2) / 2
    assert cosines(reference, crude).min() < MIN_COSINE
    assert knn_overlap(reference, reference) == 1.0
    assert knn_overlap(reference, reference + rng.standard_normal(reference.shape) * 2) < MIN_KNN_OVERLAP
