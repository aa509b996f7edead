"""Every command in the README is run: here against the real service (its curl lines and its Python example),
or by the test or CI step this module names for it; the few this machine cannot run (no Docker engine, no
Kubernetes API server) are named with what checks them instead. A command added to the README that is in none
of these lists fails here."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from huggingface_hub import constants as hf_constants

from loadtest.service import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()

RUN_ELSEWHERE = {
    "make run": "tests/integration/test_make_run.py",
    "make test": ".ci/run",
    "embedding-service serve": "loadtest/service.py",  # every integration and e2e service is started with it
    "embedding-service check": "tests/integration/test_cli.py",
    "ops/service.sh": "tests/e2e/test_upgrade.py",
    "ops/upgrade.sh": "tests/e2e/test_upgrade.py",
    "ops/rollback.sh": "tests/e2e/test_upgrade.py",
}
"""Command -> the file that runs it."""

CANNOT_RUN_HERE = {
    "docker build": "no Docker engine: hadolint lints the Dockerfile (make hadolint)",
    "docker run": "no Docker engine: `embedding-service serve` and `check` are what the image runs",
    "kubectl apply": "no API server: make deploy renders the kustomizations, tests/unit/test_kubernetes.py checks them",
    "cp -r deploy/kubernetes/overlays/example": "copies the overlay that tests/unit/test_kubernetes.py renders",
}
"""Command -> why it is not run here, and what checks it instead."""


def blocks(language: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"```{language}\n(.*?)```", README, re.S)]


def commands() -> list[str]:
    """Each shell command of the README's bash blocks, continuation lines joined, comments dropped."""
    found = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split("  #", 1)[0].strip()
            if command and not command.startswith("#"):
                found.append(command)
    return found


def test_every_readme_command_is_run_by_a_test_or_ci_or_says_why_not() -> None:
    unaccounted = [
        command
        for command in commands()
        if not command.startswith("curl ")
        and not command.startswith("embedding-service settings")
        and not any(command.startswith(known) for known in (*RUN_ELSEWHERE, *CANNOT_RUN_HERE))
    ]
    assert not unaccounted, f"README commands that nothing runs: {unaccounted}"
    for command, runner in RUN_ELSEWHERE.items():
        text = (ROOT / runner).read_text()
        words = command.split()
        assert any(word in text for word in (command, words[-1], f'"{words[-1]}"')), (command, runner)


def test_the_readmes_curl_commands_answer(service: ServiceProcess) -> None:
    curls = [command for command in commands() if command.startswith("curl ")]
    assert len(curls) >= 2
    for command in curls:
        args = shlex.split(command.replace("localhost:5000", service.url.removeprefix("http://")))
        done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        vectors = answer if isinstance(answer, list) else [d["embedding"] for d in answer["data"]]
        width = 128 if '"dimensions": 128' in command else 384  # the model's 384 unless the command asks
        assert vectors and all(len(vector) == width for vector in vectors), command


def test_the_readmes_python_example_runs(service: ServiceProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    (example,) = blocks("python")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # a client process is online; the service is not
    scope: dict[str, object] = {}
    exec(example.replace("http://localhost:5000", service.url), scope)  # the README's own example, as it is
    assert np.asarray(scope["vectors"]).shape == (2, 384)
    response: Any = scope["response"]
    assert response.model == "sentence-transformers/all-MiniLM-L6-v2"


def test_the_readmes_settings_command_lists_the_settings() -> None:
    assert "embedding-service settings [--json]" in README
    done = subprocess.run([sys.executable, "-m", "app", "settings", "--json"], check=True, capture_output=True)
    assert len(json.loads(done.stdout)) == README.count("| `EMBEDDING_")
