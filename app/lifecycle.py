"""Whether the service's previous run ended cleanly: a crash or an OOM kill is counted, even once.

A run writes a marker (``run.json``: a run id, its pid, when it started) into the state directory when it
starts and removes it when it stops cleanly (SIGTERM, gunicorn's graceful shutdown: an upgrade, a rollout,
``ops/service.sh stop``). A marker found at start is a run that ended without removing it: killed by the
kernel's OOM killer, SIGKILLed, crashed in native code. Those are counted in ``exits.json``, which the
service exports as ``embedding_unclean_exits_total`` from the count so far (the counter keeps rising
across restarts), and ``embedding_previous_exit_unclean`` is 1 for a run that found one: the alert
EmbeddingServiceExitedUncleanly reads it in the run's first 15 minutes, however the previous run's
series were scraped (an OOM kill during a load can come before any scrape saw the process grow).

The directory is ``EMBEDDING_STATE_DIR``, by default one per port under the temporary directory: on
Kubernetes ``/tmp`` is the pod's emptyDir, which outlives a container's restarts. Nothing here may stop the
service from starting: a directory that cannot be written is logged and the record is off.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

MARKER = "run.json"
EXITS = "exits.json"
_OWN_RUNS: set[str] = set()
"""Run ids this process wrote: a second app in one process (tests) is not a previous run."""


def default_state_dir(port: int) -> Path:
    """Where a service on ``port`` keeps its state when EMBEDDING_STATE_DIR is not set."""
    return Path(tempfile.gettempdir()) / f"embedding-service-{port}"


@dataclass(frozen=True)
class Start:
    """What :meth:`RunRecord.begin` found."""

    unclean_exits: int
    """Unclean exits counted in this directory so far, the previous run's included."""
    previous: dict[str, Any] | None
    """The marker of a previous run that did not end cleanly, or None."""


class RunRecord:
    """The marker of this run and the count of unclean exits in one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.run_id = uuid.uuid4().hex
        self._active = False

    def begin(self) -> Start:
        """Count the previous run if it ended uncleanly, then mark this one as running."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            previous = self._read(MARKER)
            count = int((self._read(EXITS) or {}).get("unclean", 0))
            if previous is not None and not self._is_ours_or_alive(previous):
                count += 1
                self._write(EXITS, {"unclean": count, "last": {**previous, "found_at": time.time()}})
            else:
                previous = None
            self._write(MARKER, {"run_id": self.run_id, "pid": os.getpid(), "started_at": time.time()})
        except OSError as exc:
            log.warning("lifecycle.state_unavailable", state_dir=str(self.dir), error=str(exc))
            return Start(0, None)
        _OWN_RUNS.add(self.run_id)
        self._active = True
        return Start(count, previous)

    def end(self) -> None:
        """This run stops cleanly: remove its marker (only its own)."""
        if not self._active:
            return
        self._active = False
        try:
            marker = self._read(MARKER)
            if marker is not None and marker.get("run_id") == self.run_id:
                (self.dir / MARKER).unlink()
        except OSError as exc:
            log.warning("lifecycle.state_unavailable", state_dir=str(self.dir), error=str(exc))

    @staticmethod
    def _is_ours_or_alive(marker: dict[str, Any]) -> bool:
        """A marker of this process, or of another live process sharing the directory, is not a previous run.
        One with this process's pid but another run id is: in a restarted container, pids repeat."""
        if marker.get("run_id") in _OWN_RUNS:
            return True
        pid = marker.get("pid")
        if not isinstance(pid, int) or pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # alive, another user's
        return True

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            value = json.loads((self.dir / name).read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # torn or foreign: a marker all the same
        return value if isinstance(value, dict) else {}

    def _write(self, name: str, value: dict[str, Any]) -> None:
        partial = self.dir / f".{name}.{os.getpid()}"
        partial.write_text(json.dumps(value))
        partial.replace(self.dir / name)
