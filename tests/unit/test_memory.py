from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from app import memory
from app.config import Settings
from app.engine import BatchStats, Engine
from app.errors import TooManyRequests, Unavailable
from app.memory import (
    CleanupInProgress,
    HeapActions,
    MemoryManager,
    cgroup_memory_limit,
    collect_garbage,
)
from app.metrics import Metrics
from app.reasons import CleanupReason, MemoryPolicy
from app.shedding import SHED_MIN_S
from app.triggers import LEGACY_THRESHOLD_BYTES
from tests.doubles import FakeBackend, FakeClock, FakeSampler

GB = 1_000_000_000
MB = 1_000_000
SETTINGS = Settings(
    model="fake",
    memory_elevated_bytes=2 * GB,
    memory_high_bytes=int(2.5 * GB),
    cleanup_interval_s=300,
    cleanup_every_requests=50,
    cleanup_cooldown_s=30,
)


class RecordingHeap:
    """The collector's and the allocator's actions, recorded: the test process's heap is left alone."""

    def __init__(self, freed_objects: int = 137) -> None:
        self.freed_objects = freed_objects
        self.collects = self.plain_collects = self.freezes = 0
        self.releases: list[float] = []
        self.on_release: Callable[[], None] = lambda: None

    def actions(self) -> HeapActions:
        return HeapActions(
            collect=self.collect,
            collect_once=self.collect_once,
            freeze=self.freeze,
            release=self.release,
            limit_arenas=lambda arenas: False,
        )

    def collect(self) -> int:
        self.collects += 1
        return self.freed_objects

    def collect_once(self) -> int:
        self.plain_collects += 1
        return self.freed_objects

    def freeze(self) -> None:
        self.freezes += 1

    def release(self) -> bool:
        self.releases.append(time.monotonic())
        self.on_release()
        return True


