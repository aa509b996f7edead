"""Start, readiness, a killed worker, backpressure and shutdown of the real service: one process through its life,
one for each start that must be refused, one with a small queue."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from loadtest.service import ServiceProcess

pytestmark = pytest.mark.slow  # a service start (or a refused one) per test

TEXTS = [f"Sentence {i} of a document that is being indexed, with a few more words." for i in range(32)]


def test_one_life_health_at_once_ready_after_warm_up_a_killed_worker_counted_and_sigterm_finishing_queued_work(
    tmp_path: Path,
) -> None:
    """One process from start to SIGTERM. /health answers at once and /ready only after warm-up, and a misspelt
    setting (it changes nothing) is named at start with the setting it resembles. A worker killed as the OOM killer
    does is started again by gunicorn and counted as an unclean exit. SIGTERM finishes the work queued and exits 0,
    and the next start (after a clean stop, as an upgrade does) counts nothing new."""
    settings = {"EMBEDDING_STATE_DIR": str(tmp_path / "state")}
    service = ServiceProcess(tmp_path / "first.log", {**settings, "EMBEDDING_DTYPES": "bfloat16"}).start()
    try:
        seen = service.wait_ready()
        assert 503 in seen, "the service listens before the model is loaded, and says it is not ready"
        assert requests.get(f"{service.url}/health", timeout=5).status_code == 200
        loaded = service.events("model.loaded")[0]
        assert loaded["warm_up_s"] > 0  # it ran: a pass over a text of the model's whole length takes time
        (warning,) = service.events("config.unknown_variables")
        assert warning["variables"] == {"EMBEDDING_DTYPES": "EMBEDDING_DTYPE"}
        assert warning["level"] == "warning"

        assert service.metric("embedding_unclean_exits_total") == 0
        killed = service.worker_pid()
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while service.worker_pid() == killed:
            assert time.monotonic() < deadline, "gunicorn did not start another worker"
            time.sleep(0.2)
        service.wait_ready()
        assert service.metric("embedding_unclean_exits_total") == 1
        assert service.metric("embedding_previous_exit_unclean") == 1
        (event,) = service.events("service.previous_run_unclean")
        assert event["previous"]["pid"] == killed
        assert event["level"] == "warning"

        statuses, code = sigterm_with_work_queued(service)
        assert statuses == [200] * 16
        assert code == 0
        assert service.events("engine.stopped")
    finally:
        service.terminate()
    again = ServiceProcess(tmp_path / "second.log", settings).start()
    try:
        again.wait_ready()
        assert again.metric("embedding_unclean_exits_total") == 1  # the count carries on; nothing new
        assert again.metric("embedding_previous_exit_unclean") == 0
        assert not again.events("service.previous_run_unclean")
    finally:
        assert again.terminate() == 0


def sigterm_with_work_queued(service: ServiceProcess) -> tuple[list[int], int]:
    """SIGTERM once 16 requests of 32 texts have reached the service and some wait in its queue: their statuses
    and the exit code."""
    started = threading.Barrier(17)

    def index_batch(i: int) -> int:
        started.wait()
        response = requests.post(f"{service.url}/embed", json={"inputs": [f"{i}: {t}" for t in TEXTS]}, timeout=120)
        return response.status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(index_batch, i) for i in range(16)]
        started.wait()
        # SIGTERM only once every request has reached the service: a connection still in the
        # listen backlog when the worker stops accepting is reset, and that is not what this tests.
        deadline = time.monotonic() + 30
        while requests.get(f"{service.url}/activity", timeout=5).json()["requests"] < 16:
            assert time.monotonic() < deadline, "the 16 requests never reached the service"
            time.sleep(0.05)
        time.sleep(0.1)  # from the handler into the engine's queue
        assert (service.metric("embedding_queue_depth") or 0) > 0
        code = service.terminate()
        return [f.result() for f in futures], code


def test_a_bad_setting_stops_the_start_and_names_the_variable(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path / "log", {"EMBEDDING_BATCH_SIZE": "thirty-two"}).start()
    assert service.wait_exit(60) != 0
    assert "EMBEDDING_BATCH_SIZE='thirty-two': expected a whole number" in service.log_text()


def test_more_than_one_worker_stops_the_start_and_names_the_setting(tmp_path: Path) -> None:
    """As a deployment that sets ``GUNICORN_CMD_ARGS=--workers=4`` would: refused before anything binds."""
    service = ServiceProcess(tmp_path / "log", {"GUNICORN_CMD_ARGS": "--workers=4"}).start()
    assert service.wait_exit(60) == 2
    assert "gunicorn workers: expected 1, got 4" in service.log_text()
    assert "replicas" in service.log_text()
    assert not service.events("model.loaded")


def test_a_model_that_cannot_be_loaded_stops_the_start(tmp_path: Path) -> None:
    not_a_model = tmp_path / "empty-model-dir"
    not_a_model.mkdir()
    service = ServiceProcess(tmp_path / "log", {"EMBEDDING_MODEL": str(not_a_model)}).start()
    assert service.wait_exit(120) != 0
    failed = service.events("model.load_failed")
    assert failed and "cannot load model" in failed[0]["error"]
    assert "cannot start" in service.log_text()


def test_a_missing_model_directory_is_named(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path / "log", {"EMBEDDING_MODEL": str(tmp_path / "missing")}).start()
    assert service.wait_exit(120) != 0
    assert "does not exist" in service.events("model.load_failed")[0]["error"]


def test_a_full_queue_answers_429_with_retry_after_and_loses_no_accepted_work(tmp_path: Path) -> None:
    env = {"EMBEDDING_MAX_INPUTS": "32", "EMBEDDING_QUEUE_SIZE": "64"}
    service = ServiceProcess(tmp_path / "log", env).start()
    service.wait_ready()
    try:
        with ThreadPoolExecutor(max_workers=24) as pool:
            responses = list(
                pool.map(
                    lambda i: requests.post(f"{service.url}/embed", json={"inputs": TEXTS}, timeout=120), range(48)
                )
            )
        refused = [r for r in responses if r.status_code == 429]
        accepted = [r for r in responses if r.status_code == 200]
        assert refused, "48 concurrent 32-text requests must overflow a 64-text queue"
        assert len(refused) + len(accepted) == 48
        assert all(r.headers["Retry-After"] == "1" for r in refused)
        assert all(len(r.json()) == 32 for r in accepted)
        assert service.metric("embedding_rejected_total", reason="queue_full") == len(refused)
        assert requests.post(f"{service.url}/embed", json={"inputs": "after"}, timeout=30).status_code == 200
    finally:
        service.terminate()
