"""The real service: gunicorn on a loopback port serving the bundled model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from loadtest.service import ServiceProcess, running_service

BUNDLED_WEIGHT_BYTES = 90_861_056
"""all-MiniLM-L6-v2's 22.7 M parameters and buffers in float32."""
BUNDLED_LINEAR_PARAMETERS = 10_785_408
"""Of which its linear layers' weights and biases: held at a reduced dtype, 2 bytes each."""


def held_linear_parameters(service: ServiceProcess) -> int:
    """The linear layers' parameters ``service`` holds at a reduced dtype: all of them unless it computes in
    float32 (the dtype auto picks depends on the CPU)."""
    dtype = requests.get(f"{service.url}/info", timeout=10).json()["model_dtype"]
    return 0 if dtype == "float32" else BUNDLED_LINEAR_PARAMETERS


# Small limits so that the limit tests send small bodies; everything else is the default.
SERVICE_ENV = {
    "EMBEDDING_MAX_INPUTS": "256",
    "EMBEDDING_MAX_INPUT_CHARS": "20000",
    "EMBEDDING_MAX_BODY_BYTES": "1MiB",
}


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One running service for the whole session."""
    with running_service(tmp_path_factory.mktemp("service") / "service.log", SERVICE_ENV) as service:
        yield service


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """Where the bundled model lives, for in-process comparisons."""
    from app.backend import resolve_model

    return Path(resolve_model("all-minilm-l6-v2").location)
