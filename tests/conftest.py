"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
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


CALLERS_SETTINGS = (
    "EMBEDDING_", "OTEL_", "HF_", "TRANSFORMERS_", "SENTENCE_TRANSFORMERS_", "TORCH", "PYTORCH_", "OMP_", "GOMP_",
    "KMP_", "MKL_", "ONEDNN_", "DNNL_", "OV_", "MALLOC_", "LD_PRELOAD", "LRU_CACHE_CAPACITY", "PYTHONMALLOC",
    "GUNICORN_CMD_ARGS", "WEB_CONCURRENCY", "PORT", "READY_TIMEOUT_S", "SLOW_START_S", "LOAD_", "BENCH_",
)  # fmt: skip
"""What a developer's shell may export that changes a service, its model or its kernels: no test, and no service,
install or tool a test starts (each gets this process's environment and its own settings), sees it."""


@pytest.fixture(scope="session", autouse=True)
def _hermetic_environment() -> Iterator[None]:
    """Tests run with the defaults they assert, on any shell: the caller's settings are taken away for the session,
    and the hub is offline (no test downloads a model)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith(CALLERS_SETTINGS)]:
            patch.delenv(name)
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="session", autouse=True)
def _session_cache(_hermetic_environment: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every service and backend the tests start keeps its calibration and its converted models in one directory
    of the session (XDG_CACHE_HOME, which EMBEDDING_CACHE_DIR defaults under), not in the home directory: a
    session starts from nothing, and what one start measured, the next start of the same model and settings
    reads. Tests of measuring itself give their own empty directory. Under pytest-xdist the workers of a run share
    it (their temporary directories' parent): an entry is written aside and renamed into place, so a start reads
    all of one or none."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        cache = tmp_path_factory.getbasetemp().parent / "cache"
        cache.mkdir(exist_ok=True)
    else:
        cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        yield cache


RUN_FIRST = ("tests/e2e/test_upgrade.py", "tests/e2e/test_upgrade_interrupted.py", "tests/e2e/test_upgrade_failures.py")
"""The longest modules (docs/testing.md, time by module): make test's workers (pytest-xdist, a module to a worker)
start them first, so that the run does not end waiting for one of them."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first, then the other modules with slow tests, then the rest, each in the order collected
    (a module's tests stay together: its fixtures start once)."""
    slow = {item.nodeid.split("::", 1)[0] for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        module = item.nodeid.split("::", 1)[0]
        if module in RUN_FIRST:
            return RUN_FIRST.index(module)
        return len(RUN_FIRST) + (0 if module in slow else 1)

    items.sort(key=rank)
