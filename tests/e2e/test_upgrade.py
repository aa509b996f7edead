"""ops/service.sh, ops/upgrade.sh and ops/rollback.sh on a real install, with real services on loopback.

Versions 1.0.0, 1.1.0 and 1.2.0 of the service are built from this tree. Each test starts from an install
of the first layout (venv/ and service.env at the top), which the first start adopts as versions/NAME and
current. The venv is a hard-linked copy of the test environment, so no dependency is downloaded, and
upgrades pass ``--no-deps`` through EMBEDDING_PIP_ARGS for speed.

An upgrade is killed with SIGKILL to its whole process group at each of its steps; after each kill the
service must serve, a restart must bring up a working version, and the next upgrade must succeed with no
repair by hand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from loadtest.clients import Clients, errors
from loadtest.service import free_port
from loadtest.startup import own_shebangs

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
OLD, NEW, NEWER = "1.0.0", "1.1.0", "1.2.0"
LONG_TEXTS = [f"Passage {i}: " + "an indexing pipeline sends long documents to the service. " * 20 for i in range(48)]

pytestmark = pytest.mark.slow


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


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sources")
    return {version: build_source(base, version) for version in (OLD, NEW, NEWER)}


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


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Path:
    """An install of the first layout adopted as versions/NAME by a stop (which starts nothing)."""
    inst = first_layout(tmp_path_factory.mktemp("template") / "embedding-service", 0, sources)
    adopted = inst.ops("service.sh", "stop")
    assert adopted.returncode == 0, adopted.stderr
    assert "adopting the install" in adopted.stderr
    return inst.home


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


@pytest.fixture
def install(tmp_path: Path, template: Path, sources: dict[str, Path]) -> Iterator[Install]:
    """Version 1.0.0, started."""
    inst = started_install(tmp_path / "embedding-service", template, sources)
    yield inst
    wait_until(inst.unlocked, 300, "the ops lock")  # a detached switch may still be finishing
    inst.ops("service.sh", "stop")


@pytest.fixture
def slow_install(tmp_path: Path, template: Path, sources: dict[str, Path]) -> Iterator[Install]:
    """Version 1.0.0, started as usual; then every start of a version it hands over to (an upgrade's, a rollback's, a
    restart's, a respawned worker's) loads a model that takes longer than 30 s: the first start waits for nothing
    the test checks."""
    inst = started_install(tmp_path / "embedding-service", template, sources)
    (inst.current() / "service.env").write_text(inst.config(**SLOW_START).read_text())  # a copy, not a hard link
    yield inst
    wait_until(inst.unlocked, 300, "the ops lock")
    inst.ops("service.sh", "stop")


def test_start_adopts_the_first_layout_status_reports_version_and_readiness_and_a_restart_without_room_warns(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    install = first_layout(tmp_path / "embedding-service", free_port(), sources)
    try:
        started = install.ops("service.sh", "start")
        assert started.returncode == 0, started.stderr
        assert not (install.home / "venv").exists()  # adopted, and nothing runs from it any more
        assert install.current().parent == install.home / "versions"
        assert install.current().name.endswith(f"-{OLD}")
        assert (install.current() / "service.env").read_text() == install.config().read_text()
        assert install.versions() == [[install.current().name, f"version {OLD}", "good current running"]]
        status = install.ops("service.sh", "status")
        assert status.returncode == 0
        assert f"version {OLD}" in status.stdout
        assert "ready" in status.stdout

        # Without memory for a second process, a restart has a gap (with a warning) or, with --no-gap, is refused
        # and nothing stops.
        masters = gunicorn_masters(install.home)
        no_room = {"HANDOVER_RESERVE_BYTES": str(1 << 50)}
        refused = install.ops("service.sh", "restart", "--no-gap", **no_room)
        assert refused.returncode == 3, refused.stderr
        assert "no room for a second process: it needs about" in refused.stderr
        assert gunicorn_masters(install.home) == masters and install.embeds()
        restarted = install.ops("service.sh", "restart", **no_room)
        assert restarted.returncode == 0, restarted.stderr
        assert "warning: clients will be refused while the service restarts: no room" in restarted.stderr
        assert gunicorn_masters(install.home) != masters and install.embeds()
    finally:
        assert install.ops("service.sh", "stop").returncode == 0
    stopped = install.ops("service.sh", "status")
    assert stopped.returncode == 3
    assert f"stopped (installed version {OLD}, current versions/{install.current().name})" in stopped.stdout


def test_an_idle_upgrade_builds_beside_the_running_version_and_a_second_one_waits_or_refuses(
    install: Install,
) -> None:
    old = install.current()
    before = fingerprint(old)
    first = install.start_ops("upgrade.sh", "--source", str(install.sources[NEW]))
    wait_until(lambda: "hard links" in install.log(), 60, "the first upgrade to start building")
    refused = install.ops("upgrade.sh", "--source", str(install.sources[NEWER]))
    assert refused.returncode == 5
    assert f"pid {first.pid}: upgrade.sh --source {install.sources[NEW]}" in refused.stderr
    assert install.ops("rollback.sh", "--list").returncode == 0  # reading is never locked out
    assert install.ops("rollback.sh").returncode == 5
    assert install.ops("service.sh", "restart").returncode == 5
    waiting = install.start_ops("rollback.sh", LOCK_WAIT_S="600")
    assert first.wait(300) == 0

    assert fingerprint(old) == before  # the version that ran was never modified
    new = next(p for p in (install.home / "versions").iterdir() if p.name.endswith(f"-{NEW}"))
    assert f"plateau-embeddings @ file://{install.sources[NEW]}" in (new / "requirements.txt").read_text()
    assert not (install.sources[NEW] / "build").exists()  # built from a snapshot: a killed build leaves no debris
    assert (new / "service.env").read_text() == (old / "service.env").read_text()
    shebangs = [p.read_text().splitlines()[0] for p in (new / "venv" / "bin").iterdir() if p.name.startswith("pip")]
    assert shebangs and all(line.startswith(f"#!{new}/venv/bin/python") for line in shebangs)
    steps = install.log()
    steps_expected = ("not checking for activity", "hard links", "installing from", "imports", "handed over")
    for step in (*steps_expected, "stopping pid"):
        assert step in steps
    assert f"upgraded from versions/{old.name} to versions/{new.name}" in steps
    assert not list((install.home / "versions").glob(".building-*"))

    assert waiting.wait(300) == 0  # the rollback waited for the lock, then went back to 1.0.0
    assert install.version() == OLD and install.current() == old
    assert install.embeds()
    assert install.versions() == [
        [new.name, f"version {NEW}", "good"],
        [old.name, f"version {OLD}", "good current running"],
    ]


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


def test_an_upgrade_a_rollback_and_a_restart_under_load_refuse_no_client(slow_install: Install) -> None:
    """16 clients send through an upgrade, a rollback and a restart of versions whose model takes longer to load
    than the 30 s gunicorn's lifespan allows: the new version takes the running one's socket once its model is
    ready, so no connection is refused and every answer is a 200 with its vectors. A worker killed after a
    handover (as the OOM killer would) is started again by the same master and serves: while it loads, clients
    get 503 with Retry-After."""
    install = slow_install
    with Clients(install.url) as clients:
        clients.wait_answers(20)
        asked = install.ops("upgrade.sh", "--active-minutes", "5", "--source", str(install.sources[NEW]))
        assert asked.returncode == 3  # the activity check, where an operator asks for it
        assert "the service is in use" in asked.stderr and "--force" in asked.stderr
        assert install.version() == OLD and len(install.versions()) == 1

        old = install.current()
        steps = {
            "upgrade": lambda: install.ops("upgrade.sh", "--source", str(install.sources[NEW])),
            "rollback": lambda: install.ops("rollback.sh"),
            "restart": lambda: install.ops("service.sh", "restart"),
        }
        for step, run in steps.items():
            masters = gunicorn_masters(install.home)
            with MemorySampler(install.home) as memory:
                result, answers = clients.during(run)
            assert result.returncode == 0, result.stderr
            assert "handed over" in result.stderr, result.stderr
            assert "refused while the service restarts" not in result.stderr
            assert len(gunicorn_masters(install.home)) == 1 and gunicorn_masters(install.home) != masters
            failed = errors(answers)
            print(
                f"\n{step}: {len(answers)} answers, {len(failed)} errors; handover (start to old exit) "
                f"{handover_seconds(install.log()):.0f} s; peak RSS of the install {memory.peak / 1e6:.0f} MB"
            )
            assert answers and not failed, failed[:5]
        assert install.version() == OLD and install.current() == old
        service_log = (install.home / "logs" / "service.log").read_text()
        assert "Lifespan startup timed out" not in service_log and service_log.count('"worker.accepting"') == 3

        (master,) = gunicorn_masters(install.home)
        killed = worker_of(master)
        first = len(clients.answers)
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: worker_of(master) != killed, 30, "gunicorn to start another worker")
        wait_until(install.serving, 300, "the new worker to serve")
        clients.wait_answers(len(clients.answers) + 40)
        answers = clients.answers[first:]
        assert gunicorn_masters(install.home) == [master] and install.embeds()
        loading = [a for a in errors(answers) if a.startswith("503 ") and "model is loading" in a]
        print(f"\nworker killed: {len(answers)} answers, {len(loading)} 503 while its successor loaded")
        assert loading  # it answered at once, and said why
        # What the killed worker had accepted is lost (its connections reset); everything else is a 200 or a 503.
        lost = [a for a in errors(answers) if a not in loading]
        assert all("Connection" in a for a in lost) and len(lost) <= 16, lost[:5]
        assert answers[-20:] == [200] * 20
    assert len([line for line in install.log().splitlines() if "handed over" in line]) == 3


def test_a_broken_version_is_switched_back_and_rollback_never_goes_to_it(install: Install) -> None:
    old = install.current()
    good_config = (old / "service.env").read_text()
    result = install.ops(
        "upgrade.sh",
        "--source",
        str(install.sources[NEWER]),
        "--config",
        str(install.config(EMBEDDING_MODEL="/nonexistent/model")),
    )
    assert result.returncode == 1, result.stderr
    assert "did not become ready" in result.stderr
    assert f"switched back, versions/{old.name} serves again" in result.stderr
    assert "does not exist" in (install.home / "logs" / "service.log").read_text()
    assert install.version() == OLD
    assert install.embeds()
    assert install.current() == old
    assert (install.home / "current" / "service.env").read_text() == good_config
    (broken, _, health), (kept, _, kept_health) = install.versions()
    assert broken.endswith(f"-{NEWER}") and health == "failed"
    assert kept == old.name and kept_health == "good current running"
    nothing_older = install.ops("rollback.sh")
    assert nothing_older.returncode == 2
    assert f"no good version older than {old.name}" in nothing_older.stderr

    # The new version asks clients for an API key: the scripts check it with the key of its settings.
    keyed = install.config(EMBEDDING_API_KEY="upgrade-test-key")
    upgraded = install.ops("upgrade.sh", "--source", str(install.sources[NEW]), "--config", str(keyed))
    assert upgraded.returncode == 0, upgraded.stderr
    new = install.current()
    assert requests.post(f"{install.url}/embed", json={"inputs": "x"}, timeout=60).status_code == 401
    key = {"Authorization": "Bearer upgrade-test-key"}
    assert requests.post(f"{install.url}/embed", json={"inputs": "x"}, headers=key, timeout=60).status_code == 200
    result = install.ops("rollback.sh")  # past the failed 1.2.0 build, to the 1.0.0 that served
    assert result.returncode == 0, result.stderr
    assert install.version() == OLD and install.current() == old
    assert install.embeds()
    assert [health for *_, health in install.versions()] == ["good", "failed", "good current running"]
    undo = install.ops("rollback.sh", new.name)  # a rollback is undone by naming what it left
    assert undo.returncode == 0, undo.stderr
    assert install.version() == NEW
    assert install.ops("rollback.sh", "no-such-version").returncode == 2
    assert install.ops("rollback.sh", new.name).returncode == 2  # already current


def test_a_failed_copy_install_or_switch_stops_the_upgrade_and_leaves_the_running_version_untouched(
    install: Install, tmp_path: Path
) -> None:
    """Each step failing in turn. A full disk at the copy and at the switch comes from a stand-in for `cp` and
    `ln` that fails on those arguments and passes others on (root ignores permissions); pip fails for real."""
    old = install.current()
    before = fingerprint(old)
    path = os.environ["PATH"]
    full_disk = {}
    for tool, fails_on in (("cp", "-al"), ("ln", "current.new")):
        shim = tmp_path / f"full-disk-{tool}" / tool
        shim.parent.mkdir()
        shim.write_text(
            f'#!/bin/sh\ncase "$*" in *{fails_on}*) echo "{tool}: No space left on device" >&2; exit 1 ;; esac\n'
            f'exec {shutil.which(tool)} "$@"\n'
        )
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
        full_disk[tool] = f"{shim.parent}:{path}"
    broken = build_source(tmp_path, "9.9.9")
    (broken / "pyproject.toml").write_text("[project]\nname = 'plateau-embeddings'\nversion = \n")
    attempts = [
        ("the copy failed", install.sources[NEW], full_disk["cp"]),
        ("pip failed", broken, path),
        ("could not switch", install.sources[NEW], full_disk["ln"]),
    ]
    for message, source, search_path in attempts:
        result = install.ops("upgrade.sh", "--force", "--source", str(source), PATH=search_path)  # we embed
        assert result.returncode == 1, result.stderr
        assert message in result.stderr
        assert search_path == path or "No space left on device" in result.stderr
        assert install.current() == old and fingerprint(old) == before
        assert install.version() == OLD and install.embeds()
        assert not list((install.home / "versions").glob(".building-*"))
    assert "stopping pid" not in install.log()  # never restarted


def test_a_wheel_is_installed_only_from_where_the_command_says_and_with_its_hash(
    install: Install, tmp_path: Path
) -> None:
    """The package index holds someone else's ``embedding-service``; a same-named package can sit on any index a
    machine's pip is configured with. Here a second index (PIP_FIND_LINKS, as a pip.conf would give it) holds a
    stranger's ``plateau-embeddings`` of the very version asked for: the upgrade takes the operator's wheel and
    never the stranger's, and refuses a wheel whose hash is not the one given."""
    ours, digest = build_wheel(install.sources[NEW], tmp_path / "ours")
    elsewhere = tmp_path / "elsewhere"
    strangers_wheel(elsewhere, NEW)
    strangers_wheel(elsewhere, "9.9.9")
    configured = {"PIP_FIND_LINKS": str(elsewhere), "PIP_INDEX_URL": elsewhere.as_uri()}
    old = install.current()

    usage = install.ops("upgrade.sh", "--version", NEW, "--sha256", digest, **configured)
    assert usage.returncode == 2 and "--find-links DIR or --index-url URL" in usage.stderr
    assert install.ops("upgrade.sh", "--wheel", str(ours), **configured).returncode == 2  # no hash, no install
    for args, message in (
        (["--version", "9.9.9", "--find-links", str(ours.parent), "--sha256", digest], "cannot download"),
        (["--wheel", str(ours), "--sha256", "0" * 64], f"has SHA-256 {digest}, not the {'0' * 64} given"),
        (["--wheel", str(elsewhere / f"plateau_embeddings-{NEW}-py3-none-any.whl"), "--sha256", digest], "not the"),
    ):
        refused = install.ops("upgrade.sh", *args, **configured)
        assert refused.returncode == 1, refused.stderr
        assert message in refused.stderr
        assert install.current() == old and install.version() == OLD
    assert "stopping pid" not in install.log()  # nothing was ever switched

    upgraded = install.ops(
        "upgrade.sh", "--version", NEW, "--find-links", str(ours.parent), "--sha256", digest, **configured
    )
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"installing {ours.name} (SHA-256 verified)" in upgraded.stderr
    assert install.version() == NEW and install.embeds()  # the stranger's app would not even import