class Setup:
    def __init__(self, settings: Settings = SETTINGS, rss: int = GB) -> None:
        self.clock = FakeClock()
        self.sampler = FakeSampler(rss)
        self.heap = RecordingHeap()
        self.metrics = Metrics()
        self.backend = FakeBackend()
        self.engine = Engine(
            self.backend,
            batch_size=4,
            max_batch_tokens=settings.max_batch_tokens,
            queue_size=64,
            metrics=self.metrics,
            rss_sampler=lambda: 0,
        )
        self.manager = MemoryManager(
            settings,
            metrics=self.metrics,
            engine=self.engine,
            sampler=self.sampler,
            clock=self.clock,
            cgroup_limit=lambda: None,
            heap=self.heap.actions(),
        )

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def setup() -> Setup:
    return Setup()


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 5.0) -> None:
    """Poll state instead of sleeping a guessed while: fails after ``timeout_s``, never hangs."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def test_nothing_is_due_on_a_quiet_service(setup: Setup) -> None:
    assert setup.manager.tick() is None
    assert setup.value("embedding_cleanups_total", reason="periodic") == 0


def test_the_monitor_reads_memory_in_full_at_most_every_few_seconds(setup: Setup) -> None:
    """The monitor also passes for each cleanup that falls due, more than once a second under single texts: those
    passes read RSS alone (still deciding and classifying on it), and the gauges that cost a full sample (USS,
    the breakdown) are refreshed at most every PUBLISH_EVERY_S."""
    full: list[int] = []
    sample = setup.sampler.full
    setup.sampler.full = lambda: full.append(1) or sample()  # type: ignore[method-assign]
    setup.manager.tick()
    assert len(full) == 1
    setup.clock.advance(memory.PUBLISH_EVERY_S - 0.1)
    setup.sampler.set(int(2.6 * GB))
    assert setup.manager.tick() == "threshold"  # the RSS read alone decides
    assert setup.value("embedding_memory_status", status="high") == 1
    assert len(full) == 1
    setup.clock.advance(0.1)
    setup.manager.tick()
    assert len(full) == 2


def test_a_loaded_model_is_sampled_in_full_at_once(setup: Setup) -> None:
    """The gauges are first set before the model loads; once it is loaded and warm, the monitor's next pass reads
    memory in full, not only RSS until the next interval: /metrics shows what serving starts from."""
    full: list[int] = []
    sample = setup.sampler.full
    setup.sampler.full = lambda: full.append(1) or sample()  # type: ignore[method-assign]
    setup.manager.tick()
    setup.clock.advance(1.0)
    setup.manager.sample_when_loaded()
    setup.manager.tick()
    assert len(full) == 2  # 1 s after the last full pass: without the model's word, RSS alone


def test_a_monitor_interval_shorter_than_that_gets_a_full_pass_each_time() -> None:
    setup = Setup(replace(SETTINGS, monitor_interval_s=1.0))
    full: list[int] = []
    sample = setup.sampler.full
    setup.sampler.full = lambda: full.append(1) or sample()  # type: ignore[method-assign]
    for _ in range(3):
        setup.manager.tick()
        setup.clock.advance(1.0)
    assert len(full) == 3


def test_threshold_trigger_respects_a_cooldown(setup: Setup) -> None:
    setup.sampler.set(int(2.6 * GB))  # stays above the high threshold: the cleanup frees nothing
    with capture_logs() as logs:
        assert setup.manager.tick() == "threshold"
        setup.clock.advance(10)
        assert setup.manager.tick() is None  # still high, but inside the cooldown
        setup.clock.advance(25)
        assert setup.manager.tick() == "threshold"
    assert setup.value("embedding_cleanups_total", reason="threshold") == 2
    assert setup.value("embedding_cleanups_ineffective_total", reason="threshold") == 2
    cleanups = [e for e in logs if e["event"] == "memory.cleanup"]
    assert [(e["reason"], e["effective"], e["log_level"]) for e in cleanups] == [("threshold", False, "warning")] * 2


def test_periodic_trigger_fires_after_the_interval(setup: Setup) -> None:
    setup.clock.advance(299)
    assert setup.manager.tick() is None
    setup.clock.advance(2)
    assert setup.manager.tick() == "periodic"
    assert setup.manager.tick() is None  # the interval restarts at the cleanup
    assert setup.value("embedding_last_cleanup_timestamp_seconds") is not None


def test_request_count_trigger_after_n_requests_then_resets(setup: Setup) -> None:
    for _ in range(49):
        setup.manager.admit()
    assert setup.manager.tick() is None
    setup.manager.admit()
    assert setup.manager.tick() == "request_count"
    assert setup.manager.report()["requests_since_cleanup"] == 0
    assert setup.manager.tick() is None


def test_requests_admitted_while_a_cleanup_runs_count_toward_the_next_one(setup: Setup) -> None:
    for _ in range(30):
        setup.manager.admit()

    def arrive_meanwhile() -> None:
        for _ in range(3):
            setup.manager.admit()

    setup.heap.on_release = arrive_meanwhile
    setup.clock.advance(301)
    assert setup.manager.tick() == "periodic"
    assert setup.manager.report()["requests_since_cleanup"] == 3  # the 30 before were cleaned up after
    setup.heap.on_release = lambda: None
    for _ in range(46):
        setup.manager.admit()
    assert setup.manager.tick() is None
    setup.manager.admit()
    assert setup.manager.tick() == "request_count"


def test_a_cleanup_records_what_it_freed(setup: Setup) -> None:
    setup.sampler.set(1_500_000_000, 900_000_000)  # before, after
    record = setup.manager.cleanup(CleanupReason.MANUAL)
    assert record.reason == "manual"
    assert record.freed_bytes == 600_000_000
    assert record.freed_objects == 137
    assert record.effective
    assert (setup.heap.collects, len(setup.heap.releases), setup.heap.plain_collects) == (1, 1, 0)
    assert setup.backend.released == 1  # torch caches released, grads zeroed, eval mode
    report = setup.manager.report()
    assert report["last_cleanup"]["freed_bytes"] == 600_000_000
    assert report["cleanups"] == {"manual": 1}
    assert setup.value("embedding_cleanup_freed_bytes_sum") == 600_000_000
    assert setup.value("embedding_cleanup_freed_objects_sum") == 137


def test_collect_garbage_frees_reference_cycles() -> None:
    gc.disable()  # keep the automatic collector away from the cycles below
    try:
        garbage: list[list[object]] = [[] for _ in range(100)]
        for item in garbage:
            item.append(item)  # reference cycles only the collector can free
        del garbage, item
        assert collect_garbage() >= 100
    finally:
        gc.enable()


def test_status_follows_the_thresholds_and_logs_each_change(setup: Setup) -> None:
    with capture_logs() as logs:
        for rss in (GB, int(2.1 * GB), int(2.6 * GB), int(2.6 * GB), GB):
            setup.sampler.set(rss)
            setup.manager.tick()
            setup.clock.advance(31)
    changes = [(e["previous"], e["status"]) for e in logs if e["event"] == "memory.status_changed"]
    assert ("normal", "elevated") in changes
    assert ("elevated", "high") in changes
    assert changes[-1][1] == "normal"
    assert setup.value("embedding_memory_status", status="normal") == 1
    assert setup.value("embedding_memory_status", status="high") == 0


def test_a_cleanup_while_another_runs_is_refused() -> None:
    setup = Setup()
    started, results = threading.Event(), []
    with setup.engine.exclusive():  # a batch is running: the first cleanup waits for it, holding the lock

        def first() -> None:
            started.set()
            results.append(setup.manager.cleanup(CleanupReason.MANUAL))

        thread = threading.Thread(target=first)
        thread.start()
        started.wait()
        wait_for(lambda: setup.manager.report()["cleanup_running"], "the first cleanup to take the lock")
        with pytest.raises(CleanupInProgress) as caught:
            setup.manager.cleanup(CleanupReason.MANUAL)
        assert caught.value.status == 409
    thread.join(5)
    assert len(results) == 1


def test_cleanups_run_between_batches_when_the_engine_is_busy() -> None:
    setup = Setup()
    setup.backend.gate.clear()
    setup.engine.start()
    deadline = time.monotonic() + 5
    while setup.engine.state != "ready" and time.monotonic() < deadline:
        setup.backend.gate.set()
        time.sleep(0.01)
    setup.manager.start()
    setup.backend.gate.clear()
    job = setup.engine.submit(["a", "b"])
    wait_for(lambda: not setup.engine.is_idle(), "the batch to start")
    setup.clock.advance(301)
    assert setup.manager.tick() == "periodic"  # scheduled, not run: a batch is in the model
    assert setup.value("embedding_cleanups_total", reason="periodic") == 0
    setup.backend.gate.set()
    job.wait(5)
    wait_for(lambda: setup.value("embedding_cleanups_total", reason="periodic") == 1, "the periodic cleanup")
    setup.manager.stop()
    setup.engine.stop(5)


def test_legacy_collects_on_every_request_above_1_5_gb_and_nothing_else() -> None:
    setup = Setup(SETTINGS.replace(memory_policy="legacy"), rss=LEGACY_THRESHOLD_BYTES + 1)
    for _ in range(3):
        setup.manager.admit()
    assert setup.value("embedding_cleanups_total", reason="legacy") == 3
    setup.clock.advance(10_000)
    setup.sampler.set(3 * GB)
    assert setup.manager.tick() is None  # no periodic, threshold or request-count cleanups
    assert setup.backend.released == 0  # legacy only runs gc.collect()
    assert (setup.heap.plain_collects, setup.heap.collects, setup.heap.releases) == (3, 0, [])


@pytest.mark.parametrize("policy", list(MemoryPolicy))
def test_each_policy_is_one_strategy_that_runs_only_the_cleanups_it_declares(policy: MemoryPolicy) -> None:
    assert memory.POLICIES[policy].name is policy
    setup = Setup(SETTINGS.replace(memory_policy=policy), rss=3 * GB)
    for _ in range(SETTINGS.cleanup_every_requests + 1):
        setup.manager.admit()
    for _ in range(3):
        setup.clock.advance(SETTINGS.cleanup_interval_s + SETTINGS.cleanup_cooldown_s)
        setup.manager.tick()
    ran = {reason for reason in CleanupReason if setup.value("embedding_cleanups_total", reason=reason)}
    assert ran <= set(policy.reasons)
    assert bool(ran) is (policy is not MemoryPolicy.OFF)


def test_off_never_cleans_up_by_itself() -> None:
    setup = Setup(SETTINGS.replace(memory_policy="off"), rss=3 * GB)
    for _ in range(100):
        setup.manager.admit()
    setup.clock.advance(10_000)
    assert setup.manager.tick() is None
    assert setup.manager.cleanup(CleanupReason.MANUAL).reason == "manual"  # an operator can still ask


def test_load_shedding_cleans_up_first_then_refuses_until_memory_is_back() -> None:
    setup = Setup(SETTINGS.replace(memory_limit_bytes=3 * GB), rss=GB)
    setup.manager.admit()
    setup.sampler.set(int(3.5 * GB), int(3.5 * GB), int(3.4 * GB), int(3.4 * GB))  # check, before, after, check
    with pytest.raises(Unavailable) as caught:
        setup.manager.admit()
    assert caught.value.status == 503
    assert caught.value.headers()["Retry-After"] == "5"
    assert setup.value("embedding_cleanups_total", reason="limit") == 1
    assert setup.value("embedding_rejected_total", reason="memory") == 1
    assert setup.manager.report()["shedding"] is True
    with pytest.raises(Unavailable):
        setup.manager.admit()  # inside the cooldown: refused without another cleanup
    assert setup.value("embedding_cleanups_total", reason="limit") == 1
    setup.clock.advance(SHED_MIN_S)
    setup.sampler.set(int(2.8 * GB))  # under the limit by more than its 5% margin (150 MB)
    setup.manager.admit()
    assert setup.manager.report()["shedding"] is False
    assert setup.value("embedding_memory_threshold_bytes", level="limit") == 3 * GB


def test_shedding_stops_only_under_the_limit_by_a_margin_and_after_a_minimum_time() -> None:
    setup = Setup(SETTINGS.replace(memory_limit_bytes=3 * GB), rss=int(3.01 * GB))
    with pytest.raises(Unavailable):
        setup.manager.admit()
    with capture_logs() as logs:
        for second in range(12):  # RSS wavers around the limit: in and out every second
            setup.clock.advance(1)
            setup.sampler.set(int((2.99 if second % 2 else 3.01) * GB))
            setup.manager.over_limit()
        assert setup.manager.report()["shedding"] is True  # 2.99 GB is inside the margin: no flapping
        setup.sampler.set(int(2.86 * GB))
        assert setup.manager.over_limit() is True  # the margin is 5% of the limit: 150 MB
        setup.sampler.set(int(2.84 * GB))
        assert setup.manager.over_limit() is False
    assert [e["event"] for e in logs if e["event"].startswith("memory.shedding")] == ["memory.shedding_stopped"]
    setup.sampler.set(int(3.01 * GB))
    assert setup.manager.over_limit() is True
    setup.clock.advance(SHED_MIN_S - 0.1)
    setup.sampler.set(GB)
    assert setup.manager.over_limit() is True  # it lasts at least SHED_MIN_S, however low memory falls
    setup.clock.advance(0.1)
    assert setup.manager.over_limit() is False


def test_shedding_runs_the_smallest_batches_while_it_lasts() -> None:
    setup = Setup(SETTINGS.replace(memory_limit_bytes=3 * GB, max_batch_tokens=2048), rss=GB)
    setup.engine.start()
    deadline = time.monotonic() + 5
    while not setup.engine.ready:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert setup.engine.max_batch_tokens == 2048
    setup.sampler.set(int(3.1 * GB))
    assert setup.manager.over_limit() is True
    assert setup.engine.max_batch_tokens == setup.backend.max_seq_length  # one text of the longest at a time
    setup.clock.advance(SHED_MIN_S)
    setup.sampler.set(GB)
    assert setup.manager.over_limit() is False
    assert setup.engine.max_batch_tokens == 2048
    setup.engine.stop(5)


def test_the_shedding_margin_leaves_room_above_the_baseline() -> None:
    setup = Setup(SETTINGS.replace(memory_limit_bytes=3 * GB), rss=GB)
    assert setup.manager.shedder is not None
    assert setup.manager.shedder.margin() == int(0.05 * 3 * GB)
    setup.manager.baseline_bytes = int(2.9 * GB)  # a model that fills most of its limit
    assert setup.manager.shedder.margin() == int(0.05 * GB)  # half the room: it can still stop shedding


def test_shedding_ends_as_soon_as_a_purge_brings_memory_under_the_limit() -> None:
    setup = Setup(SETTINGS.replace(memory_limit_bytes=3 * GB), rss=int(3.4 * GB))
    with pytest.raises(Unavailable):
        setup.manager.admit()  # the full cleanup (cooldown 30 s) could not help
    assert setup.value("embedding_cleanups_total", reason="limit") == 1
    setup.clock.advance(SHED_MIN_S)  # well inside the cooldown
    setup.sampler.set(int(3.1 * GB), int(2.8 * GB))  # above at the check, under once the free heap is given back
    setup.manager.admit()
    assert setup.manager.report()["shedding"] is False
    assert setup.value("embedding_cleanups_total", reason="limit") == 1
    assert len(setup.heap.releases) == 2  # the cleanup's and the quick one


def test_purges_while_shedding_are_at_most_every_half_second() -> None:
    setup = Setup(SETTINGS.replace(memory_limit_bytes=3 * GB), rss=int(3.4 * GB))
    for step in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
        setup.clock.now = 1000.0 + step
        with pytest.raises(Unavailable):
            setup.manager.admit()
    assert len(setup.heap.releases) == 2  # the cleanup's at 0.0, then one at 0.5


def test_an_idle_service_stops_shedding_on_its_own() -> None:
    setup = Setup(SETTINGS.replace(memory_limit_bytes=3 * GB, monitor_interval_s=60), rss=int(3.4 * GB))
    with pytest.raises(Unavailable):
        setup.manager.admit()
    assert setup.manager._seconds_to_next_check() <= memory.SHED_CHECK_INTERVAL_S

    setup.heap.on_release = lambda: setup.sampler.set(int(2.8 * GB))  # the purge gives memory back
    setup.clock.advance(SHED_MIN_S)
    setup.manager.tick()  # no request arrives: the monitor purges and re-checks by itself
    assert setup.manager.report()["shedding"] is False
    assert setup.manager._seconds_to_next_check() > memory.SHED_CHECK_INTERVAL_S
    assert setup.value("embedding_cleanups_total", reason="limit") == 1


def test_the_monitor_purges_until_memory_is_under_the_limit_by_the_margin() -> None:
    setup = Setup(SETTINGS.replace(memory_limit_bytes=3 * GB, monitor_interval_s=60), rss=int(3.4 * GB))
    with pytest.raises(Unavailable):
        setup.manager.admit()
    setup.manager.budget.reservation().resize(MB)  # a request in flight: the margin holds
    setup.sampler.set(int(2.9 * GB))  # under the limit, not by its margin (150 MB)
    setup.heap.on_release = lambda: setup.sampler.set(int(2.8 * GB))
    setup.clock.advance(SHED_MIN_S)
    releases = len(setup.heap.releases)
    setup.manager.tick()
    assert len(setup.heap.releases) > releases  # not left waiting for the next cleanup
    assert setup.manager.report()["shedding"] is False


def test_an_idle_service_just_under_its_limit_stops_shedding() -> None:
    setup = Setup(SETTINGS.replace(memory_limit_bytes=3 * GB, monitor_interval_s=60), rss=int(3.4 * GB))
    with pytest.raises(Unavailable):
        setup.manager.admit()
    setup.sampler.set(int(2.9 * GB))  # what a purge cannot give back: live memory, just under the limit
    request = setup.manager.budget.reservation()
    request.resize(MB)
    setup.clock.advance(SHED_MIN_S)
    setup.manager.tick()
    assert setup.manager.report()["shedding"] is True  # work in flight could take it over again
    request.release()
    setup.manager.tick()
    assert setup.manager.report()["shedding"] is False  # nothing in flight: under the limit is enough
    setup.sampler.set(int(3.1 * GB))
    setup.manager.tick()
    assert setup.manager.over_limit() is True  # above it, idle or not: shedding again


def test_readiness_follows_the_limit_without_cleaning_up_on_the_probe() -> None:
    setup = Setup(SETTINGS.replace(memory_limit_bytes=3 * GB, monitor_interval_s=60), rss=3 * GB)
    assert setup.manager.over_limit() is False  # at the limit: still ready
    setup.sampler.set(3 * GB + 1)
    assert setup.manager.over_limit() is True  # one byte above: out
    setup.clock.advance(SHED_MIN_S)
    setup.sampler.set(GB)
    assert setup.manager.over_limit() is False
    setup.sampler.set(int(3.4 * GB))
    assert setup.manager.over_limit() is True
    assert setup.manager.report()["shedding"] is True
    assert setup.manager._seconds_to_next_check() <= memory.SHED_CHECK_INTERVAL_S  # the monitor gives back
    assert setup.heap.releases == []  # not the probe
    assert setup.value("embedding_cleanups_total", reason="limit") == 0
    setup.clock.advance(SHED_MIN_S)
    setup.sampler.set(int(2.8 * GB))
    assert setup.manager.over_limit() is False
    assert setup.manager.report()["shedding"] is False
    assert Setup(SETTINGS, rss=100 * GB).manager.over_limit() is False  # no limit, never


def test_manual_cleanups_are_rate_limited(setup: Setup) -> None:
    assert setup.manager.manual_cleanup().reason == "manual"
    setup.clock.advance(4)
    with pytest.raises(TooManyRequests) as caught:
        setup.manager.manual_cleanup()
    assert caught.value.status == 429
    assert caught.value.headers()["Retry-After"] == "6"
    setup.clock.advance(6)
    assert setup.manager.manual_cleanup().reason == "manual"
    assert setup.value("embedding_cleanups_total", reason="manual") == 2


def test_the_limit_defaults_to_most_of_the_container_limit() -> None:
    metrics = Metrics()
    manager = MemoryManager(SETTINGS, metrics=metrics, engine=Setup().engine, cgroup_limit=lambda: 4 * GB)
    assert manager.limit_bytes == int(3.6 * GB)
    assert manager.report()["thresholds"]["limit_source"] == "cgroup"
    threshold = "embedding_memory_threshold_bytes"
    assert metrics.registry.get_sample_value(threshold, {"level": "limit"}) == int(3.6 * GB)
    assert metrics.registry.get_sample_value(threshold, {"level": "container"}) == 4 * GB


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"memory.max": "max\n"}, None),
        ({"memory.max": "4294967296\n"}, 4294967296),
        ({"memory/memory.limit_in_bytes": "2147483648\n"}, 2147483648),
        ({"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_limit_v2_then_v1(tmp_path: Path, files: dict[str, str], expected: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_memory_limit(tmp_path) == expected


def test_trims_between_batches_wait_for_the_trim_interval() -> None:
    setup = Setup(SETTINGS.replace(trim_interval_s=2.0))
    trims = []
    for step in (0.0, 0.5, 1.0, 1.6, 0.5, 2.0):  # at t = 0, 0.5, 1.5, 3.1, 3.6, 5.6
        setup.clock.advance(step)
        setup.manager.between_batches()
        trims.append(setup.value("embedding_memory_trims_total"))
    assert trims == [1, 1, 1, 2, 2, 3]


def test_no_trims_between_batches_when_turned_off() -> None:
    setup = Setup(SETTINGS.replace(trim_after_batch=False))
    for _ in range(3):
        setup.clock.advance(5)
        setup.manager.between_batches()
    assert setup.value("embedding_memory_trims_total") == 0


def test_collect_garbage_restores_the_gc_thresholds() -> None:
    before = gc.get_threshold()
    collect_garbage()
    assert gc.get_threshold() == before


@pytest.fixture
def monitored() -> Iterator[Setup]:
    setup = Setup(SETTINGS.replace(monitor_interval_s=0.05, cleanup_every_requests=3))
    setup.manager.start()
    yield setup
    setup.manager.stop()


def test_the_monitor_thread_is_woken_by_the_request_count(monitored: Setup) -> None:
    for _ in range(3):
        monitored.manager.admit()
    wait_for(lambda: monitored.value("embedding_cleanups_total", reason="request_count") == 1, "the monitor's cleanup")


@pytest.mark.parametrize("policy", list(MemoryPolicy))
def test_each_policy_exports_a_zero_for_every_cleanup_it_can_run_and_no_other(policy: MemoryPolicy) -> None:
    setup = Setup(SETTINGS.replace(memory_policy=policy.value, memory_limit_bytes=3 * GB))
    exported = {
        sample.labels["reason"]
        for family in setup.metrics.registry.collect()
        if family.name == "embedding_cleanups"
        for sample in family.samples
        if sample.name == "embedding_cleanups_total"
    }
    assert exported == set(policy.reasons)
    assert {CleanupReason.MANUAL, CleanupReason.LIMIT} <= exported  # an operator and the hard limit, always
    assert (CleanupReason.LEGACY in exported) is (policy is MemoryPolicy.LEGACY)


def test_a_burst_that_never_reaches_the_engine_is_given_back_too() -> None:
    """POST /tokenize and /decode are admitted but run no batch: once they are answered, the idle engine gives
    what they freed back as it does after a burst of embedding requests."""
    setup = Setup()
    reservation = setup.manager.budget.reservation()
    setup.manager.admit()
    reservation.resize(40_000_000)  # a tokenize answer being written
    setup.manager.on_idle()
    assert setup.heap.releases == []
    reservation.release()
    setup.manager.on_idle()
    assert len(setup.heap.releases) == 1


def test_a_policy_named_in_the_environment_becomes_the_typed_policy() -> None:
    assert SETTINGS.replace(memory_policy="legacy").memory_policy is MemoryPolicy.LEGACY


def test_an_idle_engine_gives_a_bursts_memory_back_once_its_requests_are_answered() -> None:
    setup = Setup()
    reservation = setup.manager.budget.reservation()
    reservation.resize(1000)  # a request still being answered
    setup.manager.on_idle()
    assert setup.heap.releases == []  # nothing ran yet
    setup.manager.observe_batch(BatchStats(32, 900, 2, 0.1, GB, GB))
    setup.manager.on_idle()
    assert setup.heap.releases == []  # its answer is still being written
    reservation.release()
    setup.manager.on_idle()
    assert len(setup.heap.releases) == 1
    setup.clock.advance(60)
    setup.manager.on_idle()
    assert len(setup.heap.releases) == 1  # once a burst, not on every idle second
    off = Setup(SETTINGS.replace(memory_policy="off"))
    off.manager.observe_batch(BatchStats(32, 900, 2, 0.1, GB, GB))
    off.manager.on_idle()
    assert off.heap.releases == []  # policy off gives nothing back by itself
