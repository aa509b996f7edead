"""``embedding-service check`` with the real bundled model: what ``serve`` would run, and that it can."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # loads the model in a process of its own
def test_check_loads_the_model_and_embeds_one_text() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDDING_MODEL": "all-minilm-l6-v2"}
    done = subprocess.run(
        [sys.executable, "-m", "app", "check", "--json"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert (report["model_id"], report["dimensions"], report["max_seq_length"]) == (
        "sentence-transformers/all-MiniLM-L6-v2",
        384,
        256,
    )
    assert report["dtype"] in ("float32", "bfloat16") and report["dtype_reason"]
    assert report["allocator"] == "jemalloc"  # make integration installs it (system-deps), as make run does