def test_a_version_of_the_old_distribution_name_upgrades_to_the_new_one(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    """Installs from before the service had a distribution name of its own carry ``embedding-service``: the
    upgrade removes it from the new version's copy (both would own ``app/``) and the old version keeps its own."""
    legacy = build_source(tmp_path / "legacy", OLD)
    pyproject = legacy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('name = "plateau-embeddings"', 'name = "embedding-service"', 1))
    version_py = legacy / "app" / "version.py"  # its code knew itself by that name too
    version_py.write_text(
        version_py.read_text().replace('DISTRIBUTION = "plateau-embeddings"', 'DISTRIBUTION = "embedding-service"')
    )
    install = first_layout(tmp_path / "embedding-service", free_port(), {**sources, OLD: legacy})
    try:
        assert install.ops("service.sh", "start").returncode == 0
        assert install.versions()[0][1] == f"version {OLD}"  # read from the old name
        old = install.current()
        upgraded = install.ops("upgrade.sh", "--source", str(sources[NEW]))
        assert upgraded.returncode == 0, upgraded.stderr
        assert install.version() == NEW and install.embeds()
        new = install.current()
        names = [p.name.split("-")[0] for p in (new / "venv").glob("lib/python*/site-packages/*.dist-info")]
        assert "plateau_embeddings" in names and "embedding_service" not in names
        assert list(old.glob("venv/lib/python*/site-packages/embedding_service-*.dist-info"))  # untouched
        assert install.ops("rollback.sh").returncode == 0  # back to the old name's version, which still starts
        assert install.version() == OLD and install.embeds()
    finally:
        install.ops("service.sh", "stop")


