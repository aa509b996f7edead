"""A deliberate leak in the real service (tests/leaky.py keeps every batch's vectors): it shows as growth of
the allocator's live heap, not of its free-but-kept memory, and ``POST /debug/memory/snapshot`` names the
line that allocates it. The debug route is 404 unless enabled and 401 without the admin token."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from loadtest.corpus import build_corpus, sample
from loadtest.service import ServiceProcess, running_service
from tests.leaky import KEPT_BYTES_PER_TEXT

pytestmark = pytest.mark.slow  # the leaky app, loaded until its heap shows the leak

TOKEN = "let-me-in"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
LEAKY = Path(__file__).resolve().parents[1] / "leaky.py"
LEAK_SITE = "tests/leaky.py:{}".format(
    next(n for n, line in enumerate(LEAKY.read_text().splitlines(), 1) if line.rstrip().endswith("# the leak"))
)
MB = 1_000_000


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [d.text for d in sample(build_corpus(), 192, seed=11)]


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    env = {
        "EMBEDDING_DEBUG_ENDPOINTS": "true",
        "EMBEDDING_ADMIN_TOKEN": TOKEN,
        "EMBEDDING_MANUAL_CLEANUP_INTERVAL_S": "0",
    }
    log = tmp_path_factory.mktemp("leaky") / "service.log"
    with running_service(log, env, target="tests.leaky:build()") as service:
        yield service


def embed_all(service: ServiceProcess, texts: list[str], size: int = 32) -> int:
    """Four indexers sending ``size`` texts a request; the number of texts embedded."""
    batches = [texts[i : i + size] for i in range(0, len(texts), size)]

    def send(batch: list[str]) -> int:
        response = requests.post(f"{service.url}/embed", json={"inputs": batch}, timeout=120)
        assert response.status_code == 200, response.text
        return len(batch)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return sum(pool.map(send, batches))


def live_and_kept(service: ServiceProcess) -> tuple[int, int]:
    """After a cleanup (what the load freed goes back): the allocator's live bytes and its free-but-kept bytes."""
    assert requests.post(f"{service.url}/cleanup", headers=ADMIN, timeout=60).status_code == 200
    allocator = requests.get(f"{service.url}/memory", timeout=10).json()["breakdown"]["allocator"]
    accounts: dict[str, int] = allocator["accounts"]
    live = accounts["allocated"] if allocator["name"] == "jemalloc" else accounts["in_use"]
    return live, allocator["free_but_kept_bytes"]


def snapshot(service: ServiceProcess, seconds: int, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(
        f"{service.url}/debug/memory/snapshot",
        params={"seconds": seconds},
        headers=ADMIN if headers is None else headers,
        timeout=seconds + 60,
    )


def test_a_leak_grows_the_live_heap_not_the_free_but_kept_memory(leaky: ServiceProcess, texts: list[str]) -> None:
    embed_all(leaky, texts)  # warm: the allocator's caches and the torch buffers of every batch shape exist
    live_before, kept_before = live_and_kept(leaky)
    leaked = embed_all(leaky, texts) * KEPT_BYTES_PER_TEXT
    live_after, kept_after = live_and_kept(leaky)
    print(
        f"leaked {leaked / MB:.1f} MB: live {live_before / MB:.1f} -> {live_after / MB:.1f} MB, "
        f"free but kept {kept_before / MB:.1f} -> {kept_after / MB:.1f} MB"
    )
    assert live_after - live_before >= 0.9 * leaked
    assert kept_after - kept_before < 0.25 * leaked


def test_the_snapshot_names_the_line_that_leaks(leaky: ServiceProcess, texts: list[str]) -> None:
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            embed_all(leaky, texts[:128])

    loader = threading.Thread(target=load)
    loader.start()
    try:
        response = snapshot(leaky, seconds=5)
    finally:
        done.set()
        loader.join()
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    top = body["sites"][0]
    print(f"top site {top}, {len(body['sites'])} sites, traces took {body['tracemalloc_memory_bytes'] / MB:.1f} MB")
    assert LEAK_SITE in top["traceback"]
    assert top["size_bytes"] >= 32 * KEPT_BYTES_PER_TEXT  # at least one batch's worth grew in the window
    assert body["started_tracing"] is True
    assert 5 <= body["seconds"] < 10


def test_tracing_stops_after_a_snapshot_and_one_runs_at_a_time(leaky: ServiceProcess) -> None:
    answers: list[requests.Response] = []
    first = threading.Thread(target=lambda: answers.append(snapshot(leaky, seconds=3)))
    first.start()
    time.sleep(1)
    second = snapshot(leaky, seconds=1)
    first.join()
    assert second.status_code == 409, second.text
    assert "one at a time" in second.json()["error"]["message"]
    assert answers[0].status_code == 200
    # Tracing was stopped after the first: the next one starts it again.
    assert snapshot(leaky, seconds=1).json()["started_tracing"] is True


def test_the_snapshot_needs_the_admin_token(leaky: ServiceProcess) -> None:
    assert snapshot(leaky, seconds=1, headers={}).status_code == 401
    assert snapshot(leaky, seconds=1, headers={"Authorization": "Bearer wrong"}).status_code == 401
    bad = snapshot(leaky, seconds=0)
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "seconds"


def test_the_debug_route_is_404_unless_enabled(service: ServiceProcess) -> None:
    response = requests.post(f"{service.url}/debug/memory/snapshot", params={"seconds": 1}, headers=ADMIN, timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["type"]
    spec = requests.get(f"{service.url}/openapi.json", timeout=10).json()
    assert "/debug/memory/snapshot" not in spec["paths"]
