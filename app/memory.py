"""Memory sampling, status, cleanup triggers, the cleanup itself and the monitor thread.

What measurement showed (docs/architecture.md section 5): after a mixed-length load,
``gc.collect()`` frees next to nothing, because the memory is not held by
Python objects but by the C allocator, which keeps freed pages. So the cleanup
ends by handing those back to the operating system (:mod:`app.allocator`:
jemalloc's purge, or glibc's ``malloc_trim(0)``). Under glibc, whose heaps
fragment more, and under jemalloc, whose free pages wait for a purge, the ``smart``
policy also trims between batches on the inference thread, at most every
``EMBEDDING_TRIM_INTERVAL_S``.

Threads: request threads only count (and, above the hard limit, shed load); the
monitor thread samples, decides and sets the gauges; a cleanup runs on the monitor
thread when the engine is idle, else on the inference thread between batches.
Each part owns its state behind one lock: the triggers (:mod:`app.triggers`), the
shedder (:mod:`app.shedding`), the cleaner (one cleanup at a time: a second request
for one while one runs is refused) and the status; reading (``GET /memory``) writes
nothing. docs/architecture.md section 5, "Parts and threads".
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil
import structlog

from app import allocator
from app.backend import ModelInfo
from app.breakdown import PythonObjects, PythonSample, RssByKind, allocator_accounts, free_but_kept, rss_by_kind
from app.budget import CostModel, MemoryBudget, derive, provisional_capacity
from app.config import Settings
from app.engine import BatchStats
from app.errors import Conflict, TooManyRequests, Unavailable
from app.metrics import Metrics
from app.reasons import CleanupReason, CleanupRecord, MemoryPolicy
from app.shedding import Release, Shedder
from app.triggers import POLICIES, Triggers

log = structlog.get_logger("app.memory")

STATUSES = ("normal", "elevated", "high")

CGROUP_LIMIT_SHARE = 0.9
"""Without EMBEDDING_MEMORY_LIMIT_BYTES, shed load above this share of the container's memory limit."""

SHED_CHECK_INTERVAL_S = 0.5
"""While shedding, the monitor re-checks memory this often, so an idle service stops shedding by itself."""

PUBLISH_EVERY_S = 5.0
"""The monitor refreshes the gauges that cost a full sample (USS, the breakdown: smaps read, the young generations'
objects counted under the interpreter lock) at most this often, or every ``EMBEDDING_MONITOR_INTERVAL_S`` where that
is shorter; its other passes read RSS alone. It also passes for each cleanup that falls due, which single texts make
more than once a second (the request count reached every 50 requests): a full sample each time cost them 6-14% of
their rate (docs/benchmarks.md)."""

TRIM_MAX_SHARE = 0.02
"""Per-batch trims take at most this share of wall time (a trim costs about 7 ms on a 600 MB heap)."""

_AGGRESSIVE_GC_THRESHOLDS = (100, 5, 5)
_GC_PASSES = 3
_NO_CGROUP_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a huge number


# --- sampling -------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySample:
    """The memory of this process at one moment."""

    rss_bytes: int
    uss_bytes: int | None = None
    cuda_allocated_bytes: int | None = None
    cuda_reserved_bytes: int | None = None


@functools.cache
def _process(pid: int) -> psutil.Process:
    return psutil.Process(pid)


def rss_bytes() -> int:
    """Resident set size of this process, in bytes (correct after a fork, too)."""
    return int(_process(os.getpid()).memory_info().rss)


class MemorySampler:
    """Reads this process's memory: RSS cheaply, USS and CUDA memory on request."""

    def rss(self) -> int:
        """Resident set size in bytes (microseconds: safe on the request path)."""
        return rss_bytes()

    def full(self) -> MemorySample:
        """RSS, USS (where the OS reports it) and torch CUDA memory (when a GPU is in use)."""
        process = _process(os.getpid())
        try:
            info = process.memory_full_info()
            rss, uss = int(info.rss), int(getattr(info, "uss", 0)) or None
        except (psutil.AccessDenied, OSError):
            rss, uss = int(process.memory_info().rss), None
        allocated, reserved = _cuda_memory()
        return MemorySample(rss, uss, allocated, reserved)