KILL_POINTS = {
    # name: (when to kill, the version that serves afterwards)
    "during-the-copy": (lambda inst, up: any(p.startswith("cp -al") for p in session_processes(up.pid)), OLD),
    "during-pip": (lambda inst, up: any(" -m pip install" in p for p in session_processes(up.pid)), OLD),
    "between-install-and-switch": (lambda inst, up: "checking that the new version imports" in inst.log(), OLD),
    "during-the-handover": (lambda inst, up: "beside pid" in inst.log(), NEW),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_an_upgrade_killed_at_any_step_leaves_a_service_that_serves_and_starts(install: Install, point: str) -> None:
    when, serves = KILL_POINTS[point]
    old = install.current()
    before = fingerprint(old)
    upgrade = install.start_ops("upgrade.sh", "--source", str(install.sources[NEW]))
    wait_until(lambda: when(install, upgrade), 120, f"the upgrade to reach {point}")
    if point == "during-pip":
        time.sleep(1.0)  # into pip's work, where the first upgrade script left a half-moved venv
    os.killpg(upgrade.pid, signal.SIGKILL)
    assert upgrade.wait(10) == -signal.SIGKILL

    wait_until(install.unlocked, 300, "the lock to be free")  # a restart already under way finishes first
    wait_until(install.serving, 300, "the service to serve")
    assert install.version() == serves and install.embeds()
    assert len(gunicorn_masters(install.home)) == 1
    assert fingerprint(old) == before
    assert (install.current() / "venv" / "bin" / "python").exists()

    restarted = install.ops("service.sh", "restart")
    assert restarted.returncode == 0, restarted.stderr
    assert install.version() == serves and install.embeds()
    if serves == OLD:
        assert "an unfinished version left by an interrupted run" in install.log()
    assert not list((install.home / "versions").glob(".building-*"))

    again = install.ops("upgrade.sh", "--force", "--source", str(install.sources[NEWER]))
    assert again.returncode == 0, again.stderr
    assert install.version() == NEWER and install.embeds()


def test_a_switch_killed_while_the_new_version_starts_is_finished_by_the_next_command(install: Install) -> None:
    """The detached switch itself dies (power loss, OOM killer) after starting the new version."""
    upgrade = install.start_ops("upgrade.sh", "--source", str(install.sources[NEW]))
    wait_until(lambda: f"started version {NEW}" in install.log(), 300, "the new version to start")
    holder = (install.home / "run" / "ops.lock").read_text().split()
    switch_pid = int(holder[1].rstrip(":"))
    os.killpg(upgrade.pid, signal.SIGKILL)
    os.killpg(switch_pid, signal.SIGKILL)
    upgrade.wait(10)
    wait_until(install.unlocked, 30, "the lock to be free")
    assert (install.home / "run" / "switch").exists()
    assert install.current().name.endswith(f"-{NEW}")
    # The old version still serves; the new one, started beside it, is left running on its own.
    assert [health for *_, health in install.versions()] == ["unchecked current", "good running"]
    assert len(gunicorn_masters(install.home)) == 2
    assert install.embeds()

    restarted = install.ops("service.sh", "restart")
    assert restarted.returncode == 0, restarted.stderr
    assert "an interrupted handover left pid" in restarted.stderr
    assert "interrupted switch to" in restarted.stderr
    assert install.version() == NEW and install.embeds()
    assert len(gunicorn_masters(install.home)) == 1
    assert [health for *_, health in install.versions()] == ["good current running", "good"]
    assert not (install.home / "run" / "switch").exists()
