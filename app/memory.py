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
monitor thread samples and decides; a cleanup runs on the monitor thread when
the engine is idle, else on the inference thread between batches. A lock keeps
cleanups from overlapping; a second request for one while one runs is refused.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import psutil
import structlog
from pydantic import ConfigDict, computed_field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from app import allocator
from app.backend import ModelInfo
from app.breakdown import PythonObjects, allocator_accounts, free_but_kept, rss_by_kind
from app.budget import CostModel, MemoryBudget, derive, provisional_capacity
from app.config import Settings
from app.engine import BatchStats
from app.errors import Conflict, TooManyRequests, Unavailable
from app.metrics import Metrics
from app.reasons import CleanupReason, MemoryPolicy

log = structlog.get_logger("app.memory")

STATUSES = ("normal", "elevated", "high")
LEGACY_THRESHOLD_BYTES = 1_500_000_000
"""The old service ran ``gc.collect()`` on every request above this RSS."""

INEFFECTIVE_BELOW_BYTES = 1024 * 1024
"""A cleanup that gives back less than this to the operating system is counted as ineffective."""

CGROUP_LIMIT_SHARE = 0.9
"""Without EMBEDDING_MEMORY_LIMIT_BYTES, shed load above this share of the container's memory limit."""

SHED_RELEASE_INTERVAL_S = 0.5
"""Above the hard limit, free heap goes back to the OS at most this often between full cleanups, on the
request path and from the monitor, batches or not (a purge takes about 7 ms on a 600 MB heap)."""

SHED_CHECK_INTERVAL_S = 0.5
"""While shedding, the monitor re-checks memory this often, so an idle service stops shedding by itself."""

SHED_MARGIN_SHARE = 0.05
"""Shedding starts above the hard limit and stops only below it by this share of the limit (at most half the
room between the warmed baseline and the limit), so that RSS wavering at the limit does not flap it."""

