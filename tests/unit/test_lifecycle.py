"""A run that ends without a clean shutdown is counted at the next start; a clean one is not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from app import lifecycle
from app.lifecycle import RunRecord


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(child.stdout)


def crashed_run(state: Path, pid: int) -> None:
    """What a run killed by the OOM killer leaves: its marker."""
    state.mkdir(parents=True, exist_ok=True)
    (state / "run.json").write_text(json.dumps({"run_id": "killed", "pid": pid, "started_at": 1.0}))


def test_a_first_run_and_a_clean_restart_count_nothing(tmp_path: Path) -> None:
    first = RunRecord(tmp_path / "state")
    assert first.begin() == lifecycle.Start(0, None)
    first.end()
    assert not (tmp_path / "state" / "run.json").exists()
    assert RunRecord(tmp_path / "state").begin() == lifecycle.Start(0, None)


def test_a_killed_run_is_counted_once_and_the_count_carries_on(tmp_path: Path) -> None:
    state = tmp_path / "state"
    crashed_run(state, dead_pid())
    start = RunRecord(state).begin()
    assert start.unclean_exits == 1
    assert start.previous is not None and start.previous["run_id"] == "killed"
    crashed_run(state, dead_pid())  # killed again
    assert RunRecord(state).begin().unclean_exits == 2
    clean = RunRecord(state)
    (state / "run.json").unlink()  # the last one stopped cleanly
    assert clean.begin() == lifecycle.Start(2, None)  # the count stays; nothing new


def test_a_restarted_container_reuses_pids_and_is_still_counted(tmp_path: Path) -> None:
    crashed_run(tmp_path, os.getpid())  # the previous run had the pid this one has now
    assert RunRecord(tmp_path).begin().unclean_exits == 1


def test_a_live_process_sharing_the_directory_is_not_a_previous_run(tmp_path: Path) -> None:
    crashed_run(tmp_path, os.getppid())
    assert RunRecord(tmp_path).begin() == lifecycle.Start(0, None)
    second_app = RunRecord(tmp_path)  # a second app in this process (the tests make many)
    assert second_app.begin() == lifecycle.Start(0, None)


def test_a_directory_that_cannot_be_written_never_stops_the_start(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    record = RunRecord(blocked / "state")
    assert record.begin() == lifecycle.Start(0, None)
    record.end()  # nothing to remove, no error
