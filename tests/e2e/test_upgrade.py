"""ops/service.sh, ops/upgrade.sh and ops/rollback.sh on a real install, with real services on loopback.

Two versions of the service (1.0.0 and 1.1.0) are built from this tree; the install's
virtual environment is a hard-linked copy of the test environment, so no dependency is
downloaded, and upgrades pass ``--no-deps`` through EMBEDDING_PIP_ARGS for speed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from loadtest.service import free_port

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
OLD, NEW = "1.0.0", "1.1.0"
LONG_TEXTS = [f"Passage {i}: " + "an indexing pipeline sends long documents to the service. " * 20 for i in range(48)]

pytestmark = pytest.mark.slow


def build_source(base: Path, version: str) -> Path:
    """A source tree of the service whose version is ``version``."""
    tree = base / f"src-{version}"
    shutil.copytree(ROOT / "app", tree / "app", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("README.md", "constraints.txt"):
        shutil.copy(ROOT / name, tree / name)
    pyproject = (ROOT / "pyproject.toml").read_text()
    (tree / "pyproject.toml").write_text(pyproject.replace('version = "0.1.0"', f'version = "{version}"', 1))
    return tree


@dataclass
class Install:
    home: Path
    port: int
    sources: dict[str, Path]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ops(self, script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "EMBEDDING_HOME": str(self.home),
            "EMBEDDING_PIP_ARGS": "--no-deps --no-build-isolation --quiet",
            "READY_TIMEOUT_S": "180",
        }
        return subprocess.run(
            ["bash", str(OPS / script), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def version(self) -> str:
        version: str = requests.get(f"{self.url}/info", timeout=10).json()["version"]
        return version

    def embeds(self) -> bool:
        return requests.post(f"{self.url}/embed", json={"inputs": "still serving"}, timeout=60).status_code == 200

    def config(self, **extra: str) -> Path:
        path = self.home.parent / f"service-{len(extra)}-{'-'.join(extra)}.env"
        settings = {
            "HF_HUB_OFFLINE": "1",
            "EMBEDDING_MODEL": "all-minilm-l6-v2",
            "EMBEDDING_PORT": str(self.port),
            "GUNICORN_CMD_ARGS": f"'--bind 127.0.0.1:{self.port}'",
            **extra,
        }
        path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sources")
    return {version: build_source(base, version) for version in (OLD, NEW)}


@pytest.fixture
def install(tmp_path: Path, sources: dict[str, Path]) -> Iterator[Install]:
    """Version 1.0.0 installed in its own directory and running."""
    home = tmp_path / "embedding-service"
    home.mkdir()
    subprocess.run(["cp", "-al", sys.prefix, str(home / "venv")], check=True)
    pip = [str(home / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps"]
    subprocess.run([*pip, "--no-build-isolation", str(sources[OLD])], check=True, capture_output=True)
    inst = Install(home, free_port(), sources)
    shutil.copy(inst.config(), home / "service.env")
    started = inst.ops("service.sh", "start")
    assert started.returncode == 0, started.stderr
    yield inst
    inst.ops("service.sh", "stop")


def test_status_reports_version_and_readiness(install: Install) -> None:
    status = install.ops("service.sh", "status")
    assert status.returncode == 0
    assert f"version {OLD}" in status.stdout
    assert "ready" in status.stdout
    assert install.ops("service.sh", "stop").returncode == 0
    stopped = install.ops("service.sh", "status")
    assert stopped.returncode == 3
    assert f"stopped (installed version {OLD})" in stopped.stdout


def test_an_idle_service_is_upgraded_and_backed_up(install: Install) -> None:
    assert install.version() == OLD
    result = install.ops("upgrade.sh", "--source", str(install.sources[NEW]))
    assert result.returncode == 0, result.stderr
    assert install.version() == NEW
    assert install.embeds()
    backups = install.ops("rollback.sh", "--list").stdout.splitlines()
    assert len(backups) == 1 and backups[0].endswith(f"-{OLD}\tversion {OLD}")
    backup = install.home / "backups" / backups[0].split("\t")[0]
    assert (backup / "service.env").exists()
    assert f"embedding-service @ file://{install.sources[OLD]}" in (backup / "requirements.txt").read_text()
    steps = (install.home / "logs" / "ops.log").read_text()
    for step in ("activity: 0 embedding requests", "backed up version 1.0.0", "installing from", "stopping pid"):
        assert step in steps
    assert f"upgraded from {OLD} to {NEW}" in steps


def test_an_upgrade_while_indexing_runs_is_refused(install: Install) -> None:
    stop = threading.Event()

    def index() -> None:
        while not stop.is_set():
            requests.post(f"{install.url}/embed", json={"inputs": LONG_TEXTS[:8]}, timeout=120)

    with ThreadPoolExecutor(max_workers=2) as pool:
        pool.submit(index)
        pool.submit(index)
        try:
            result = install.ops("upgrade.sh", "--source", str(install.sources[NEW]))
        finally:
            stop.set()
    assert result.returncode == 3
    assert "the service is in use" in result.stderr
    assert "--force" in result.stderr
    assert install.version() == OLD
    assert not (install.home / "backups").exists()


def test_force_upgrades_during_load_and_in_flight_requests_are_answered(install: Install) -> None:
    with ThreadPoolExecutor(max_workers=12) as pool:
        in_flight = [
            pool.submit(requests.post, f"{install.url}/embed", json={"inputs": LONG_TEXTS}, timeout=300)
            for _ in range(12)
        ]
        result = install.ops("upgrade.sh", "--force", "--source", str(install.sources[NEW]))
        statuses = [f.result().status_code for f in in_flight]
    assert result.returncode == 0, result.stderr
    assert "--force: upgrading while active" in result.stderr
    assert statuses == [200] * 12
    assert install.version() == NEW


@pytest.mark.parametrize(
    ("setting", "failure"),
    [
        ({"EMBEDDING_BATCH_SIZE": "lots"}, "EMBEDDING_BATCH_SIZE"),
        ({"EMBEDDING_MODEL": "/nonexistent/model"}, "does not exist"),
    ],
    ids=["bad-configuration", "model-does-not-load"],
)
def test_a_broken_new_version_is_rolled_back_automatically(
    install: Install, setting: dict[str, str], failure: str
) -> None:
    good_config = (install.home / "service.env").read_text()
    result = install.ops(
        "upgrade.sh", "--source", str(install.sources[NEW]), "--config", str(install.config(**setting))
    )
    assert result.returncode == 1, result.stderr
    assert "upgrade failed at: readiness" in result.stderr
    assert f"rolled back: version {OLD} serves again" in result.stderr
    assert failure in (install.home / "logs" / "service.log").read_text()
    assert install.version() == OLD
    assert install.embeds()
    assert (install.home / "service.env").read_text() == good_config


def test_rollback_restores_a_named_backup(install: Install) -> None:
    assert install.ops("upgrade.sh", "--source", str(install.sources[NEW])).returncode == 0
    assert install.version() == NEW
    name = install.ops("rollback.sh", "--list").stdout.split("\t")[0]
    result = install.ops("rollback.sh", name)
    assert result.returncode == 0, result.stderr
    assert install.version() == OLD
    assert install.embeds()
    listed = install.ops("rollback.sh", "--list").stdout
    assert f"version {NEW}" in listed  # what was replaced is kept, so the rollback can be undone
    assert install.ops("rollback.sh", "no-such-backup").returncode == 2