SHED_MIN_S = 5.0
"""Shedding, once started, lasts at least this long."""

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
    """What a cleanup does to the process itself: the garbage collector and the C allocator. Injected into
    :class:`MemoryManager`, so unit tests record the actions instead of purging the test process's heap."""

    collect: Callable[[], int] = collect_garbage  # full collections; objects freed
    collect_once: Callable[[], int] = gc.collect  # the legacy policy's one plain gc.collect()
    freeze: Callable[[], None] = gc.freeze  # the loaded model's objects out of the collector's reach
    release: Callable[[], bool] = allocator.release_free_memory  # free memory back to the OS; False: cannot


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


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class CleanupRecord:
    """What one cleanup did; the answer of ``POST /cleanup`` and the ``memory.cleanup`` log event.

    A pydantic dataclass so that ``/openapi.json`` describes ``POST /cleanup`` from this definition.
    """

    reason: CleanupReason
    started_at: float
    duration_s: float
    rss_before_bytes: int
    rss_after_bytes: int
    freed_objects: int
    trimmed: bool
    reduced_bytes: dict[str, int] = field(default_factory=dict)
    """Which accounts the cleanup reduced, and by how much (before minus after; app/breakdown.py): RSS kinds
    (``anon``, ``file``) and the allocator's (``jemalloc.resident``, ``glibc.free``, ...). Only decreases."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def freed_bytes(self) -> int:
        return self.rss_before_bytes - self.rss_after_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def effective(self) -> bool:
        return self.freed_bytes >= INEFFECTIVE_BELOW_BYTES

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "freed_bytes": self.freed_bytes, "effective": self.effective}


class CleanupInProgress(Conflict):
    """A cleanup was asked for while another one runs."""


# --- policies: when automatic cleanups run ---------------------------------------------


class Policy:
    """One ``EMBEDDING_MEMORY_POLICY``: which automatic cleanups it runs and when. The manager asks its policy
    at three points (a request admitted, a monitor pass, the monitor's next wake-up) and does the rest the same
    way for all: manual cleanups, the hard limit, shedding, the status and the metrics.
    """

    name: ClassVar[MemoryPolicy]
    freezes_startup_objects: ClassVar[bool] = False
    """``gc.freeze()`` the model's objects once it is loaded, so that full collections stop walking them."""
    trims_between_batches: ClassVar[bool] = False
    """Give freed heap back to the OS between batches (``EMBEDDING_TRIM_AFTER_BATCH`` can still turn it off)."""

    def on_request(self, manager: MemoryManager, *, count_due: bool) -> None:
        """A request was admitted; ``count_due`` once ``EMBEDDING_CLEANUP_EVERY_REQUESTS`` have been."""

    def due_reason(self, manager: MemoryManager, rss: int, now: float) -> CleanupReason | None:
        """Which automatic cleanup a monitor pass should run now, if any."""
        return None

    def seconds_to_next_cleanup(self, manager: MemoryManager, now: float) -> float | None:
        """How long the monitor may sleep before a cleanup falls due by time alone (None: never)."""
        return None


class SmartPolicy(Policy):
    """Every trigger: RSS over the high threshold (once per cooldown), every N requests, every interval;
    trims between batches; runs cleanups on the monitor thread or between batches, never on a request."""

    name = MemoryPolicy.SMART
    freezes_startup_objects = True
    trims_between_batches = True

    def on_request(self, manager: MemoryManager, *, count_due: bool) -> None:
        if count_due:
            manager.wake_monitor()

    def due_reason(self, manager: MemoryManager, rss: int, now: float) -> CleanupReason | None:
        settings, last_threshold_at = manager.settings, manager.last_threshold_at
        if rss > settings.memory_high_bytes and (
            last_threshold_at is None or now - last_threshold_at >= settings.cleanup_cooldown_s
        ):
            return CleanupReason.THRESHOLD
        if manager.requests_since_cleanup >= settings.cleanup_every_requests:
            return CleanupReason.REQUEST_COUNT
        if now - manager.last_cleanup_at >= settings.cleanup_interval_s:
            return CleanupReason.PERIODIC
        return None

    def seconds_to_next_cleanup(self, manager: MemoryManager, now: float) -> float | None:
        return manager.last_cleanup_at + manager.settings.cleanup_interval_s - now


class LegacyPolicy(Policy):
    """The old service's behaviour, kept for comparison: a plain ``gc.collect()`` on every request once RSS is
    above 1.5 GB, on the request's own thread."""

    name = MemoryPolicy.LEGACY

    def on_request(self, manager: MemoryManager, *, count_due: bool) -> None:
        if manager.rss() > LEGACY_THRESHOLD_BYTES:
            manager.try_cleanup(CleanupReason.LEGACY)


class OffPolicy(Policy):
    """No automatic cleanup: only ``POST /cleanup`` and the hard limit run one."""

    name = MemoryPolicy.OFF


POLICIES: dict[MemoryPolicy, Policy] = {p.name: p for p in (SmartPolicy(), LegacyPolicy(), OffPolicy())}


def _accounts() -> dict[str, int]:
    """RSS kinds and allocator accounts in one flat mapping, to compare before and after a cleanup."""
    flat: dict[str, int] = {}
    kinds = rss_by_kind(shared=False)
    if kinds is not None:
        flat.update(anon=kinds.anon, file=kinds.file)
    name, accounts = allocator_accounts()
    flat.update({f"{name}.{account}": value for account, value in accounts.items()})
    return flat


# --- the manager ------------------------------------------------------------------


class MemoryManager:
    """Decides when to clean up, runs cleanups one at a time, and reports memory."""

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
        self._wall = wall_clock
        self._cleanup_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.allocator = allocator.active()
        self.trim_after_batch = self._policy.trims_between_batches and settings.trim_after_batch
        self._next_trim_at = 0.0
        self._worked = False  # batches ran since the last trim while idle
        self._requests_since = 0
        self._last_cleanup_at = clock()
        self._last_threshold_at: float | None = None
        self._last_limit_at: float | None = None
        self._last_manual_at: float | None = None
        self._last_release_at: float | None = None
        self._release_lock = threading.Lock()
        self._pending: CleanupReason | None = None
        self._status: str | None = None
        self._shedding = False
        self._shedding_since = 0.0
        self.baseline_bytes: int | None = None
        """RSS once the model is loaded, warmed up and its load garbage given back (the budget's floor)."""
        self._last: CleanupRecord | None = None
        self._counts: Counter[CleanupReason] = Counter()
        self._ineffective: Counter[CleanupReason] = Counter()
        self.cgroup_limit_bytes = cgroup_limit()
        self.limit_bytes, self.limit_source = self._hard_limit()
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
        """Hook into the engine and start the monitor thread."""
        self._log_allocator()
        if self._policy.freezes_startup_objects:
            self._engine.add_ready_hook(self.freeze_startup_objects)
        self._engine.add_ready_hook(self.derive_budget)
        self._engine.add_between_batches_hook(self.between_batches)
        self._engine.add_idle_hook(self.on_idle)
        self._engine.add_batch_observer(self.observe_batch)
        self._update_status(self._sampler.rss())
        self.breakdown()  # the breakdown's gauges have values from the start, not from the first monitor pass
        self._thread = threading.Thread(target=self._monitor, name="memory-monitor", daemon=True)
        self._thread.start()

    def _log_allocator(self) -> None:
        requested = self._settings.allocator
        fields = {"allocator": self.allocator, "requested": requested, "trim_after_batch": self.trim_after_batch}
        if requested == "jemalloc" and self.allocator != "jemalloc":
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
        """Called for every embedding request before it is queued: shed load above the limit, count it."""
        if self.limit_bytes is not None:
            self._shed_above_limit(self.limit_bytes)
        with self._state_lock:
            self._requests_since += 1
            due = self._requests_since >= self._settings.cleanup_every_requests
        self._policy.on_request(self, count_due=due)

    def _shed_above_limit(self, limit: int) -> None:
        rss = self._sampler.rss()
        if self._short_of(rss, limit):
            rss = self._release_for_limit()  # re-checked after giving back what can be, before refusing
        if not self._update_shedding(rss, limit):
            return
        self._metrics.rejected.labels(reason="memory").inc()
        raise Unavailable(
            f"memory use ({rss} bytes) is above the service's limit ({limit} bytes); retry shortly",
            retry_after_s=5,
        )

    def over_limit(self) -> bool:
        """For readiness: whether RSS is above the hard limit, so that new requests would be shed. Starts or
        ends shedding as a request would, but gives nothing back on the caller's thread: the monitor, woken,
        does that every 0.5 s while shedding."""
        limit = self.limit_bytes
        if limit is None:
            return False
        above = self._update_shedding(self._sampler.rss(), limit)
        if above:
            self._wake.set()
        return above

    def _release_for_limit(self) -> int:
        """Above the hard limit: a full cleanup once per cooldown, else a purge at most every 0.5 s; RSS after."""
        now = self._clock()
        if self._last_limit_at is None or now - self._last_limit_at >= self._settings.cleanup_cooldown_s:
            self._last_limit_at = self._last_release_at = now
            self.try_cleanup(CleanupReason.LIMIT)
        elif (
            self._last_release_at is None or now - self._last_release_at >= SHED_RELEASE_INTERVAL_S
        ) and self._release_lock.acquire(blocking=False):
            try:
                self._last_release_at = now
                self._heap.release()
            finally:
                self._release_lock.release()
        return self._sampler.rss()

    def _short_of(self, rss: int, limit: int) -> bool:
        """Whether memory must be given back: above the limit, or while shedding not yet under it by the margin
        (purges until then, or shedding would wait for the next cleanup with memory just under the limit)."""
        return rss > limit or (self._shedding and rss >= limit - self.shed_margin(limit))

    def _update_shedding(self, rss: int, limit: int, idle: bool = False) -> bool:
        """Start shedding above the limit, stop it below the limit less a margin once it has lasted
        ``SHED_MIN_S``; True while shedding. While it lasts, the engine runs its smallest batches. With no work
        in flight (``idle``) nothing can take memory back up: under the limit is enough then, so memory that
        stays just under it after a purge is not a replica kept out of the balancer for good."""
        now = self._clock()
        with self._state_lock:
            under = rss < limit - self.shed_margin(limit) or (idle and rss <= limit)
            if not self._shedding and rss > limit:
                self._shedding, self._shedding_since, changed = True, now, True
            elif self._shedding and under and now - self._shedding_since >= SHED_MIN_S:
                self._shedding, changed = False, True
            else:
                changed = False
            shedding = self._shedding
        if changed and shedding:
            self._engine.limit_batch_tokens(1)  # one text at a time: the least activation memory
            log.warning("memory.shedding_started", rss_bytes=rss, limit_bytes=limit)
        elif changed:
            derived = self.budget.derived
            self._engine.limit_batch_tokens(derived.max_batch_tokens if derived else None)
            log.info("memory.shedding_stopped", rss_bytes=rss, limit_bytes=limit)
        return shedding

    def shed_margin(self, limit: int) -> int:
        """How far under the hard limit RSS must fall before shedding stops."""
        margin = SHED_MARGIN_SHARE * limit
        if self.baseline_bytes is not None and self.baseline_bytes < limit:
            margin = min(margin, (limit - self.baseline_bytes) / 2)
        return int(margin)

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

    # --- decisions (monitor thread) --------------------------------------------------

    def due_reason(self, rss: int) -> CleanupReason | None:
        """Which automatic cleanup is due now, if any: the policy decides."""
        return self._policy.due_reason(self, rss, self._clock())

    # What a policy reads and does (see Policy).

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def requests_since_cleanup(self) -> int:
        return self._requests_since

    @property
    def last_cleanup_at(self) -> float:
        return self._last_cleanup_at

    @property
    def last_threshold_at(self) -> float | None:
        return self._last_threshold_at

    def rss(self) -> int:
        return self._sampler.rss()

    def wake_monitor(self) -> None:
        self._wake.set()

    def tick(self) -> CleanupReason | None:
        """One monitor pass: sample, update the status, run or schedule a due cleanup."""
        sample = self._sampler.full()
        self._metrics.memory_uss.set(sample.uss_bytes or 0)
        self.breakdown()
        rss = sample.rss_bytes
        if self._shedding and self.limit_bytes is not None:
            # Idle or not, give back what can be and stop shedding as soon as memory is under the limit.
            rss = self._release_for_limit() if self._short_of(rss, self.limit_bytes) else rss
            idle = self._engine.is_idle() and self.budget.used == 0
            self._update_shedding(rss, self.limit_bytes, idle=idle)
        self._update_status(rss)
        reason = self.due_reason(rss)
        if reason is None:
            return None
        if reason is CleanupReason.THRESHOLD:
            self._last_threshold_at = self._clock()
        if self._engine.is_idle():
            self.try_cleanup(reason)
        else:
            self._pending = reason  # the inference thread runs it after its current batch
        return reason

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
        if self._shedding:
            wait = min(wait, SHED_CHECK_INTERVAL_S)
        until_due = self._policy.seconds_to_next_cleanup(self, self._clock())
        if until_due is not None:
            wait = min(wait, max(until_due, 0.01))
        return wait

    # --- inference-thread hooks ---------------------------------------------------------

    def between_batches(self) -> None:
        """After each batch: run a pending cleanup, or else (``smart``) trim the heap."""
        if self._pending is not None:
            self.run_pending()
        elif self.trim_after_batch:
            self._trim_after_batch()

    def on_idle(self) -> None:
        """While the engine is idle (about every second): a pending cleanup, else (``smart``) one trim once the
        requests of a burst are all answered, so that what they freed goes back now, not at the next cleanup
        (under jemalloc freed pages otherwise stay until a purge)."""
        if self._pending is not None:
            self.run_pending()
        elif self.trim_after_batch and self._worked and self.budget.used == 0 and self._trim_after_batch():
            self._worked = False

    def run_pending(self) -> None:
        """Run the cleanup the monitor asked for, if any."""
        reason, self._pending = self._pending, None
        if reason is not None:
            self.try_cleanup(reason)

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

    # --- the cleanup ---------------------------------------------------------------------

    def manual_cleanup(self) -> CleanupRecord:
        """``POST /cleanup``: a cleanup now, at most one per ``EMBEDDING_MANUAL_CLEANUP_INTERVAL_S`` (else 429)."""
        interval = self._settings.manual_cleanup_interval_s
        with self._state_lock:
            now = self._clock()
            if self._last_manual_at is not None and now - self._last_manual_at < interval:
                wait = interval - (now - self._last_manual_at)
                raise TooManyRequests(
                    f"a manual cleanup ran {now - self._last_manual_at:.1f} s ago; at most one every {interval:g} s "
                    "(EMBEDDING_MANUAL_CLEANUP_INTERVAL_S)",
                    retry_after_s=max(1, math.ceil(wait)),
                )
            self._last_manual_at = now
        return self.cleanup(CleanupReason.MANUAL)

    def cleanup(self, reason: CleanupReason) -> CleanupRecord:
        """Run one cleanup now; raise :class:`CleanupInProgress` (409) if one is running."""
        if not self._cleanup_lock.acquire(blocking=False):
            log.info("memory.cleanup_skipped", reason=reason, why="another cleanup is running")
            raise CleanupInProgress("a cleanup is already running; try again when it has finished")
        try:
            # The old service's gc.collect() ran beside the model; every other cleanup holds the model
            # between two batches so it never competes with one.
            with contextlib.nullcontext() if reason is CleanupReason.LEGACY else self._engine.exclusive():
                with self._state_lock:
                    counted = self._requests_since  # requests admitted from here on count toward the next one
                record = self._run_cleanup(reason)
        finally:
            self._cleanup_lock.release()
        self._record(record, counted)
        return record

    def try_cleanup(self, reason: CleanupReason) -> CleanupRecord | None:
        """Clean up now unless a cleanup is already running (which does the same work): None then."""
        try:
            return self.cleanup(reason)
        except CleanupInProgress:
            return None  # the running one does the same work

    def _run_cleanup(self, reason: CleanupReason) -> CleanupRecord:
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
        with self._state_lock:
            self._requests_since = max(0, self._requests_since - counted)
            self._last_cleanup_at = self._clock()
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
        self._update_status(record.rss_after_bytes)

    # --- status ----------------------------------------------------------------------------

    def classify(self, rss: int) -> str:
        """normal below the elevated threshold, elevated up to the high one, high above it."""
        if rss > self._settings.memory_high_bytes:
            return "high"
        if rss > self._settings.memory_elevated_bytes:
            return "elevated"
        return "normal"

    def _update_status(self, rss: int) -> str:
        status = self.classify(rss)
        with self._state_lock:
            previous, self._status = self._status, status
        if status != previous:
            for name in STATUSES:
                self._metrics.memory_status.labels(status=name).set(1 if name == status else 0)
            if previous is not None:
                log.info("memory.status_changed", previous=previous, status=status, rss_bytes=rss)
        return status

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

    def breakdown(self) -> dict[str, Any]:
        """Where the memory is (app/breakdown.py); also sets the breakdown's gauges."""
        kinds = rss_by_kind()
        name, accounts = allocator_accounts()
        if kinds is not None:
            for kind in ("anon", "file", "shmem", "swap"):
                self._metrics.memory_by_kind.labels(kind=kind).set(getattr(kinds, kind))
        for account, value in accounts.items():
            self._metrics.allocator_bytes.labels(allocator=name, account=account).set(value)
        python = self._python_objects.sample()
        for generation, count in python.gc_tracked_objects.items():
            self._metrics.gc_tracked_objects.labels(generation=generation).set(count)
        self._metrics.python_allocated_blocks.set(python.allocated_blocks)
        return {
            "rss_by_kind": None if kinds is None else asdict(kinds),
            "allocator": {"name": name, "accounts": accounts, "free_but_kept_bytes": free_but_kept(name, accounts)},
            "python": asdict(python),
            "weight_bytes": self._engine.info.weight_bytes if self._engine.info else None,
        }

    def report(self) -> dict[str, Any]:
        """Everything ``GET /memory`` shows."""
        sample = self._sampler.full()
        self._metrics.memory_uss.set(sample.uss_bytes or 0)
        status = self._update_status(sample.rss_bytes)
        with self._state_lock:
            last = self._last.to_dict() if self._last else None
            counts, ineffective = dict(self._counts), dict(self._ineffective)
            requests_since = self._requests_since
        cuda = None
        if sample.cuda_allocated_bytes is not None:
            cuda = {"allocated_bytes": sample.cuda_allocated_bytes, "reserved_bytes": sample.cuda_reserved_bytes}
        return {
            "status": status,
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
            "shedding": self._shedding,
            "budget": self._budget_report(),
            "cleanup_running": self._cleanup_lock.locked(),
            "last_cleanup": last,
            "cleanups": counts,
            "ineffective_cleanups": ineffective,
            "requests_since_cleanup": requests_since,
            "triggers": {
                "interval_s": self._settings.cleanup_interval_s,
                "every_requests": self._settings.cleanup_every_requests,
                "cooldown_s": self._settings.cleanup_cooldown_s,
                "monitor_interval_s": self._settings.monitor_interval_s,
                "trim_after_batch": self.trim_after_batch,
                "trim_interval_s": self._settings.trim_interval_s,
            },
        }
