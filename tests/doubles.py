"""Test doubles for logic tests: they subclass the real abstractions and live with the tests, not in the package."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from flask import Flask

from app import components
from app.backend import BATCH_OVERHEAD_TOKENS, EmbeddingBackend, ModelInfo, ModelLoadError, Prepared, Token
from app.config import Settings
from app.memory import HeapActions, MemorySample, MemorySampler
from app.service import Service


class FakeBackend(EmbeddingBackend):
    """A deterministic backend: a text's vector is derived from its hash; tokens are words + 2 special ones.

    ``gate`` (a cleared Event) holds every batch until it is set, so tests can
    fill the queue; ``poison`` makes any batch that holds that text fail;
    ``load_error`` makes ``load`` fail.
    """

    def __init__(
        self,
        *,
        dimensions: int = 8,
        max_seq_length: int = 16,
        prompts: dict[str, str] | None = None,
        poison: str | None = None,
        load_error: str | None = None,
        batch_overhead_tokens: int = BATCH_OVERHEAD_TOKENS,
    ) -> None:
        self.dimensions = dimensions
        self.batch_overhead_tokens = batch_overhead_tokens
        self.max_seq_length = max_seq_length
        self.prompts = prompts or {}
        self.poison = poison
        self.load_error = load_error
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[list[str]] = []
        self.released = 0

    def load(self) -> ModelInfo:
        if self.load_error is not None:
            raise ModelLoadError(self.load_error)
        return ModelInfo(
            "fake/model",
            self.dimensions,
            self.max_seq_length,
            "cpu",
            dict(self.prompts),
            batch_overhead_tokens=self.batch_overhead_tokens,
        )

    def token_spans(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        return [[m.span() for m in re.finditer(r"\S+", text)] for text in texts]

    def tokenize(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[Token]]:
        found = []
        for text in texts:
            words = [
                Token(self.word_id(m.group()), m.group(), False, m.start(), m.end()) for m in re.finditer(r"\S+", text)
            ]
            if add_special_tokens:
                words = [Token(101, "[CLS]", True, None, None), *words, Token(102, "[SEP]", True, None, None)]
            found.append(words)
        return found

    @staticmethod
    def word_id(word: str) -> int:
        return 1000 + int.from_bytes(hashlib.sha256(word.encode()).digest()[:2], "little")

    def prepare(self, texts: list[str]) -> Prepared:
        counts = [min(self.tokens(text), self.max_seq_length) for text in texts]
        return Prepared(features=list(texts), token_counts=counts)

    def encode(self, prepared: Prepared) -> Any:
        self.gate.wait()
        texts: list[str] = prepared.features
        if self.poison is not None and self.poison in texts:
            raise RuntimeError("poisoned batch")
        self.batches.append(texts)
        return np.stack([self.vector(text) for text in texts])

    def finish(self, encoded: Any) -> np.ndarray:
        return np.asarray(encoded, dtype=np.float32)

    def finish_tokens(self, encoded: Any, token_counts: list[int]) -> list[np.ndarray]:
        """Token ``k`` of a text: its vector scaled by ``k + 1``."""
        rows = np.asarray(encoded, dtype=np.float32)
        return [np.stack([row * (k + 1) for k in range(n)]) for row, n in zip(rows, token_counts, strict=True)]

    def decode(self, ids: list[list[int]], *, skip_special_tokens: bool = True) -> list[str]:
        words = {101: "[CLS]", 102: "[SEP]"}
        return [" ".join(words.get(i, f"w{i}") for i in row if not (skip_special_tokens and i in words)) for row in ids]

    def release_caches(self) -> None:
        self.released += 1

    @staticmethod
    def tokens(text: str) -> int:
        """The fake tokenizer: words, plus two special tokens."""
        return len(text.split()) + 2

    def vector(self, text: str) -> np.ndarray:
        """The (unnormalised) vector this backend gives ``text``."""
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.dimensions).astype(np.float32)


class FakeSampler(MemorySampler):
    """Memory readings the test decides: each ``rss()`` takes the next value, the last one repeats."""

    def __init__(self, *values: int) -> None:
        self.values = list(values) or [100_000_000]

    def set(self, *values: int) -> None:
        """Replace the readings to come."""
        self.values = list(values)

    def rss(self) -> int:
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]

    def full(self) -> MemorySample:
        return MemorySample(self.values[0], uss_bytes=None)  # does not consume a reading


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


ROUTE_TEST_BUDGET_BYTES = 256 << 20
"""The memory budget of a service on the fake backend. A derived one starts from the test process's RSS, which
late in a full run (models loaded in-process, the corpus) is over 2 GB, past the elevated threshold: the budget
fell to its floor and batches to 16 tokens, and a test that expects two texts in one batch failed in CI."""

QUIET_HEAP = HeapActions(
    collect=lambda: 0, collect_once=lambda: 0, freeze=lambda: None, release=lambda: True, limit_arenas=lambda n: False
)
"""Heap actions that leave the test process alone: no ``gc.freeze()``, no collections, no purge, no ``mallopt``."""


@contextmanager
def serving(settings: Settings, backend: EmbeddingBackend | None = None, *, wait: bool = True) -> Iterator[Flask]:
    """The app of a started service on ``backend`` (a fresh :class:`FakeBackend` by default), loaded unless not
    ``wait``; stopped after, every thread it started joined. It leaves the test process's heap alone and
    writes no run marker. Its memory budget is ``settings``' or :data:`ROUTE_TEST_BUDGET_BYTES`, never derived:
    derived, it would start from this process's RSS, the whole session's."""
    if settings.memory_budget_bytes is None:
        settings = settings.replace(memory_budget_bytes=ROUTE_TEST_BUDGET_BYTES)
    service = Service(settings, backend=backend or FakeBackend(), heap=QUIET_HEAP, record_run=False)
    service.start()
    try:
        yield ready(service.app) if wait else service.app
    finally:
        service.stop(5)


def ready(app: Flask, timeout_s: float = 5.0) -> Flask:
    """``app`` once its engine has loaded the (fake) model."""
    engine = components(app).engine
    deadline = time.monotonic() + timeout_s
    while not engine.ready:
        assert time.monotonic() < deadline, "the engine did not become ready"
        time.sleep(0.005)
    return app
