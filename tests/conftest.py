"""Fixtures shared by every test layer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """No request id or logging configuration leaks from one test into the next."""
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every service and backend the tests start keeps its calibration and its converted models in one directory
    of the session (XDG_CACHE_HOME, which EMBEDDING_CACHE_DIR defaults under), not in the home directory: a
    session starts from nothing, and what one start measured, the next start of the same model and settings
    reads. Tests of measuring itself give their own empty directory."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        yield cache
