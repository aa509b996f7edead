"""Installs of the service for the ops scripts' tests (tests/e2e/test_upgrade*.py): versions 1.0.0, 1.1.0 and
1.2.0 built from this tree, an install of the first layout (venv/ and service.env at the top), which the first
start adopts as versions/NAME and current, and what the tests read of a running install.

An install's venv is a hard-linked copy of the test environment, so no dependency is downloaded, and upgrades
pass ``--no-deps`` through EMBEDDING_PIP_ARGS for speed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from loadtest.service import free_port
from loadtest.startup import own_shebangs

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
OLD, NEW, NEWER = "1.0.0", "1.1.0", "1.2.0"


def build_source(base: Path, version: str) -> Path:
    """A source tree of the service whose version is ``version``."""
    tree = base / f"src-{version}"
    shutil.copytree(ROOT / "app", tree / "app", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("README.md", "LICENSE", "constraints.txt"):
        shutil.copy(ROOT / name, tree / name)
    pyproject = (ROOT / "pyproject.toml").read_text()
    (tree / "pyproject.toml").write_text(pyproject.replace('version = "0.1.0"', f'version = "{version}"', 1))
    return tree


def build_wheel(source: Path, into: Path) -> tuple[Path, str]:
    """The service's wheel built from ``source`` into ``into``, and its SHA-256 (what CI publishes with it)."""
    into.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(into)]
    subprocess.run([*pip, str(source)], check=True, capture_output=True)
    (wheel,) = into.glob("plateau_embeddings-*.whl")
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


def strangers_wheel(into: Path, version: str) -> Path:
    """A stranger's package under the service's distribution name: an ``app`` that refuses to be imported."""
    into.mkdir(parents=True, exist_ok=True)
    wheel = into / f"plateau_embeddings-{version}-py3-none-any.whl"
    info = f"plateau_embeddings-{version}.dist-info"
    files = {
        "app/__init__.py": "raise ImportError('a stranger\\'s package of the same name')\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: plateau-embeddings\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr(f"{info}/RECORD", "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"]))
    return wheel


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def session_processes(sid: int) -> list[str]:
    """The command lines of the processes in session ``sid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found


def fingerprint(tree: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``tree``: (inode, size, mtime); any change to the tree changes it."""
    prints = {}
    for directory, _, files in os.walk(tree):
        for name in files:
            info = os.lstat(os.path.join(directory, name))
            prints[os.path.join(directory, name)] = (info.st_ino, info.st_size, info.st_mtime_ns)
    return prints


@dataclass
class Install:
    home: Path
    port: int
    sources: dict[str, Path]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "EMBEDDING_HOME": str(self.home),
            "EMBEDDING_PIP_ARGS": "--no-deps --no-build-isolation --quiet",
            "READY_TIMEOUT_S": "180",
        }

    def ops(self, script: str, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(OPS / script), *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start_ops(self, script: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """Run an ops script in a session of its own (its process group is its session), output to a file."""
        with (self.home.parent / f"{script}.out").open("ab") as out:
            return subprocess.Popen(
                ["bash", str(OPS / script), *args],
                env={**self.env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def version(self) -> str:
        version: str = requests.get(f"{self.url}/info", timeout=10).json()["version"]
        return version

    def embeds(self) -> bool:
        return requests.post(f"{self.url}/embed", json={"inputs": "still serving"}, timeout=60).status_code == 200

    def serving(self) -> bool:
        try:
            return requests.get(f"{self.url}/ready", timeout=5).status_code == 200
        except requests.RequestException:  # refused, or held unanswered
            return False

    def unlocked(self) -> bool:
        lock = self.home / "run" / "ops.lock"
        return subprocess.run(["flock", "-n", str(lock), "true"], check=False).returncode == 0

    def current(self) -> Path:
        return (self.home / "current").resolve(strict=True)

    def versions(self) -> list[list[str]]:
        """ops/rollback.sh --list, one [name, version, health and marks] per line."""
        listed = self.ops("rollback.sh", "--list")
        assert listed.returncode == 0, listed.stderr
        return [line.split("\t") for line in listed.stdout.splitlines()]

    def log(self) -> str:
        return (self.home / "logs" / "ops.log").read_text()

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


def first_layout(home: Path, port: int, sources: dict[str, Path]) -> Install:
    """Version 1.0.0 installed as the first ops scripts did: venv/ and service.env at the top of ``home``."""
    home.mkdir()
    subprocess.run(["cp", "-al", sys.prefix, str(home / "venv")], check=True)
    own_shebangs(home / "venv", sys.prefix)
    pip = [str(home / "venv" / "bin" / "python"), "-m", "pip"]
    # The test environment's own (editable) install goes: the version installed is the only one there.
    subprocess.run([*pip, "uninstall", "--quiet", "--yes", "plateau-embeddings"], check=True, capture_output=True)
    install = [*pip, "install", "--quiet", "--no-deps", "--no-build-isolation", str(sources[OLD])]
    subprocess.run(install, check=True, capture_output=True)
    inst = Install(home, port, sources)
    shutil.copy(inst.config(), home / "service.env")
    return inst


SLOW_START = {"PYTHONPATH": str(ROOT / "tests" / "slow_start"), "SLOW_START_S": "31"}
"""Settings of a version whose model takes 31 s more to load (tests/slow_start/sitecustomize.py): longer than the
30 s gunicorn's ASGI lifespan waits, beside whatever loading takes."""


def started_install(home: Path, template: Path, sources: dict[str, Path], **settings: str) -> Install:
    """Version 1.0.0 as versions/NAME and current (hard links to the template), with ``settings``, started."""
    subprocess.run(["cp", "-al", str(template), str(home)], check=True)
    (home / "logs" / "ops.log").unlink()  # hard links: unlinked, never written through
    shutil.rmtree(home / "run")
    (version,) = (home / "versions").iterdir()
    own_shebangs(version / "venv", str(template / "versions" / version.name / "venv"))
    inst = Install(home, free_port(), sources)
    (version / "service.env").unlink()
    shutil.copy(inst.config(**settings), version / "service.env")
    started = inst.ops("service.sh", "start")
    assert started.returncode == 0, started.stderr
    return inst


def gunicorn_masters(home: Path) -> list[int]:
    """The service's masters running from ``home``: its versions' interpreters (a master, or a launcher about to
    become one), less their workers (a process whose parent is one of them)."""
    ours = {}
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if command.startswith(str(home)) and command.endswith("/venv/bin/python"):
            ours[int(entry.name)] = parent
    return [pid for pid, parent in ours.items() if parent not in ours]


class MemorySampler:
    """The summed RSS of every process running from an install, sampled every 0.1 s: two models during a
    handover."""

    def __init__(self, home: Path) -> None:
        self.home, self.peak, self._stop = home, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            total = 0
            for entry in Path("/proc").iterdir():
                try:
                    if str(self.home).encode() in (entry / "cmdline").read_bytes():
                        status = (entry / "status").read_text()
                        total += int(status.split("VmRSS:")[1].split()[0]) * 1024
                except (OSError, IndexError, ValueError):
                    continue
            self.peak = max(self.peak, total)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def handover_seconds(log: str) -> float:
    """From the new process's start to the old one's exit, read from the last handover in the ops log."""
    import datetime as dt

    def at(marker: str) -> float:
        line = [line for line in log.splitlines() if marker in line][-1]
        return dt.datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%SZ").timestamp()

    return at("stopped pid") - at("beside pid")


def worker_of(master: int) -> int:
    (worker,) = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(worker)
