"""How the service picks the precision it computes in (the real model's fidelity: tests/integration)."""

from __future__ import annotations

import numpy as np
import pytest

from app.backend import FIDELITY_PROBE, SentenceTransformerBackend, cosines, pick_dtype
from app.config import ConfigError, Settings


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "fma"}, "float32"),  # bfloat16 would be emulated: slower than float32
        ({"avx512f", "avx512_vnni"}, "float32"),  # AVX-512 without its BF16 extension
        ({"avx512f", "avx512_bf16"}, "bfloat16"),
        ({"amx_tile", "amx_bf16"}, "bfloat16"),
    ],
)
def test_auto_picks_bfloat16_only_on_cpus_that_compute_it(flags: set[str], expected: str) -> None:
    dtype, reason = pick_dtype("auto", "cpu", flags)
    assert dtype == expected
    assert reason.startswith("auto: ")


def test_an_explicit_dtype_is_kept_and_said_so() -> None:
    assert pick_dtype("float16", "cpu", set()) == ("float16", "EMBEDDING_DTYPE=float16")
    assert pick_dtype("auto", "mps", set())[0] == "float32"


def test_the_setting_names_the_allowed_values() -> None:
    assert Settings.from_env({"EMBEDDING_DTYPE": "BFloat16"}).dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"EMBEDDING_DTYPE.*auto, float32, bfloat16, float16"):
        Settings.from_env({"EMBEDDING_DTYPE": "int8"})


class ProbedBackend(SentenceTransformerBackend):
    """The start-up probe without a model: float32 vectors, and a reduced dtype that is off by ``error``."""

    def __init__(self, requested: str, error: float) -> None:
        super().__init__("unused", "cpu", dtype=requested)
        self.error = error
        rng = np.random.default_rng(0)
        self.reference = rng.standard_normal((len(FIDELITY_PROBE), 16)).astype(np.float32)

    def _probe(self) -> np.ndarray:
        if self._dtype == "float32":
            return self.reference
        noise = np.random.default_rng(1).standard_normal(self.reference.shape).astype(np.float32)
        return self.reference + self.error * noise


def test_auto_keeps_a_reduced_dtype_that_passes_the_start_up_probe() -> None:
    dtype, reason = ProbedBackend("auto", error=0.001)._choose_dtype("cpu", {"amx_bf16"})
    assert dtype == "bfloat16"
    assert "; start-up probe min cosine to float32 " in reason
    assert "below" not in reason


def test_auto_falls_back_to_float32_when_the_reduced_dtype_fails_the_probe() -> None:
    backend = ProbedBackend("auto", error=0.2)
    worst = cosines(backend.reference, backend.reference + 0.2 * np.random.default_rng(1).standard_normal((8, 16)))
    assert worst.min() < 0.999
    dtype, reason = backend._choose_dtype("cpu", {"amx_bf16"})
    assert dtype == "float32"
    assert backend._dtype == "float32"  # and it computes in float32
    assert reason.startswith("auto: bfloat16 failed the start-up probe (min cosine 0.9")


def test_an_explicit_reduced_dtype_that_fails_the_probe_is_kept_with_the_number() -> None:
    dtype, reason = ProbedBackend("float16", error=0.2)._choose_dtype("cpu")
    assert dtype == "float16"
    assert "below 0.999" in reason
