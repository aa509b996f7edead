"""What a start measured, kept between starts (app/calibration.py): the key, the file, and what cannot be read.

The real model's starts (measured, then read back and checked) are tests/integration/test_calibration.py's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.calibration import Calibration, CalibrationStore, calibration_key

CHOICES = {"device": "cpu", "accelerator": "", "dtype": "auto", "backend": "auto", "threads": 2, "allocator": "glibc"}
MODEL = [["model.safetensors", 90_000_000, 1]]


def calibration(**changes: object) -> Calibration:
    fields: dict[str, object] = {
        "dtype": "bfloat16",
        "dtype_reason": "auto: the CPU computes bfloat16 natively",
        "hold_linear": True,
        "backend": "torch",
        "backend_reason": "EMBEDDING_BACKEND=torch; recorded forward graph",
        "traced": True,
        "batch_overhead_tokens": 304,
        "batch_cost": "4.83 ms a batch + 15.9 us a padded token",
        "probe": np.random.default_rng(0).standard_normal((8, 384)).astype(np.float32),
        "measured_at": 1_796_000_000.0,
        **changes,
    }
    return Calibration(**fields)  # type: ignore[arg-type]


def test_the_key_changes_with_whatever_could_change_what_a_start_measures(monkeypatch: pytest.MonkeyPatch) -> None:
    key, inputs = calibration_key(MODEL, CHOICES)
    assert calibration_key(MODEL, dict(CHOICES)) == (key, inputs)  # the same model, machine and settings
    assert set(inputs) == {"format", "model", "choices", "cpu", "versions", "variables"}
    assert inputs["cpu"]["flags"] and {"service", "torch", "transformers", "openvino"} <= set(inputs["versions"])
    others = [
        calibration_key([["model.safetensors", 90_000_000, 2]], CHOICES),  # the file rewritten
        calibration_key(MODEL, {**CHOICES, "dtype": "float32"}),
        calibration_key(MODEL, {**CHOICES, "threads": 4}),
        calibration_key(MODEL, {**CHOICES, "allocator": "jemalloc"}),
    ]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # the kernels capped: another machine as far as speed goes
    others.append(calibration_key(MODEL, CHOICES))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    another_cpu = {"machine": "x86_64", "model": "another", "flags": "avx2"}
    monkeypatch.setattr("app.calibration.cpu_identity", lambda: another_cpu)
    others.append(calibration_key(MODEL, CHOICES))
    assert len({key, *(k for k, _ in others)}) == 1 + len(others)
    monkeypatch.undo()
    monkeypatch.setenv("HOME", "/elsewhere")  # not a variable of the kernels: the same key
    assert calibration_key(MODEL, CHOICES)[0] == key


def test_what_is_kept_is_read_back_as_it_was(tmp_path: Path) -> None:
    key, inputs = calibration_key(MODEL, CHOICES)
    store = CalibrationStore(tmp_path / "calibration", key, inputs)
    kept = calibration()
    said = store.write(kept)
    assert said == f"kept in {store.path}" and store.path.parent == tmp_path / "calibration"
    read, how = store.read()
    assert how == f"read from {store.path}"
    assert read is not None
    assert np.array_equal(read.probe, kept.probe) and read.probe.dtype == np.float32
    assert {k: v for k, v in vars(read).items() if k != "probe"} == {
        k: v for k, v in vars(kept).items() if k != "probe"
    }
    assert read.measured_at_text() == "2026-11-30T00:53:20Z"
    assert not list(store.path.parent.glob(".writing-*"))  # written aside, then renamed


def test_a_missing_corrupt_or_foreign_entry_is_none_with_the_reason(tmp_path: Path) -> None:
    key, inputs = calibration_key(MODEL, CHOICES)
    store = CalibrationStore(tmp_path, key, inputs)
    assert store.read() == (None, "none kept for this model, machine and settings")
    for text in ("{", '{"format": 1}', '{"format": 0, "key": "' + key + '"}', calibration().to_json("other", inputs)):
        store.path.write_text(text)
        found, why = store.read()
        assert found is None and why.startswith(f"{store.path} is not a calibration of this format"), why
    store.path.write_text(calibration().to_json(key, inputs).replace('"batch_overhead_tokens": 304', '"x": 1'))
    assert store.read()[0] is None  # a field missing
    store.write(calibration())
    assert store.read()[0] is not None  # rewritten


def test_a_directory_that_cannot_be_written_only_says_so(tmp_path: Path) -> None:
    """A read-only cache (the image's root filesystem) costs the time of measuring, nothing else."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    key, inputs = calibration_key(MODEL, CHOICES)
    store = CalibrationStore(blocker / "calibration", key, inputs)  # a file where the directory would be
    said = store.write(calibration())
    assert said.startswith("not kept (") and "the next start measures again" in said
    assert store.read()[0] is None
