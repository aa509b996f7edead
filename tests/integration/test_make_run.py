"""`make run` serves where the user asks: PORT or EMBEDDING_PORT (PORT wins when both are set)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from loadtest.service import free_port

ROOT = Path(__file__).resolve().parents[2]


def environment(**given: str) -> dict[str, str]:
    """This process's environment without PORT and EMBEDDING_PORT, then ``given``."""
    return {**{k: v for k, v in os.environ.items() if k not in ("PORT", "EMBEDDING_PORT")}, **given}


def planned_port(env: dict[str, str]) -> str:
    """The port `make run` would pass to the service, from make's dry run (the venv taken as installed)."""
    plan = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed-run", "run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    (port,) = [word.split("=", 1)[1] for word in plan.stdout.split() if word.startswith("EMBEDDING_PORT=")]
    return port


@pytest.mark.parametrize(
    ("given", "port"),
    [({}, "5000"), ({"EMBEDDING_PORT": "8080"}, "8080"), ({"PORT": "9000"}, "9000"),
     ({"PORT": "9000", "EMBEDDING_PORT": "8080"}, "9000")],
    ids=["default", "EMBEDDING_PORT", "PORT", "both"],
)  # fmt: skip
def test_the_port_make_run_chooses(given: dict[str, str], port: str) -> None:
    assert planned_port(environment(**given)) == port


def test_make_run_installs_what_serving_needs_and_no_test_tools(tmp_path: Path) -> None:
    """On a machine without the virtual environment: the service with its bundled model, nothing of the test or
    load-test extras (mypy, schemathesis, Locust, ...), and it says so in one line."""
    plan = subprocess.run(
        ["make", "-n", "run", f"VENV={tmp_path / 'venv'}"],
        check=False,
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
    )
    assert plan.returncode == 0, plan.stderr
    installs = [line for line in plan.stdout.splitlines() if " install " in line and "-e " in line]
    assert len(installs) == 1 and installs[0].endswith("-e '.[bundled]'"), installs
    assert "torch 2.13.0" in plan.stdout and "jemalloc" in plan.stdout
    assert "embedding-service serve" in plan.stdout


def test_embedding_port_make_run_serves_there_on_jemalloc(tmp_path: Path) -> None:
    port = free_port()
    env = environment(EMBEDDING_PORT=str(port))
    with (tmp_path / "run.log").open("wb") as log:
        make = subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert make.poll() is None, (tmp_path / "run.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "make run did not become ready"
            try:
                if requests.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        assert requests.post(f"http://127.0.0.1:{port}/embed", json={"inputs": "hi"}, timeout=30).status_code == 200
        # the allocator the README's memory figures were measured on: make run installs it when missing
        assert requests.get(f"http://127.0.0.1:{port}/memory", timeout=10).json()["allocator"] == "jemalloc"
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(60)
