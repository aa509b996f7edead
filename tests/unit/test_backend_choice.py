"""EMBEDDING_BACKEND's plumbing: which allocator each runtime starts on, and what keys a converted model's copy.
The runtimes themselves on the real model: tests/integration/test_backends.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import pytest

from app.allocator import allocator_for
from app.backend import ModelSource, OpenVINOForward, Prepared, SentenceTransformerBackend, cache_key


def test_openvino_starts_on_glibc_and_everything_else_as_asked() -> None:
    assert allocator_for("jemalloc", "openvino") == "glibc"
    assert allocator_for("jemalloc", "auto") == "jemalloc"  # auto then keeps torch, and says why
    assert allocator_for("jemalloc", "torch") == "jemalloc"
    assert allocator_for("glibc", "auto") == "glibc"


def test_a_converted_copy_is_keyed_by_the_models_files(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"weights")
    source = ModelSource(str(model), "org/model")
    first = cache_key(source, str(model))
    assert first is not None and first.startswith("org--model-")
    assert cache_key(source, str(model)) == first  # the same files: the same copy
    weights.write_bytes(b"other weights")
    assert cache_key(source, str(model)) != first  # retrained, re-downloaded: converted again
    os.utime(weights, ns=(1, 1))
    assert cache_key(source, str(model)) not in {first, None}


def test_a_hub_id_without_a_known_commit_is_not_cached() -> None:
    assert cache_key(ModelSource("org/not-in-any-cache", "org/not-in-any-cache"), "org/not-in-any-cache") is None


@pytest.mark.parametrize(("torch_s", "chosen"), [(1.04, "torch"), (1.05, "torch"), (1.06, "openvino")])
def test_auto_takes_openvino_only_when_it_is_at_least_5_percent_faster(torch_s: float, chosen: str) -> None:
    """At the boundary: 1.05x keeps torch (one runtime fewer), 1.06x takes OpenVINO. Times are faked: the real
    runtimes' choice is tests/integration/test_backends.py's."""
    backend = SentenceTransformerBackend("fake")
    forward = cast(OpenVINOForward, object())
    backend.prepare = lambda texts: Prepared(features={}, token_counts=[])  # type: ignore[method-assign]
    backend._best_time = lambda prepared: 1.0 if backend._openvino is forward else torch_s  # type: ignore[method-assign]
    backend._openvino = forward
    backend._trace_note = "eager forward"  # no model to record: torch is timed as it is
    runtime, reason = backend._faster(forward, "probed")
    assert runtime == chosen
    assert f"{torch_s:.2f}x torch's speed" in reason
    assert (backend._openvino is forward) == (chosen == "openvino")
