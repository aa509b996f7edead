"""Turning raw model output into what a request asked for."""

from __future__ import annotations

import base64

import numpy as np

_EPSILON = 1e-12


def shape_vectors(embeddings: np.ndarray, *, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Keep the first ``dimensions`` components, then scale each row to unit length if asked.

    Shortening a normalised vector makes it shorter than 1, so it is normalised
    again after truncation (the Matryoshka convention OpenAI follows).
    """
    vectors = embeddings if dimensions is None else embeddings[:, :dimensions]
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, _EPSILON)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def to_base64(vector: np.ndarray) -> str:
    """Little-endian float32 bytes, base64-encoded (OpenAI's ``encoding_format=base64``)."""
    return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
