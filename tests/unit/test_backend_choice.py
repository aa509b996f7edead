"""EMBEDDING_BACKEND's plumbing: which allocator each runtime starts on, and what keys a converted model's copy.
The runtimes themselves on the real model: tests/integration/test_backends.py."""

from __future__ import annotations

import os
from pathlib import Path

from app.allocator import allocator_for
from app.backend import ModelSource, cache_key


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
