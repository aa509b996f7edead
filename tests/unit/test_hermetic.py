"""Tests see the defaults they assert, whatever the shell that runs them exports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_no_setting_of_the_caller_reaches_a_test() -> None:
    assert not [n for n in os.environ if n.startswith(("EMBEDDING_", "OMP_", "GOMP_", "MALLOC_", "OTEL_"))]
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert Settings() == Settings.from_env({})


@pytest.mark.slow  # a pytest run of its own
def test_a_shell_with_settings_exported_runs_the_tests_as_a_clean_one() -> None:
    """The test above, under a shell that sets a service's limits, its threads and its allocator's options: a
    session that kept them would start services with them, and assert the defaults against them."""
    shell = {
        **os.environ,
        "EMBEDDING_MAX_INPUTS": "1",
        "EMBEDDING_BATCH_SIZE": "3",
        "OMP_NUM_THREADS": "1",
        "GOMP_SPINCOUNT": "0",
        "MALLOC_ARENA_MAX": "1",
        "OTEL_SERVICE_NAME": "theirs",
        "HF_HUB_OFFLINE": "0",
    }
    test = f"{Path(__file__).relative_to(ROOT)}::test_no_setting_of_the_caller_reaches_a_test"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=ROOT,
        env=shell,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:]
