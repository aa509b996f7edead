"""schemathesis against the real server: every operation of /openapi.json, all checks on, a bounded number
of examples each. A request the document calls valid is accepted, one it calls invalid is refused with a
4xx, and every answer matches its documented status, content type and schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.service import running_service

CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES_PER_OPERATION = 100
SEED = 20261126  # fixed, so a failure in CI is reproducible with the same command
# The limits as the document states them. Texts of at most 254 characters: with truncate false, a text
# over the model's 256 tokens is a 422 that JSON Schema cannot express, and a WordPiece token covers at
# least one character, so 254 characters (plus the two special tokens) can never reach it.
ENV = {
    "EMBEDDING_MAX_INPUTS": "64",
    "EMBEDDING_MAX_INPUT_CHARS": "254",
    "EMBEDDING_MAX_BODY_BYTES": "1MiB",
    "EMBEDDING_MANUAL_CLEANUP_INTERVAL_S": "0",  # so the cleanup route is exercised, not rate-limited
}


@pytest.mark.slow
def test_the_api_keeps_to_its_openapi_document(tmp_path: Path) -> None:
    st = Path(sys.executable).with_name("st")  # the virtual environment's, like its gunicorn
    with running_service(tmp_path / "service.log", ENV) as service:
        result = subprocess.run(
            [str(st), "--config-file", str(CONFIG), "run", f"{service.url}/openapi.json", "--checks", "all",
             "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", str(SEED), "--workers", "1", "--no-color",
             "--generation-database", "none", "--request-timeout", "60"],
            capture_output=True, text=True, timeout=900, cwd=tmp_path, check=False,
        )  # fmt: skip
    summary = result.stdout[result.stdout.rfind("SUMMARY") :]
    print(f"\n{summary}")
    assert result.returncode == 0, result.stdout[-8000:]
    assert " passed" in summary and "failed" not in summary
