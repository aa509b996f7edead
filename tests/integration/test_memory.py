"""The memory manager in the real service: cleanup gives memory back, triggers fire, load is shed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from loadtest.corpus import build_corpus, sample
from loadtest.service import ServiceProcess, running_service
from tests.integration.conftest import held_linear_parameters

pytestmark = pytest.mark.slow  # services of their own, and memory that takes seconds to settle

MB = 1_000_000


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return [d.text for d in sample(build_corpus(), 640, seed=7)]


@pytest.fixture(scope="module")
def unmanaged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """No automatic cleanup and no per-batch trim, so the heap keeps what the load left; admin token set, and
    manual cleanups as often as the tests ask."""
    env = {
        "EMBEDDING_MEMORY_POLICY": "off",
        "EMBEDDING_ADMIN_TOKEN": "let-me-in",
        "EMBEDDING_MANUAL_CLEANUP_INTERVAL_S": "0",
    }
    with running_service(tmp_path_factory.mktemp("unmanaged") / "service.log", env) as service:
        yield service


def index(service: ServiceProcess, documents: list[str], requests_: int = 40, size: int = 16) -> None:
    """Concurrent indexers sending mixed-length batches."""

    def send(i: int) -> int:
        batch = documents[(i * size) % len(documents) :][:size]
        return requests.post(f"{service.url}/embed", json={"inputs": batch}, timeout=120).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(send, range(requests_))) == {200}


def wait_until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    assert eventually(condition, timeout_s), "condition not met in time"


def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def admin(token: str = "let-me-in") -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_manual_cleanup_gives_memory_back_to_the_operating_system(
    unmanaged: ServiceProcess, documents: list[str]
) -> None:
    """Order-free within the module: what this cleanup adds is compared, not totals another test's cleanups
    would change."""
    cleanups_before = unmanaged.metric("embedding_cleanups_total", reason="manual") or 0
    freed_before = unmanaged.metric("embedding_cleanup_freed_bytes_sum") or 0
    durations_before = unmanaged.metric("embedding_cleanup_duration_seconds_count") or 0
    listed_before = requests.get(f"{unmanaged.url}/memory", timeout=10).json()["cleanups"].get("manual", 0)
    index(unmanaged, documents)
    response = requests.post(f"{unmanaged.url}/cleanup", headers=admin(), timeout=60)
    assert response.status_code == 200
    record = response.json()
    assert record["reason"] == "manual"
    assert record["freed_bytes"] > 0
    assert record["rss_after_bytes"] < record["rss_before_bytes"]
    assert record["trimmed"] is True
    assert record["effective"] is True
    print(f"\ncleanup: {record['rss_before_bytes'] / MB:.0f} MB -> {record['rss_after_bytes'] / MB:.0f} MB")

    logged = unmanaged.events("memory.cleanup")[-1]
    assert logged["reason"] == "manual"
    assert {"rss_before_bytes", "rss_after_bytes", "freed_bytes", "freed_objects", "duration_s"} <= set(logged)
    assert unmanaged.metric("embedding_cleanups_total", reason="manual") == cleanups_before + 1
    assert unmanaged.metric("embedding_cleanup_freed_bytes_sum") == freed_before + record["freed_bytes"]
    assert unmanaged.metric("embedding_cleanup_duration_seconds_count") == durations_before + 1
    assert (unmanaged.metric("embedding_last_cleanup_timestamp_seconds") or 0) > time.time() - 60

    memory = requests.get(f"{unmanaged.url}/memory", timeout=10).json()
    assert memory["status"] == "normal"
    assert memory["policy"] == "off"
    assert memory["cleanups"] == {"manual": listed_before + 1}  # the policy off runs no other cleanup
    assert memory["last_cleanup"] == record
    assert memory["uss_bytes"] > 0
    assert memory["thresholds"]["high_bytes"] == 2_500_000_000
    assert memory["requests_since_cleanup"] == 0


def test_cleanup_needs_the_admin_token_when_one_is_set(unmanaged: ServiceProcess) -> None:
    missing = requests.post(f"{unmanaged.url}/cleanup", timeout=30)
    wrong = requests.post(f"{unmanaged.url}/cleanup", headers=admin("guess"), timeout=30)
    assert missing.status_code == wrong.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert "admin token" in missing.json()["error"]["message"]
    assert requests.post(f"{unmanaged.url}/cleanup", headers=admin(), timeout=30).status_code == 200


def test_batches_report_their_memory_delta(unmanaged: ServiceProcess, documents: list[str]) -> None:
    index(unmanaged, documents, requests_=4)
    assert (unmanaged.metric("embedding_batch_memory_delta_bytes_count") or 0) >= 4
    assert unmanaged.metric("embedding_batch_memory_delta_bytes_bucket", le="+Inf") is not None
    assert unmanaged.metric("embedding_memory_rss_bytes") == pytest.approx(
        unmanaged.metric("process_resident_memory_bytes"), rel=0.1
    )


def test_the_whole_model_is_in_memory_once_the_service_is_ready(service: ServiceProcess, model_dir: Path) -> None:
    # The checkpoint is memory-mapped; untouched, its token-embedding rows would page in one by one
    # under load and the RSS would creep up for minutes after /ready.
    assert service.proc is not None
    worker = psutil.Process(service.proc.pid).children()[0]
    weights = (model_dir / "model.safetensors").resolve()
    resident = sum(m.rss for m in worker.memory_maps(grouped=True) if Path(m.path) == weights)
    # At a reduced dtype the linear layers' weights are held in it and their float32 pages are dropped: every other
    # page, the token embeddings' among them, is in.
    assert resident >= 0.95 * (weights.stat().st_size - 4 * held_linear_parameters(service))


@pytest.mark.alone  # what the allocator keeps depends on when the threads of the last requests free
@pytest.mark.parametrize("allocator", ["jemalloc", "glibc"])
def test_the_service_runs_on_the_allocator_asked_for(tmp_path: Path, documents: list[str], allocator: str) -> None:
    # jemalloc (the default) is preloaded into gunicorn's master before it forks.
    env = {"EMBEDDING_ALLOCATOR": allocator, "EMBEDDING_TRIM_INTERVAL_S": "0"}
    with running_service(tmp_path / "service.log", env) as service:
        index(service, documents, requests_=8, size=8)
        memory = requests.get(f"{service.url}/memory", timeout=10).json()
        assert memory["allocator"] == allocator
        assert memory["triggers"]["trim_after_batch"] is True
        assert (service.metric("embedding_memory_trims_total") or 0) >= 1  # the trim asks this allocator
        assert service.events("memory.allocator")[0]["allocator"] == allocator
        # Its accounts add up: what it holds in RAM lies within the anonymous RSS.
        breakdown = memory["breakdown"]
        accounts, kept = breakdown["allocator"]["accounts"], breakdown["allocator"]["free_but_kept_bytes"]
        live = accounts["allocated"] if allocator == "jemalloc" else accounts["in_use"]
        print(f"\n{allocator}: {accounts}, free but kept {kept}")
        assert 100e6 < accounts["resident"] <= breakdown["rss_by_kind"]["anon"]
        assert kept == max(accounts["resident"] - live, 0)
        if allocator == "glibc":
            # With a trim after every batch, little of the heap is free once a batch has ended in quiet: right
            # after concurrent requests their threads have freed what they held after the last trim (2-75 MB
            # here), and a trim waits out 50 times its own length. After a single text a second later: 0-3 MB
            # kept, and 68-138 MB without the trims (mallinfo2 still counts the trimmed chunks free).
            def kept_after_a_quiet_batch() -> float:
                time.sleep(1)
                assert requests.post(f"{service.url}/embed", json={"inputs": "quiet"}, timeout=60).ok
                found = requests.get(f"{service.url}/memory", timeout=10).json()["breakdown"]["allocator"]
                return float(found["free_but_kept_bytes"])

            assert any(kept_after_a_quiet_batch() < 16e6 for _ in range(3))
        assert service.proc is not None
        worker = psutil.Process(service.proc.pid).children()[0]
        preloaded = any("libjemalloc" in m.path for m in worker.memory_maps(grouped=True))
        assert preloaded is (allocator == "jemalloc")


def test_periodic_and_request_count_triggers_fire(tmp_path: Path, documents: list[str]) -> None:
    env = {"EMBEDDING_CLEANUP_INTERVAL_S": "2", "EMBEDDING_CLEANUP_EVERY_REQUESTS": "5"}
    with running_service(tmp_path / "service.log", env) as service:
        wait_until(lambda: (service.metric("embedding_cleanups_total", reason="periodic") or 0) >= 1)
        # A periodic cleanup every 2 s may take some of a round's requests with it (they are then counted
        # toward the next one), so rounds of 5 are sent until the count fires: 4 rounds at most.
        for _ in range(4):
            index(service, documents, requests_=5, size=2)
            if eventually(lambda: (service.metric("embedding_cleanups_total", reason="request_count") or 0) >= 1):
                break
        else:
            pytest.fail("20 requests and no request_count cleanup")
        reasons = {e["reason"] for e in service.events("memory.cleanup")}
        assert {"periodic", "request_count"} <= reasons
        assert service.events("memory.gc_frozen")[0]["objects"] > 10_000


def test_high_memory_cleans_up_once_per_cooldown_not_on_every_request(tmp_path: Path, documents: list[str]) -> None:
    env = {
        "EMBEDDING_MEMORY_ELEVATED_BYTES": "100MB",
        "EMBEDDING_MEMORY_HIGH_BYTES": "200MB",  # below the loaded model: always "high"
        "EMBEDDING_MONITOR_INTERVAL_S": "0.2",
        "EMBEDDING_CLEANUP_COOLDOWN_S": "60",
    }
    with running_service(tmp_path / "service.log", env) as service:
        index(service, documents, requests_=30, size=4)
        time.sleep(1)
        assert requests.get(f"{service.url}/memory", timeout=10).json()["status"] == "high"
        assert service.metric("embedding_memory_status", status="high") == 1
        assert service.metric("embedding_cleanups_total", reason="threshold") == 1
        # Memory is still above the threshold: the cleanup could not fix it, and says so.
        assert service.metric("embedding_cleanups_ineffective_total", reason="threshold") == 1
        assert service.events("memory.cleanup")[0]["effective"] is False


def test_above_the_hard_limit_new_requests_get_503_and_the_service_stays_up(tmp_path: Path) -> None:
    """A limit below what the loaded model needs: the service loads, is alive, and is never ready."""
    env = {"EMBEDDING_MEMORY_LIMIT_BYTES": "100MB", "EMBEDDING_CLEANUP_COOLDOWN_S": "60"}
    service = ServiceProcess(tmp_path / "service.log", env).start()
    try:

        def readiness() -> str:
            try:
                return str(requests.get(f"{service.url}/ready", timeout=2).json()["status"])
            except requests.RequestException:
                return "not listening"

        wait_until(lambda: readiness() == "shedding", 120)
        ready = requests.get(f"{service.url}/ready", timeout=5)
        assert ready.status_code == 503
        assert ready.headers["Retry-After"] == "5"
        assert "above the service's limit" in ready.json()["error"]["message"]
        responses = [requests.post(f"{service.url}/embed", json={"inputs": "x"}, timeout=30) for _ in range(3)]
        assert [r.status_code for r in responses] == [503] * 3
        # Every route that does work is shed (POST /tokenize and /decode answered 200 here).
        work = {
            "/tokenize": {"inputs": "x"},
            "/decode": {"ids": [7592]},
            "/embed_all": {"inputs": "x"},
            "/similarity": {"inputs": {"source_sentence": "x", "sentences": ["y"]}},
            "/v1/embeddings": {"input": "x"},
        }
        shed = {route: requests.post(f"{service.url}{route}", json=body, timeout=30) for route, body in work.items()}
        assert {route: r.status_code for route, r in shed.items()} == dict.fromkeys(work, 503)
        assert all(r.headers["Retry-After"] == "5" for r in responses)
        assert responses[0].json()["error_type"] == "Unhealthy"  # text-embeddings-inference's body on /embed
        assert "above the service's limit" in responses[0].json()["error"]
        assert service.metric("embedding_rejected_total", reason="memory") == 3 + len(work)
        assert service.metric("embedding_cleanups_total", reason="limit") == 1  # tried once, then the cooldown
        assert service.metric("embedding_memory_threshold_bytes", level="limit") == 100 * MB
        memory = requests.get(f"{service.url}/memory", timeout=10).json()
        assert memory["shedding"] is True
        assert memory["thresholds"]["limit_source"] == "config"
        assert requests.get(f"{service.url}/health", timeout=5).status_code == 200
        assert service.events("memory.shedding_started")
    finally:
        service.terminate()


def test_without_a_token_loopback_clients_may_clean_up_once_per_interval(service: ServiceProcess) -> None:
    first = requests.post(f"{service.url}/cleanup", timeout=60)
    if first.status_code == 429:  # the session's service: another test's cleanup within the interval; wait it out
        time.sleep(int(first.headers["Retry-After"]))
        first = requests.post(f"{service.url}/cleanup", timeout=60)
    assert first.status_code == 200
    again = requests.post(f"{service.url}/cleanup", timeout=60)
    assert again.status_code == 429
    assert int(again.headers["Retry-After"]) >= 1
    from_a_page = requests.post(
        f"{service.url}/cleanup", headers={"Origin": "http://evil.example", "Content-Type": "text/plain"}, timeout=10
    )
    assert from_a_page.status_code == 403
