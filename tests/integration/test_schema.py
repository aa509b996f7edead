"""schemathesis against the real server: every operation of /openapi.json, all checks on, a bounded number
of examples each. A request the document calls valid is accepted, one it calls invalid is refused with a
4xx, and every answer matches its documented status, content type and schema."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests

from loadtest.service import ServiceProcess, running_service

CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES_PER_OPERATION = int(os.environ.get("SCHEMA_EXAMPLES") or 100)
"""100 in make test (about 20 s); make test-long asks for 500."""
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


AGREEMENT_CASES = [
    # (route, body): where the document and the validation disagreed, and values either side of each rule.
    *(("/embed", {"inputs": "x", "truncation_direction": d}) for d in ("right", "left", "Right", "Left", "LEFT", "up")),
    *(("/embed", {"inputs": "x", "prompt_name": name}) for name in ("query", "", None)),
    ("/tokenize", {"inputs": "x", "prompt_name": "query"}),
    ("/similarity", {"inputs": {"source_sentence": "x", "sentences": ["y"]}, "parameters": {"prompt_name": "q"}}),
    *(
        (
            "/similarity",
            {"inputs": {"source_sentence": "x", "sentences": ["y"]}, "parameters": {"truncation_direction": d}},
        )
        for d in ("Left", "LEFT")
    ),
    *(("/embed", {"inputs": text}) for text in ("", " ", "\ufeff", "\x1f", "\x85", "\u200b", "\x00", "\u0301")),
    *(("/v1/embeddings", {"input": "x", "dimensions": n}) for n in (0, 1, 1.0, 384, 385, True)),
    *(("/v1/embeddings", {"input": "x", "encoding_format": f}) for f in ("float", "Float", "base64")),
    *(("/v1/embeddings", {"input": "x", "input_type": t}) for t in ("query", "Query", None)),
    ("/decode", {"ids": [101, 102], "skip_special_tokens": "yes"}),
]


def documented_as_valid(document: dict[str, Any], route: str, body: dict[str, Any]) -> bool:
    """Whether the served document's request schema for ``POST route`` takes ``body`` (JSON Schema 2020-12)."""
    schema = document["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator({**document, **schema})  # its $refs resolve in the document
    return validator.is_valid(body)


@pytest.mark.parametrize(("route", "body"), AGREEMENT_CASES)
def test_the_document_and_the_validation_agree(service: ServiceProcess, route: str, body: dict[str, Any]) -> None:
    document = requests.get(f"{service.url}/openapi.json", timeout=10).json()
    answer = requests.post(f"{service.url}{route}", json=body, timeout=30)
    valid = documented_as_valid(document, route, body)
    assert (answer.status_code == 200) == valid, (valid, answer.status_code, answer.text[:300])
    if not valid:
        assert answer.status_code in (400, 422), answer.text[:300]
