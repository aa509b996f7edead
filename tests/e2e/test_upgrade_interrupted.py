"""An upgrade killed with SIGKILL to its whole process group at each of its steps, and a switch killed while the
new version starts: after each, the service serves, a restart brings up a working version, and the next upgrade
succeeds with no repair by hand."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.e2e.installs import NEW, NEWER, OLD, Install, fingerprint, gunicorn_masters, session_processes, wait_until

pytestmark = pytest.mark.slow


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
