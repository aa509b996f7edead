"""A service with a deliberate leak, for the leak test: its backend keeps every batch's token vectors.

Served like the real one (``gunicorn -c python:app.gunicorn_conf 'tests.leaky:build()'``): the bundled model,
the real engine, memory manager and routes; only ``finish`` also keeps what it should have dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.backend import SentenceTransformerBackend
from app.config import Settings
from app.front import WSGIFront
from app.server import serve
from app.service import Service

TOKENS_KEPT = 64  # rows kept per text: as if every text's token vectors were held
KEPT_BYTES_PER_TEXT = TOKENS_KEPT * 384 * 4  # float32 rows of the bundled model's 384 dimensions


class LeakyBackend(SentenceTransformerBackend):
    """The real backend, keeping ``TOKENS_KEPT`` copies of each text's vector forever."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.model, settings.device, settings.torch_threads, settings.dtype)
        self.kept: list[np.ndarray] = []

    def finish(self, encoded: Any) -> np.ndarray:
        rows = super().finish(encoded)
        self.kept.append(np.repeat(rows, TOKENS_KEPT, axis=0))  # the leak
        return rows


def build() -> WSGIFront:
    """The app gunicorn serves as ``tests.leaky:build()`` (a factory: importing this module starts nothing)."""
    settings = Settings.from_env()
    return serve(Service(settings, backend=LeakyBackend(settings)))
