"""ops/service.sh, ops/upgrade.sh and ops/rollback.sh on a real install, with real services on loopback: the first
layout adopted, an upgrade beside the running version, and an upgrade, a rollback and a restart under load whose
model loads slower than gunicorn's lifespan allows. What fails and what is interrupted: test_upgrade_failures.py and
test_upgrade_interrupted.py (installs.py builds the versions)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from loadtest.clients import Clients, errors
from loadtest.service import free_port
from tests.e2e.installs import (
    NEW,
    NEWER,
    OLD,
    Install,
    MemorySampler,
    fingerprint,
    first_layout,
    gunicorn_masters,
    handover_seconds,
    wait_until,
    worker_of,
)

pytestmark = pytest.mark.slow


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