def _cuda_memory() -> tuple[int | None, int | None]:
    torch = sys.modules.get("torch")  # only if the model already imported it
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None, None
    return int(torch.cuda.memory_allocated()), int(torch.cuda.memory_reserved())


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The container's memory limit: cgroup v2 ``memory.max``, else v1; None when unlimited."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return value if 0 < value < _NO_CGROUP_LIMIT else None
    return None


# --- the cleanup ------------------------------------------------------------------


def collect_garbage(passes: int = _GC_PASSES) -> int:
    """Full collections under aggressive thresholds (restored after); the number of objects freed."""
    thresholds = gc.get_threshold()
    try:
        gc.set_threshold(*_AGGRESSIVE_GC_THRESHOLDS)
        return sum(gc.collect() for _ in range(passes))
    finally:
        gc.set_threshold(*thresholds)


@dataclass(frozen=True)
class HeapActions:
    """What the memory manager does to the process itself: the garbage collector and the C allocator. Injected,
    so unit tests record the actions instead of freezing, collecting and purging the test process's heap."""

    collect: Callable[[], int] = collect_garbage  # full collections; objects freed
    collect_once: Callable[[], int] = gc.collect  # the legacy policy's one plain gc.collect()
    freeze: Callable[[], None] = gc.freeze  # the loaded model's objects out of the collector's reach
    release: Callable[[], bool] = allocator.release_free_memory  # free memory back to the OS; False: cannot
    limit_arenas: Callable[[int], bool] = allocator.limit_glibc_arenas  # glibc arenas, before threads exist


class ManagedEngine(Protocol):
    """What the memory manager needs from the engine (:class:`app.engine.Engine`): its hooks on the
    inference thread, whether it is idle, the model held between two batches, and its caches."""

    def add_ready_hook(self, hook: Callable[[], None]) -> None: ...
    def add_between_batches_hook(self, hook: Callable[[], None]) -> None: ...
    def add_idle_hook(self, hook: Callable[[], None]) -> None: ...
    def add_batch_observer(self, observer: Callable[[BatchStats], None]) -> None: ...
    def is_idle(self) -> bool: ...
    def exclusive(self) -> AbstractContextManager[None]: ...
    def release_model_caches(self) -> None: ...
    def limit_batch_tokens(self, tokens: int | None) -> None: ...
    @property
    def info(self) -> ModelInfo | None: ...


class CleanupInProgress(Conflict):
    """A cleanup was asked for while another one runs."""


def _accounts() -> dict[str, int]:
    """RSS kinds and allocator accounts in one flat mapping, to compare before and after a cleanup."""
    flat: dict[str, int] = {}
    kinds = rss_by_kind(shared=False)
    if kinds is not None:
        flat.update(anon=kinds.anon, file=kinds.file)
    name, accounts = allocator_accounts()
    flat.update({f"{name}.{account}": value for account, value in accounts.items()})
    return flat


# --- the cleaner: one cleanup at a time, and what they did ------------------------------------------


