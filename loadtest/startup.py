"""How long the service takes to start, hand over and recover, quiet and under load, with the ops scripts.

    python -m loadtest.startup                                   # the bundled model
    python -m loadtest.startup --model reports/bert-768          # a model directory (loadtest/synthetic_model.py)

An install of this tree is made in a temporary directory (a hard-linked copy of this environment, the service
installed into it), started with ``ops/service.sh start``, then, in order:

1. quiet: ``ops/service.sh restart`` (a handover), then ``kill -9`` of the worker (gunicorn starts another);
2. under 8 clients sending single texts and 32-text batches without pause (loadtest/clients.py): the same
   restart and the same kill.

For each it prints the time to ready, the errors clients saw, and the longest time in which no single-text and
no batch client got an answer; a handover also the new process's start to ready and the old one's drain, from
the ops log. ``--out DIR`` writes them to ``DIR/startup.json``. Numbers for docs/operations.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from loadtest.clients import KINDS, Clients, errors
from loadtest.service import BUNDLED_MODEL, ROOT, free_port

OPS = ROOT / "ops"


class Install:
    """This tree installed as the ops scripts keep a service (ops/lib.sh), in ``home``, serving on ``port``."""

    def __init__(self, home: Path, port: int, settings: dict[str, str], source: Path = ROOT) -> None:
        self.home, self.port = home, port
        self.url = f"http://127.0.0.1:{port}"
        home.mkdir(parents=True)
        venv = home / "venv"  # the first layout, which the first start adopts as a version
        subprocess.run([tool("cp"), "-al", sys.prefix, str(venv)], check=True)
        own_shebangs(venv, sys.prefix)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
        subprocess.run([*pip, "uninstall", "--quiet", "--yes", "plateau-embeddings"], check=True, capture_output=True)
        install = [*pip, "install", "--quiet", "--no-deps", "--no-build-isolation", str(snapshot(source, home.parent))]
        subprocess.run(install, check=True, capture_output=True)
        lines = {
            "HF_HUB_OFFLINE": "1",
            "EMBEDDING_CACHE_DIR": str(home / "cache"),  # the first start measures, the next ones read it
            "EMBEDDING_PORT": str(port),
            "GUNICORN_CMD_ARGS": f"'--bind 127.0.0.1:{port}'",
            **settings,
        }
        (home / "service.env").write_text("".join(f"{k}={v}\n" for k, v in lines.items()))

    def ops(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [tool("bash"), str(OPS / script), *args],
            env={**os.environ, "EMBEDDING_HOME": str(self.home), **env},
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            sys.stderr.write(result.stderr[-3000:])
        return result

    def master(self) -> int:
        return int((self.home / "run" / "service.pid").read_text())

    def worker(self) -> int:
        children = Path(f"/proc/{self.master()}/task/{self.master()}/children").read_text().split()
        return int(children[0])

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/ready", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def calibration(self) -> str:
        """``measured`` or ``cached`` (GET /info), for the process serving now."""
        try:
            return str(requests.get(f"{self.url}/info", timeout=30).json().get("calibration", "unknown"))
        except (requests.RequestException, ValueError):
            return "unknown"

    def ops_log(self) -> str:
        return (self.home / "logs" / "ops.log").read_text()


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed")
    return found


def snapshot(source: Path, base: Path) -> Path:
    """The service's sources in ``source``, copied (pip builds in the tree it is given)."""
    tree = base / "source"
    shutil.copytree(source / "app", tree / "app", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("README.md", "LICENSE", "constraints.txt", "pyproject.toml"):
        shutil.copy(source / name, tree / name)
    return tree


def own_shebangs(venv: Path, was: str) -> None:
    """As if the venv had been made where it is: its scripts name its own python instead of ``was``'s."""
    for script in (venv / "bin").iterdir():
        if script.is_file() and not script.is_symlink() and script.read_bytes().startswith(f"#!{was}".encode()):
            text = script.read_bytes().replace(was.encode(), str(venv).encode(), 1)
            script.unlink()  # a new file: the hard-linked original belongs to the environment copied
            script.write_bytes(text)
            script.chmod(0o755)


def handover_steps(log: str) -> dict[str, float]:
    """The last handover's steps from the ops log (whole seconds): the new process's start to its check, and the
    old one's drain; nothing when it failed."""
    lines = log.splitlines()
    lines = lines[max(i for i, line in enumerate(lines) if "beside pid" in line) :]

    def at(marker: str) -> float:
        line = next(line for line in lines if marker in line)
        return dt.datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()

    if not any("handed over" in line for line in lines):
        return {}
    return {
        "new_start_to_ready_s": at("handed over") - at("beside pid"),
        "old_drain_s": at("stopped pid") - at("handed over"),
    }


def measure_restart(install: Install, clients: Clients | None) -> dict[str, Any]:
    started = time.monotonic()
    first = len(clients.answers) if clients else 0
    result = install.ops("service.sh", "restart")
    ended = time.monotonic()
    found: dict[str, Any] = {
        "ok": result.returncode == 0 and "handed over" in result.stderr,
        "calibration": install.calibration(),
        "restart_s": round(ended - started, 1),
        **handover_steps(install.ops_log()),
    }
    if clients is not None:
        time.sleep(2)
        found.update(answers_during(clients, first, started, ended))
    return found


def measure_respawn(install: Install, clients: Clients | None, timeout_s: float) -> dict[str, Any]:
    master = install.master()
    first = len(clients.answers) if clients else 0
    started = time.monotonic()
    os.kill(install.worker(), signal.SIGKILL)
    time.sleep(0.5)
    while not install.ready() and time.monotonic() - started < timeout_s and Path(f"/proc/{master}").exists():
        time.sleep(0.2)
    ended = time.monotonic()
    alive = Path(f"/proc/{master}").exists()
    found: dict[str, Any] = {
        "ok": alive and install.ready() and install.master() == master,
        "respawn_to_ready_s": round(ended - started, 1),
        "calibration": install.calibration(),
        "same_master": alive and install.master() == master,
    }
    if clients is not None:
        time.sleep(2)
        found.update(answers_during(clients, first, started, ended))
    return found


def answers_during(clients: Clients, first: int, since: float, until: float) -> dict[str, Any]:
    answers = clients.answers[first:]
    failed = errors(answers)
    return {
        "answers": len(answers),
        "errors": len(failed),
        "refused_503": sum(error.startswith("503 ") for error in failed),
        "first_errors": [error for error in failed if not error.startswith("503 ")][:3],
        **{f"longest_gap_{kind}_s": round(clients.longest_gap(kind, since, until), 1) for kind in KINDS},
    }


def run(model: str, work: Path, clients: int, settings: dict[str, str], source: Path = ROOT) -> dict[str, Any]:
    install = Install(work / "embedding-service", free_port(), {"EMBEDDING_MODEL": model, **settings}, source)
    report: dict[str, Any] = {"model": model, "machine": platform.processor() or platform.machine()}
    started = time.monotonic()
    report["start_ok"] = install.ops("service.sh", "start").returncode == 0
    report["quiet_start_s"] = round(time.monotonic() - started, 1)
    report["quiet_start_calibration"] = install.calibration()
    try:
        report["quiet_restart"] = measure_restart(install, None)
        report["quiet_respawn"] = measure_respawn(install, None, 600)
        with Clients(install.url, clients) as sending:
            sending.wait_answers(20)
            report["loaded_restart"] = measure_restart(install, sending)
            report["loaded_respawn"] = measure_respawn(install, sending, 600)
    finally:
        install.ops("service.sh", "stop")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default=BUNDLED_MODEL, help="EMBEDDING_MODEL (default: the bundled model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="VAR=VALUE", help="another setting")
    parser.add_argument("--source", type=Path, default=ROOT, help="the service's source tree (default: this one)")
    parser.add_argument("--out", type=Path, help="write startup.json here")
    args = parser.parse_args()
    model = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    settings = dict(item.split("=", 1) for item in args.set)
    with tempfile.TemporaryDirectory(prefix="startup-") as work:
        report = run(model, Path(work), args.clients, settings, args.source.resolve())
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "startup.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
