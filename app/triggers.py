"""When automatic cleanups run: the triggers' state behind one lock, and pure policies that read it.

Four kinds of thread touch the triggers: request threads count, the monitor decides and asks for a cleanup,
the inference thread takes that request between two batches, and whichever thread ran a cleanup resets the
counters. :class:`Triggers` owns that state; every change is one call under its lock, so a cleanup asked for
while the inference thread takes the previous one is never lost, and the threshold's cooldown starts in the
same step that decided it.

A :class:`Policy` (``EMBEDDING_MEMORY_POLICY``) only answers questions: given the settings, a snapshot of the
triggers, RSS and the time, which cleanup is due (or none), and how long until one falls due by time alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from app.config import Settings
from app.reasons import CleanupReason, MemoryPolicy

LEGACY_THRESHOLD_BYTES = 1_500_000_000
"""The old service ran ``gc.collect()`` on every request above this RSS."""


@dataclass(frozen=True)
class TriggerState:
    """The triggers at one moment, as a policy reads them."""

    requests_since_cleanup: int
    last_cleanup_at: float
    last_threshold_at: float | None


class Policy:
    """One ``EMBEDDING_MEMORY_POLICY``: which automatic cleanups it runs and when. Pure: it reads what it is
    given and changes nothing; the memory manager does the rest the same way for all (manual cleanups, the
    hard limit, shedding, the status and the metrics)."""

    name: ClassVar[MemoryPolicy]
    freezes_startup_objects: ClassVar[bool] = False
    """``gc.freeze()`` the model's objects once it is loaded, so that full collections stop walking them."""
    trims_between_batches: ClassVar[bool] = False
    """Give freed heap back to the OS between batches (``EMBEDDING_TRIM_AFTER_BATCH`` can still turn it off)."""
    wakes_monitor_on_count: ClassVar[bool] = False
    """Wake the monitor once ``EMBEDDING_CLEANUP_EVERY_REQUESTS`` requests have been admitted."""

    def on_request(self, rss: Callable[[], int]) -> CleanupReason | None:
        """A cleanup to run on the request's own thread before it is queued, if any (``rss`` reads RSS)."""
        return None

    def due_reason(self, settings: Settings, state: TriggerState, rss: int, now: float) -> CleanupReason | None:
        """Which automatic cleanup a monitor pass should run now, if any."""
        return None

    def seconds_to_next_cleanup(self, settings: Settings, state: TriggerState, now: float) -> float | None:
        """How long the monitor may sleep before a cleanup falls due by time alone (None: never)."""
        return None


class SmartPolicy(Policy):
    """Every trigger: RSS over the high threshold (once per cooldown), every N requests, every interval;
    trims between batches; runs cleanups on the monitor thread or between batches, never on a request."""

    name = MemoryPolicy.SMART
    freezes_startup_objects = True
    trims_between_batches = True
    wakes_monitor_on_count = True

    def due_reason(self, settings: Settings, state: TriggerState, rss: int, now: float) -> CleanupReason | None:
        if rss > settings.memory_high_bytes and (
            state.last_threshold_at is None or now - state.last_threshold_at >= settings.cleanup_cooldown_s
        ):
            return CleanupReason.THRESHOLD
        if state.requests_since_cleanup >= settings.cleanup_every_requests:
            return CleanupReason.REQUEST_COUNT
        if now - state.last_cleanup_at >= settings.cleanup_interval_s:
            return CleanupReason.PERIODIC
        return None

    def seconds_to_next_cleanup(self, settings: Settings, state: TriggerState, now: float) -> float | None:
        return state.last_cleanup_at + settings.cleanup_interval_s - now


class LegacyPolicy(Policy):
    """The old service's behaviour, kept for comparison: a plain ``gc.collect()`` on every request once RSS is
    above 1.5 GB, on the request's own thread."""

    name = MemoryPolicy.LEGACY

    def on_request(self, rss: Callable[[], int]) -> CleanupReason | None:
        return CleanupReason.LEGACY if rss() > LEGACY_THRESHOLD_BYTES else None


class OffPolicy(Policy):
    """No automatic cleanup: only ``POST /cleanup`` and the hard limit run one."""

    name = MemoryPolicy.OFF


POLICIES: dict[MemoryPolicy, Policy] = {p.name: p for p in (SmartPolicy(), LegacyPolicy(), OffPolicy())}


class Triggers:
    """Requests since the last cleanup, when it and the threshold's last one ran, and the cleanup asked of the
    inference thread: one lock, each change one call."""

    def __init__(self, policy: Policy, settings: Settings, now: float) -> None:
        self._policy = policy
        self._settings = settings
        self._lock = threading.Lock()
        self._requests = 0
        self._last_cleanup_at = now
        self._last_threshold_at: float | None = None
        self._pending: CleanupReason | None = None
        self._in_hand = False  # the inference thread took the asked-for cleanup and runs it

    def count_request(self) -> bool:
        """One request admitted; whether it is the one that makes ``EMBEDDING_CLEANUP_EVERY_REQUESTS`` since the
        last cleanup: the monitor is woken once for the count, not by every request that follows until the
        cleanup has run (each wake is a full memory sample: under 16 single-text clients that was a quarter of a
        core taken from the model)."""
        with self._lock:
            self._requests += 1
            return self._requests == self._settings.cleanup_every_requests

    def state(self) -> TriggerState:
        with self._lock:
            return TriggerState(self._requests, self._last_cleanup_at, self._last_threshold_at)

    def decide(self, rss: int, now: float) -> CleanupReason | None:
        """The policy's due cleanup, if any; a threshold cleanup's cooldown starts in the same step. None while a
        cleanup asked for earlier waits or runs: it does the work, and the counters it resets are not yet."""
        with self._lock:
            if self._pending is not None or self._in_hand:
                return None
            state = TriggerState(self._requests, self._last_cleanup_at, self._last_threshold_at)
            reason = self._policy.due_reason(self._settings, state, rss, now)
            if reason is CleanupReason.THRESHOLD:
                self._last_threshold_at = now
            return reason

    def seconds_to_next_cleanup(self, now: float) -> float | None:
        return self._policy.seconds_to_next_cleanup(self._settings, self.state(), now)

    def ask(self, reason: CleanupReason) -> bool:
        """Ask the inference thread for a cleanup after its batch; False when one is already asked for (that one
        does the same work: the reason asked first is the one it runs and counts)."""
        with self._lock:
            if self._pending is not None:
                return False
            self._pending = reason
            return True

    def take(self) -> CleanupReason | None:
        """The cleanup asked for, if any, now the caller's to run; call :meth:`done` when it has."""
        with self._lock:
            reason, self._pending = self._pending, None
            self._in_hand = reason is not None
            return reason

    def done(self) -> None:
        """The cleanup taken has run (or was skipped, or failed): the monitor may decide again."""
        with self._lock:
            self._in_hand = False

    @property
    def pending(self) -> CleanupReason | None:
        return self._pending

    def requests(self) -> int:
        """Requests admitted since the last cleanup (what a cleanup starting now covers)."""
        with self._lock:
            return self._requests

    def cleaned(self, counted: int, now: float) -> None:
        """A cleanup covering ``counted`` requests ended: later ones count toward the next."""
        with self._lock:
            self._requests = max(0, self._requests - counted)
            self._last_cleanup_at = now