class Cleaner:
    """Runs cleanups one at a time (a second one asked for meanwhile is refused) and keeps their history: the
    last record and the counts by reason, behind one lock. Any thread may run one: the monitor when the engine
    is idle, the inference thread between batches, a request thread for ``POST /cleanup`` or the limit."""

    def __init__(
        self,
        settings: Settings,
        *,
        heap: HeapActions,
        engine: ManagedEngine,
        sampler: MemorySampler,
        metrics: Metrics,
        triggers: Triggers,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        after: Callable[[int], None],
    ) -> None:
        self._settings = settings
        self._heap = heap
        self._engine = engine
        self._sampler = sampler
        self._metrics = metrics
        self._triggers = triggers
        self._clock = clock
        self._wall = wall_clock
        self._after = after  # told RSS after each cleanup (the status)
        self._running = threading.Lock()
        self._lock = threading.Lock()
        self._last: CleanupRecord | None = None
        self._last_manual_at: float | None = None
        self._counts: Counter[CleanupReason] = Counter()
        self._ineffective: Counter[CleanupReason] = Counter()

    @property
    def running(self) -> bool:
        return self._running.locked()

    def history(self) -> tuple[dict[str, Any] | None, dict[CleanupReason, int], dict[CleanupReason, int]]:
        """The last cleanup, counts by reason, ineffective counts by reason."""
        with self._lock:
            last = self._last.to_dict() if self._last else None
            return last, dict(self._counts), dict(self._ineffective)

    def manual(self) -> CleanupRecord:
        """``POST /cleanup``: a cleanup now, at most one per ``EMBEDDING_MANUAL_CLEANUP_INTERVAL_S`` (else 429)."""
        interval = self._settings.manual_cleanup_interval_s
        with self._lock:
            now = self._clock()
            if self._last_manual_at is not None and now - self._last_manual_at < interval:
                wait = interval - (now - self._last_manual_at)
                raise TooManyRequests(
                    f"a manual cleanup ran {now - self._last_manual_at:.1f} s ago; at most one every {interval:g} s "
                    "(EMBEDDING_MANUAL_CLEANUP_INTERVAL_S)",
                    retry_after_s=max(1, math.ceil(wait)),
                )
            self._last_manual_at = now
        return self.run(CleanupReason.MANUAL)

    def run(self, reason: CleanupReason) -> CleanupRecord:
        """Run one cleanup now; raise :class:`CleanupInProgress` (409) if one is running."""
        if not self._running.acquire(blocking=False):
            log.info("memory.cleanup_skipped", reason=reason, why="another cleanup is running")
            raise CleanupInProgress("a cleanup is already running; try again when it has finished")
        try:
            # The old service's gc.collect() ran beside the model; every other cleanup holds the model
            # between two batches so it never competes with one.
            with contextlib.nullcontext() if reason is CleanupReason.LEGACY else self._engine.exclusive():
                counted = self._triggers.requests()  # requests admitted from here on count toward the next one
                record = self._clean(reason)
        finally:
            self._running.release()
        self._record(record, counted)
        return record

    def try_run(self, reason: CleanupReason) -> CleanupRecord | None:
        """Clean up now unless a cleanup is already running (which does the same work): None then."""
        try:
            return self.run(reason)
        except CleanupInProgress:
            return None

    def _clean(self, reason: CleanupReason) -> CleanupRecord:
        started_at, started = self._wall(), time.perf_counter()
        before = self._sampler.rss()
        accounts_before = _accounts()
        if reason is CleanupReason.LEGACY:
            freed_objects, trimmed = self._heap.collect_once(), False
        else:
            self._engine.release_model_caches()
            freed_objects = self._heap.collect()
            trimmed = self._heap.release()
        after = self._sampler.rss()
        accounts_after = _accounts()
        reduced = {
            name: value - accounts_after[name]
            for name, value in accounts_before.items()
            if name in accounts_after and value > accounts_after[name]
        }
        duration = time.perf_counter() - started
        return CleanupRecord(reason, started_at, duration, before, after, freed_objects, trimmed, reduced)

    def _record(self, record: CleanupRecord, counted: int) -> None:
        self._triggers.cleaned(counted, self._clock())
        with self._lock:
            self._last = record
            self._counts[record.reason] += 1
            if not record.effective:
                self._ineffective[record.reason] += 1
        m = self._metrics
        m.cleanups.labels(reason=record.reason).inc()
        m.cleanup_freed_objects.observe(record.freed_objects)
        m.cleanup_freed_bytes.observe(max(0, record.freed_bytes))
        m.cleanup_duration.observe(record.duration_s)
        m.last_cleanup.set(record.started_at + record.duration_s)
        if not record.effective:
            m.cleanups_ineffective.labels(reason=record.reason).inc()
        emit = log.info if record.effective else log.warning
        emit("memory.cleanup", **{k: v for k, v in record.to_dict().items() if k != "started_at"})
        self._after(record.rss_after_bytes)


