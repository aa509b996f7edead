"""EMBEDDING_BACKEND's plumbing: which allocator each runtime starts on, and what keys a converted model's copy.
The runtimes themselves on the real model: tests/integration/test_backends.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import pytest

from app.allocator import allocator_for
from app.backend import (
    NO_CACHE_DIR,
    ModelSource,
    OpenVINOForward,
    Prepared,
    SentenceTransformerBackend,
    cache_key,
    cache_root,
)


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


@pytest.mark.parametrize(
    ("fixed_s", "per_slot_s", "overhead", "said"),
    [
        (0.003, 30e-6, 100, "3.00 ms a batch + 30.0 us a padded token"),  # bfloat16 with AMX
        (0.002, 85e-6, 24, "2.00 ms a batch + 85.0 us a padded token"),  # float32
        (0.050, 10e-6, 512, "50.00 ms a batch + 10.0 us"),  # a pass far dearer: held to the range
        (0.0001, 100e-6, 8, "0.10 ms a batch + 100.0 us"),  # far cheaper: held to the range
        (0.005, -1e-6, 32, "not measured (a batch of 1024 slots ran no slower)"),  # noise: the default
    ],
)
def test_the_planners_cost_of_a_pass_is_measured_and_kept_within_its_range(
    monkeypatch: pytest.MonkeyPatch, fixed_s: float, per_slot_s: float, overhead: int, said: str
) -> None:
    """Batches of 4 and 16 texts of 64 tokens, timed: the cost of a pass in slots, within OVERHEAD_TOKENS_RANGE,
    or the default where the larger batch ran no slower."""
    backend = SentenceTransformerBackend("model")
    monkeypatch.setattr(backend, "prepare", _batches_of_64_tokens)
    monkeypatch.setattr(backend, "_best_time", lambda batch: fixed_s + per_slot_s * batch.features["input_ids"].n)
    measured, cost = backend._batch_overhead()
    assert measured == overhead
    assert said in cost


def test_the_planners_cost_of_a_pass_is_taken_where_it_chooses_between_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass is not linear in its slots: bfloat16 with AMX on 2 cores ran one text in 2.6 ms, 4 x 64 tokens in
    8.9 ms and 16 x 64 in 21.1 ms (the next texts of a small batch cost less than its first). Between the sizes
    the planner chooses between, merging saves about 300 slots' worth (where batches ran fastest, 14-20% above
    the 105 a one-text batch gives); a one-text batch taken as the small one would give that 105."""
    times_ms = {1: 2.6, 4: 8.9, 16: 21.1}
    backend = SentenceTransformerBackend("model")
    monkeypatch.setattr(backend, "prepare", _batches_of_64_tokens)
    monkeypatch.setattr(backend, "_best_time", lambda batch: times_ms[batch.features["input_ids"].n // 64] / 1e3)
    measured, cost = backend._batch_overhead()
    assert measured == 304
    assert cost == "4.83 ms a batch + 15.9 us a padded token"


def _batches_of_64_tokens(texts: list[str]) -> Prepared:
    return Prepared(features={"input_ids": _Ids(len(texts) * 64)}, token_counts=[])


class _Ids:
    """What _batch_overhead reads of a batch's input ids: how many slots it has."""

    def __init__(self, n: int) -> None:
        self.n = n

    def numel(self) -> int:
        return self.n


def test_the_cache_is_where_the_settings_say_and_nowhere_for_a_user_without_a_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A container's user may have no entry in the password database and a sandbox no HOME (the pod's, rehearsed
    in tests/e2e/test_pod_sandbox.py): the model still loads, measured, with nothing kept."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(str(tmp_path / "set")) == tmp_path / "set"
    assert cache_root(None) == tmp_path / "xdg" / "embedding-service"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(None) == tmp_path / "home" / ".cache" / "embedding-service"

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", no_home)
    assert cache_root(None) is None
    assert SentenceTransformerBackend("model")._calibration_store(ModelSource(str(tmp_path), "m"), "cpu") == (
        None,
        f"not kept: {NO_CACHE_DIR}",
    )
