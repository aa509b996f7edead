"""What a start measures, kept for the next start (app/calibration.py), with the real model: measured once, read
back and checked with one probe batch, measured again where what was kept cannot be trusted or read.

Each test gives its backends a cache directory of its own: they measure from nothing."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest

from app.backend import ModelInfo, SentenceTransformerBackend
from loadtest.corpus import build_corpus, sample
from loadtest.service import BUNDLED_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.alone]  # what a start measures

TEXTS = [d.text for d in sample(build_corpus(), 48, seed=11)]


def started(cache: Path, dtype: str = "auto") -> tuple[SentenceTransformerBackend, ModelInfo, float]:
    backend = SentenceTransformerBackend(BUNDLED_MODEL, "cpu", dtype=dtype, backend="torch", cache_dir=str(cache))
    began = time.perf_counter()
    info = backend.load()
    return backend, info, time.perf_counter() - began


def vectors(backend: SentenceTransformerBackend) -> np.ndarray:
    return np.concatenate([backend.finish(backend.encode(backend.prepare(TEXTS[i : i + 16]))) for i in (0, 16, 32)])


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "calibration").glob("*.json"))


def test_a_restart_reads_what_the_first_start_measured_and_serves_the_same_vectors(tmp_path: Path) -> None:
    first, measured, measuring_s = started(tmp_path)
    (entry,) = entries(tmp_path)
    assert measured.calibration == "measured"
    assert measured.calibration_note == f"none kept for this model, machine and settings; kept in {entry}"
    second, cached, reading_s = started(tmp_path)
    print(f"\nstart measuring {measuring_s:.1f} s, start reading it {reading_s:.1f} s ({cached.calibration_note})")
    assert cached.calibration == "cached" and cached.calibration_note == f"read from {entry}"
    assert cached.calibrated_at == measured.calibrated_at
    said = ("dtype", "dtype_reason", "backend", "backend_reason", "batch_overhead_tokens", "batch_cost", "weight_bytes")
    assert {k: getattr(cached, k) for k in said} == {k: getattr(measured, k) for k in said}
    # Run the same way: the weights held in the same dtype, the recorded graph, and the same vectors to the bit.
    assert (first._traced is None, first._holding) == (second._traced is None, second._holding)
    assert np.array_equal(vectors(first), vectors(second))
    assert entries(tmp_path) == [entry]


def test_what_the_key_does_not_cover_is_caught_by_the_probe_and_measured_again(tmp_path: Path) -> None:
    """A kept entry whose probe vectors are not those this configuration computes here (a model file rewritten
    in place with its size and time kept, another machine's kernels under the same flags): measured again, with
    the reason, and kept anew; the next start reads that."""
    started(tmp_path)
    (entry,) = entries(tmp_path)
    kept = json.loads(entry.read_text())
    probe = kept["calibration"]["probe"]
    other = np.random.default_rng(3).standard_normal(probe["shape"]).astype("<f4")
    probe["float32"] = base64.b64encode(other.tobytes()).decode()
    entry.write_text(json.dumps(kept))
    _, again, _ = started(tmp_path)
    assert again.calibration == "measured"
    assert again.calibration_note.startswith("measured again: the start-up probe's vectors are not those kept")
    assert again.calibration_note.endswith(f"; kept in {entry}")
    _, third, _ = started(tmp_path)
    assert third.calibration == "cached" and third.calibrated_at == again.calibrated_at


def test_a_corrupt_entry_another_setting_or_a_cache_that_cannot_be_written_measure(tmp_path: Path) -> None:
    _, measured, _ = started(tmp_path)
    (entry,) = entries(tmp_path)
    entry.write_text(entry.read_text()[:100])  # torn
    _, again, _ = started(tmp_path)
    assert again.calibration == "measured" and f"{entry} is not a calibration of this format" in again.calibration_note
    assert json.loads(entry.read_text())["format"] == 1  # rewritten whole

    _, other, _ = started(tmp_path, dtype="float32")  # another setting: another entry beside it
    assert other.calibration == "measured" and len(entries(tmp_path)) == 2

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    _, unwritable, _ = started(blocked)  # the image's read-only root: it serves, measured, and says so
    assert unwritable.calibration == "measured" and "not kept (" in unwritable.calibration_note
    assert unwritable.dtype == measured.dtype