# --- the status and the gauges: written by the monitor, read by GET /memory -------------------------


class Status:
    """normal / elevated / high, and its gauge: changed only by :meth:`publish` (the monitor, a cleanup)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._lock = threading.Lock()
        self._status: str | None = None

    def classify(self, rss: int) -> str:
        """normal below the elevated threshold, elevated up to the high one, high above it."""
        if rss > self._settings.memory_high_bytes:
            return "high"
        if rss > self._settings.memory_elevated_bytes:
            return "elevated"
        return "normal"

    def publish(self, rss: int) -> None:
        """Classify ``rss``, set the gauge and log a change (under the lock: changes are logged in order)."""
        status = self.classify(rss)
        with self._lock:
            previous, self._status = self._status, status
            if status != previous:
                for name in STATUSES:
                    self._metrics.memory_status.labels(status=name).set(1 if name == status else 0)
                if previous is not None:
                    log.info("memory.status_changed", previous=previous, status=status, rss_bytes=rss)


@dataclass(frozen=True)
class Breakdown:
    """Where the memory is at one moment (app/breakdown.py), read without side effects."""

    kinds: RssByKind | None
    allocator: str
    accounts: dict[str, int]
    python: PythonSample
    weight_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rss_by_kind": None if self.kinds is None else asdict(self.kinds),
            "allocator": {
                "name": self.allocator,
                "accounts": self.accounts,
                "free_but_kept_bytes": free_but_kept(self.allocator, self.accounts),
            },
            "python": asdict(self.python),
            "weight_bytes": self.weight_bytes,
        }

    def publish(self, metrics: Metrics) -> None:
        if self.kinds is not None:
            for kind in ("anon", "file", "shmem", "swap"):
                metrics.memory_by_kind.labels(kind=kind).set(getattr(self.kinds, kind))
        for account, value in self.accounts.items():
            metrics.allocator_bytes.labels(allocator=self.allocator, account=account).set(value)
        for generation, count in self.python.gc_tracked_objects.items():
            metrics.gc_tracked_objects.labels(generation=generation).set(count)
        metrics.python_allocated_blocks.set(self.python.allocated_blocks)


# --- the manager ------------------------------------------------------------------


class MemoryManager:
    """The memory manager's parts, and the monitor thread that drives them.

    Each part owns its state behind one lock: :class:`app.triggers.Triggers` (counters and the cleanup asked of
    the inference thread; its :class:`~app.triggers.Policy` is pure), :class:`app.shedding.Shedder` (the hard
    limit), :class:`Cleaner` (one cleanup at a time and their history), :class:`Status` (the gauge). The
    per-batch trim's state belongs to the inference thread alone. Reading (``GET /memory``) writes nothing:
    the gauges are set by the monitor's passes and by cleanups.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics,
        engine: ManagedEngine,
        budget: MemoryBudget | None = None,
        sampler: MemorySampler | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        cgroup_limit: Callable[[], int | None] = cgroup_memory_limit,
        heap: HeapActions | None = None,
    ) -> None:
        self._settings = settings
        self._heap = heap or HeapActions()
        self.policy = MemoryPolicy(settings.memory_policy)
        self._policy = POLICIES[self.policy]
        self._metrics = metrics
        self._engine = engine
        self.budget = budget or MemoryBudget(
            settings.memory_budget_bytes or provisional_capacity(settings.max_body_bytes), metrics
        )
        self._sampler = sampler or MemorySampler()
        self._python_objects = PythonObjects()
        self._clock = clock
        self._published_at: float | None = None  # when the monitor last refreshed the full gauges
        self._full_asked = threading.Event()  # the next pass samples in full (the model just loaded)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.allocator = allocator.active()
        self.trim_after_batch = self._policy.trims_between_batches and settings.trim_after_batch
        self._next_trim_at = 0.0  # inference thread only
        self._worked = False  # work was admitted or batches ran since the last trim while idle
        self.baseline_bytes: int | None = None
        """RSS once the model is loaded, warmed up and its load garbage given back (the budget's floor)."""
        self.triggers = Triggers(self._policy, settings, clock())
        self.status = Status(settings, metrics)
        self.cleaner = Cleaner(
            settings,
            heap=self._heap,
            engine=engine,
            sampler=self._sampler,
            metrics=metrics,
            triggers=self.triggers,
            clock=clock,
            wall_clock=wall_clock,
            after=self.status.publish,
        )
        self.cgroup_limit_bytes = cgroup_limit()
        self.limit_bytes, self.limit_source = self._hard_limit()
        self.shedder = (
            Shedder(
                self.limit_bytes,
                engine=engine,
                clock=clock,
                cooldown_s=settings.cleanup_cooldown_s,
                baseline=lambda: self.baseline_bytes,
                batch_tokens=lambda: self.budget.derived.max_batch_tokens if self.budget.derived else None,
            )
            if self.limit_bytes is not None
            else None
        )
        self._init_metrics()

    def _hard_limit(self) -> tuple[int | None, str | None]:
        if self._settings.memory_limit_bytes is not None:
            return self._settings.memory_limit_bytes, "config"
        if self.cgroup_limit_bytes is not None:
            return int(self.cgroup_limit_bytes * CGROUP_LIMIT_SHARE), "cgroup"
        return None, None

    def _init_metrics(self) -> None:
        m = self._metrics
        m.memory_rss.set_function(self._sampler.rss)
        m.memory_threshold.labels(level="elevated").set(self._settings.memory_elevated_bytes)
        m.memory_threshold.labels(level="high").set(self._settings.memory_high_bytes)
        if self.limit_bytes is not None:
            m.memory_threshold.labels(level="limit").set(self.limit_bytes)
        if self.cgroup_limit_bytes is not None:
            m.memory_threshold.labels(level="container").set(self.cgroup_limit_bytes)
        for reason in self.policy.reasons:
            m.cleanups.labels(reason=reason)  # export zeros so rates and alerts have series from the start
            m.cleanups_ineffective.labels(reason=reason)
        m.rejected.labels(reason="memory")

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Hook into the engine and start the monitor thread (before the engine's thread starts)."""
        self._heap.limit_arenas(self._settings.malloc_arenas)  # before the engine's and the server's threads
        self._log_allocator()
        if self._policy.freezes_startup_objects:
            self._engine.add_ready_hook(self.freeze_startup_objects)
        self._engine.add_ready_hook(self.derive_budget)
        self._engine.add_ready_hook(self.sample_when_loaded)
        self._engine.add_between_batches_hook(self.between_batches)
        self._engine.add_idle_hook(self.on_idle)
        self._engine.add_batch_observer(self.observe_batch)
        self._publish(self._sampler.full())  # the gauges have values from the start, not from the first pass
        self._thread = threading.Thread(target=self._monitor, name="memory-monitor", daemon=True)
        self._thread.start()

    def _log_allocator(self) -> None:
        requested = self._settings.allocator
        fields = {"allocator": self.allocator, "requested": requested, "trim_after_batch": self.trim_after_batch}
        if allocator.allocator_for(requested, self._settings.backend) != requested:
            log.info(
                "memory.allocator",
                **fields,
                hint=f"glibc for EMBEDDING_BACKEND=openvino: {allocator.OPENVINO_CONFLICT}",
            )
        elif requested == "jemalloc" and self.allocator != "jemalloc":
            log.warning("memory.allocator", **fields, hint="jemalloc not found (Debian: libjemalloc2)")
        else:
            log.info("memory.allocator", **fields)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the monitor thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # --- request path: counting only ----------------------------------------------

    def admit(self) -> None:
        """Called for every request that does work (embedding, tokenizing, decoding) before it does it: shed load
        above the limit, count it, and have the idle thread give back what it freed once the burst is over
        (``/tokenize`` bursts never reach the engine)."""
        if self.shedder is not None:
            self._shed_above_limit(self.shedder)
        self._worked = True
        if self.triggers.count_request() and self._policy.wakes_monitor_on_count:
            self._wake.set()
        reason = self._policy.on_request(self._sampler.rss)
        if reason is not None:
            self.cleaner.try_run(reason)

    def _shed_above_limit(self, shedder: Shedder) -> None:
        rss = self._sampler.rss()
        if shedder.short_of(rss):
            rss = self._release_for_limit(shedder)  # re-checked after giving back what can be, before refusing
        if not shedder.update(rss):
            return
        self._metrics.rejected.labels(reason="memory").inc()
        raise Unavailable(
            f"memory use ({rss} bytes) is above the service's limit ({shedder.limit_bytes} bytes); retry shortly",
            retry_after_s=5,
        )

    def over_limit(self) -> bool:
        """For readiness: whether RSS is above the hard limit, so that new requests would be shed. Starts or
        ends shedding as a request would, but gives nothing back on the caller's thread: the monitor, woken,
        does that every 0.5 s while shedding."""
        if self.shedder is None:
            return False
        above = self.shedder.update(self._sampler.rss())
        if above:
            self._wake.set()
        return above

    def _release_for_limit(self, shedder: Shedder) -> int:
        """Above the hard limit: a full cleanup once per cooldown, else a purge at most every 0.5 s; RSS after."""
        release = shedder.release_due()
        if release is Release.CLEANUP:
            self.cleaner.try_run(CleanupReason.LIMIT)
        elif release is Release.PURGE:
            self._heap.release()
        return self._sampler.rss()

    def derive_budget(self) -> None:
        """Once the model is loaded and warm: measure the baseline and derive the memory budget above it
        (app/budget.py), and hold the engine's batches to what fits (inference thread, before serving)."""
        info = self._engine.info
        if info is None:
            return
        self._heap.release()
        self.baseline_bytes = self._sampler.rss()
        settings = self._settings
        ceiling = min(settings.memory_elevated_bytes, self.limit_bytes or settings.memory_elevated_bytes)
        cost = CostModel.for_model(info)
        derived = derive(
            cost,
            baseline=self.baseline_bytes,
            ceiling=ceiling,
            max_batch_tokens=settings.max_batch_tokens,
            configured=settings.memory_budget_bytes,
        )
        self.budget.configure(cost, derived)
        if derived.max_batch_tokens < settings.max_batch_tokens:
            self._engine.limit_batch_tokens(derived.max_batch_tokens)
        emit = log.warning if ceiling - self.baseline_bytes < 2 * derived.batch_reserve_bytes else log.info
        emit("memory.budget", **self._budget_report())

    # --- the monitor thread ------------------------------------------------------------

    def tick(self) -> CleanupReason | None:
        """One monitor pass: sample, set the gauges, run or ask for a due cleanup."""
        now = self._clock()
        every = min(PUBLISH_EVERY_S, self._settings.monitor_interval_s)  # a pass the interval set is always full
        due = self._published_at is None or now - self._published_at >= every
        if self._full_asked.is_set():  # cleared before the sample: a later ask is kept for the next pass
            self._full_asked.clear()
            due = True
        sample = self._sampler.full() if due else None
        rss = self._sampler.rss() if sample is None else sample.rss_bytes
        shedder = self.shedder
        if shedder is not None and shedder.shedding:
            # Idle or not, give back what can be and stop shedding as soon as memory is under the limit.
            rss = self._release_for_limit(shedder) if shedder.short_of(rss) else rss
            shedder.update(rss, idle=self._engine.is_idle() and self.budget.used == 0)
        if sample is None:
            self.status.publish(rss)
        else:
            self._publish(sample, rss)
            self._published_at = now
        reason = self.triggers.decide(rss, self._clock())
        if reason is None:
            return None
        if self._engine.is_idle():
            self.cleaner.try_run(reason)
        else:
            self.triggers.ask(reason)  # the inference thread runs it after its current batch
        return reason

    def sample_when_loaded(self) -> None:
        """The model is loaded and warm: the monitor's next pass, now, samples in full, so that the gauges show
        what serving starts from, not the process before its model (the next pass could be a whole
        ``EMBEDDING_MONITOR_INTERVAL_S`` away)."""
        self._full_asked.set()
        self._wake.set()

    def _publish(self, sample: MemorySample, rss: int | None = None) -> None:
        """Set the gauges GET /memory and /metrics read between passes."""
        self._metrics.memory_uss.set(sample.uss_bytes or 0)
        self._read_breakdown().publish(self._metrics)
        self.status.publish(sample.rss_bytes if rss is None else rss)

    def _monitor(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._seconds_to_next_check())
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001  (the monitor must outlive any one failure)
                log.error("memory.monitor_failed", error=str(exc), error_type=type(exc).__name__)

    def _seconds_to_next_check(self) -> float:
        wait = self._settings.monitor_interval_s
        if self.shedder is not None and self.shedder.shedding:
            wait = min(wait, SHED_CHECK_INTERVAL_S)
        until_due = self.triggers.seconds_to_next_cleanup(self._clock())
        if until_due is not None:
            wait = min(wait, max(until_due, 0.01))
        return wait

    # --- inference-thread hooks ---------------------------------------------------------

    def between_batches(self) -> None:
        """After each batch: run a cleanup the monitor asked for, or else (``smart``) trim the heap."""
        if not self.run_pending() and self.trim_after_batch:
            self._trim_after_batch()

    def on_idle(self) -> None:
        """While the engine is idle (about every second): a cleanup asked for, else (``smart``) one trim once the
        requests of a burst are all answered, so that what they freed goes back now, not at the next cleanup
        (under jemalloc freed pages otherwise stay until a purge)."""
        if self.run_pending():
            return
        if self.trim_after_batch and self._worked and self.budget.used == 0 and self._trim_after_batch():
            self._worked = False

    def run_pending(self) -> bool:
        """Run the cleanup the monitor asked for, if any; whether there was one."""
        reason = self.triggers.take()
        if reason is None:
            return False
        try:
            self.cleaner.try_run(reason)
        finally:
            self.triggers.done()
        return True

    def freeze_startup_objects(self) -> None:
        """Move the loaded model's objects out of the collector's reach (``gc.freeze``), give back load garbage.

        They live as long as the process, yet every full collection walked all of
        them: 660 ms per cleanup with all-MiniLM-L6-v2, about 1 ms once frozen.
        What loading allocated and freed is handed back too, so serving starts
        from the model's real footprint (jemalloc keeps free pages until asked:
        21 MB with the bundled model in the service, 167 MB loading it in a script).
        """
        self._heap.collect()
        self._heap.freeze()
        self._heap.release()
        log.info("memory.gc_frozen", objects=gc.get_freeze_count(), rss_bytes=self._sampler.rss())

    def observe_batch(self, stats: BatchStats) -> None:
        """Record the RSS change of one batch."""
        self._metrics.batch_memory_delta.observe(stats.rss_delta_bytes)
        self._worked = True

    def _trim_after_batch(self) -> bool:
        """Give free heap back, at most once per interval; whether it did."""
        now = self._clock()
        if now < self._next_trim_at:
            return False
        started = time.perf_counter()
        before = self._sampler.rss()
        if not self._heap.release():
            self._next_trim_at = float("inf")  # no allocator to ask: nothing to trim, ever
            return False
        after = self._sampler.rss()
        took = time.perf_counter() - started
        # At most one per interval: what a trim hands back, the next batches fault in again.
        # And under TRIM_MAX_SHARE of the time, however slow the trim.
        self._next_trim_at = now + max(self._settings.trim_interval_s, took / TRIM_MAX_SHARE)
        self._metrics.trims.inc()
        self._metrics.trimmed_bytes.inc(max(0, before - after))
        return True

    # --- cleanups ------------------------------------------------------------------------

    def manual_cleanup(self) -> CleanupRecord:
        """``POST /cleanup`` (:meth:`Cleaner.manual`)."""
        return self.cleaner.manual()

    def cleanup(self, reason: CleanupReason) -> CleanupRecord:
        """Run one cleanup now; raise :class:`CleanupInProgress` (409) if one is running."""
        return self.cleaner.run(reason)

    # --- reading --------------------------------------------------------------------------

    def _budget_report(self) -> dict[str, Any]:
        """The budget as ``GET /memory`` and the ``memory.budget`` log line show it (null until derived)."""
        derived = (
            asdict(self.budget.derived)
            if self.budget.derived
            else dict.fromkeys(("ceiling_bytes", "baseline_bytes", "batch_reserve_bytes", "max_batch_tokens"))
        )
        derived.pop("capacity_bytes", None)
        cost = self.budget.cost
        return {
            **derived,
            "capacity_bytes": self.budget.capacity,
            "used_bytes": self.budget.used,
            "peak_bytes": self.budget.peak,
            "activation_bytes_per_token": cost.activation_bytes_per_token if cost else None,
            "source": "config" if self._settings.memory_budget_bytes is not None else "derived",
        }

    def _read_breakdown(self) -> Breakdown:
        name, accounts = allocator_accounts()
        info = self._engine.info
        return Breakdown(
            rss_by_kind(), name, accounts, self._python_objects.sample(), info.weight_bytes if info else None
        )

    def breakdown(self) -> dict[str, Any]:
        """Where the memory is (app/breakdown.py)."""
        return self._read_breakdown().to_dict()

    def report(self) -> dict[str, Any]:
        """Everything ``GET /memory`` shows; reads, writes no gauge."""
        sample = self._sampler.full()
        last, counts, ineffective = self.cleaner.history()
        cuda = None
        if sample.cuda_allocated_bytes is not None:
            cuda = {"allocated_bytes": sample.cuda_allocated_bytes, "reserved_bytes": sample.cuda_reserved_bytes}
        return {
            "status": self.status.classify(sample.rss_bytes),
            "policy": self.policy,
            "allocator": self.allocator,
            "rss_bytes": sample.rss_bytes,
            "uss_bytes": sample.uss_bytes,
            "breakdown": self.breakdown(),
            "cuda": cuda,
            "thresholds": {
                "elevated_bytes": self._settings.memory_elevated_bytes,
                "high_bytes": self._settings.memory_high_bytes,
                "limit_bytes": self.limit_bytes,
                "limit_source": self.limit_source,
            },
            "cgroup_limit_bytes": self.cgroup_limit_bytes,
            "shedding": self.shedder is not None and self.shedder.shedding,
            "budget": self._budget_report(),
            "cleanup_running": self.cleaner.running,
            "last_cleanup": last,
            "cleanups": counts,
            "ineffective_cleanups": ineffective,
            "requests_since_cleanup": self.triggers.state().requests_since_cleanup,
            "triggers": {
                "interval_s": self._settings.cleanup_interval_s,
                "every_requests": self._settings.cleanup_every_requests,
                "cooldown_s": self._settings.cleanup_cooldown_s,
                "monitor_interval_s": self._settings.monitor_interval_s,
                "trim_after_batch": self.trim_after_batch,
                "trim_interval_s": self._settings.trim_interval_s,
            },
        }
