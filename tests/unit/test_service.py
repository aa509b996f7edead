"""The service's life: building it starts and changes nothing, importing what gunicorn serves starts nothing,
and a started service stops every thread it started."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.config import Settings
from app.memory import HeapActions
from app.service import Service
from loadtest.service import BUNDLED_MODEL
from tests.doubles import FakeBackend, serving

SETTINGS = Settings(model="fake")


class HeapLog:
    """The heap actions a service takes, recorded by name."""

    def __init__(self) -> None:
        self.done: list[str] = []

    def actions(self) -> HeapActions:
        def record(name: str, result: object) -> object:
            return lambda *args: self.done.append(name) or result

        return HeapActions(
            collect=record("collect", 0),  # type: ignore[arg-type]
            collect_once=record("collect_once", 0),  # type: ignore[arg-type]
            freeze=record("freeze", None),  # type: ignore[arg-type]
            release=record("release", True),  # type: ignore[arg-type]
            limit_arenas=record("limit_arenas", False),  # type: ignore[arg-type]
        )


def threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def test_building_a_service_starts_nothing_and_touches_nothing(tmp_path: Path) -> None:
    heap, before, frozen = HeapLog(), threads(), gc.get_freeze_count()
    service = Service(SETTINGS.replace(state_dir=str(tmp_path)), backend=FakeBackend(), heap=heap.actions())
    assert service.app.test_client().get("/live").status_code == 200  # routes answer, nothing runs
    assert threads() == before
    assert heap.done == [] and gc.get_freeze_count() == frozen
    assert list(tmp_path.iterdir()) == []  # no run marker
    service.stop()  # a service never started stops at once


def test_a_started_service_acts_in_order_and_leaves_no_thread_behind(tmp_path: Path) -> None:
    heap, before = HeapLog(), threads()
    with Service(SETTINGS.replace(state_dir=str(tmp_path)), backend=FakeBackend(), heap=heap.actions()) as service:
        deadline = time.monotonic() + 5
        while not service.engine.ready:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        client = service.app.test_client()
        assert client.post("/embed", json={"inputs": ["a", "b"]}).status_code == 200
        started = threads() - before
        assert sorted(t.name for t in started) == ["inference", "memory-monitor"]
        assert (tmp_path / "run.json").exists()
    # The arena cap before any thread, the model's objects frozen once loaded, the load's garbage given back.
    assert heap.done[:4] == ["limit_arenas", "collect", "freeze", "release"]
    assert threads() == before
    assert not (tmp_path / "run.json").exists()  # a clean exit recorded
    with pytest.raises(RuntimeError, match="a service starts once"):
        service.start()


def test_the_tests_own_services_leave_no_thread_behind() -> None:
    before = threads()
    with serving(SETTINGS) as app:
        assert app.test_client().post("/embed", json={"inputs": "x"}).status_code == 200
        assert threads() > before
    assert threads() == before


def test_importing_what_gunicorn_serves_starts_nothing(tmp_path: Path) -> None:
    """``app.asgi`` reads the settings and builds the service: no thread, no model loaded, no file written until
    gunicorn's worker runs the ASGI lifespan."""
    probe = (
        "import threading, app.asgi as served; "
        "print(threading.active_count(), served.service.engine.info is None, served.service.engine.ready)"
    )
    env = {
        **os.environ,
        "EMBEDDING_MODEL": BUNDLED_MODEL,
        "EMBEDDING_STATE_DIR": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, "-c", probe]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "True", "False"]
    assert list(tmp_path.iterdir()) == []
