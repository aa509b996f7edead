"""Shedding: refusing new embedding requests (503, ``Retry-After``) while RSS is above the hard limit.

Request threads (admission), the readiness probe and the monitor all see RSS and may start or stop shedding.
:class:`Shedder` owns the flag, when it started, when memory was last given back for the limit, and the
engine's batch limit that goes with the flag: all changed under one lock, so two threads that see RSS on
either side of the limit cannot leave the engine on one-text batches while no longer shedding (or the other
way round), and only one of them purges per interval.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import Enum
from typing import Protocol

import structlog

log = structlog.get_logger("app.memory")

SHED_RELEASE_INTERVAL_S = 0.5
"""Above the hard limit, free heap goes back to the OS at most this often between full cleanups, on the
request path and from the monitor, batches or not (a purge takes about 7 ms on a 600 MB heap)."""

SHED_MARGIN_SHARE = 0.05
"""Shedding starts above the hard limit and stops only below it by this share of the limit (at most half the
room between the warmed baseline and the limit), so that RSS wavering at the limit does not flap it."""

SHED_MIN_S = 5.0
"""Shedding, once started, lasts at least this long."""


class Release(Enum):
    """What to give back for the limit now."""

    CLEANUP = "cleanup"  # a full cleanup (once per cooldown)
    PURGE = "purge"  # the allocator's free pages only (at most every SHED_RELEASE_INTERVAL_S)


class BatchLimit(Protocol):
    def limit_batch_tokens(self, tokens: int | None) -> None: ...


class Shedder:
    """Whether new requests are shed, against one hard limit."""

    def __init__(
        self,
        limit_bytes: int,
        *,
        engine: BatchLimit,
        clock: Callable[[], float],
        cooldown_s: float,
        baseline: Callable[[], int | None],
        batch_tokens: Callable[[], int | None],
        min_s: float = SHED_MIN_S,
    ) -> None:
        self.limit_bytes = limit_bytes
        self._engine = engine
        self._clock = clock
        self._cooldown_s = cooldown_s
        self._baseline = baseline  # the warmed baseline, once measured
        self._batch_tokens = batch_tokens  # the budget's batch limit, once derived (None: the setting's)
        self._min_s = min_s
        self._lock = threading.Lock()
        self._shedding = False
        self._since = 0.0
        self._last_cleanup_at: float | None = None
        self._last_release_at: float | None = None

    @property
    def shedding(self) -> bool:
        return self._shedding

    def margin(self) -> int:
        """How far under the hard limit RSS must fall before shedding stops."""
        limit = self.limit_bytes
        margin = SHED_MARGIN_SHARE * limit
        baseline = self._baseline()
        if baseline is not None and baseline < limit:
            margin = min(margin, (limit - baseline) / 2)
        return int(margin)

    def short_of(self, rss: int) -> bool:
        """Whether memory must be given back: above the limit, or while shedding not yet under it by the margin
        (purges until then, or shedding would wait for the next cleanup with memory just under the limit)."""
        return rss > self.limit_bytes or (self._shedding and rss >= self.limit_bytes - self.margin())

    def release_due(self) -> Release | None:
        """What to give back now: a full cleanup once per cooldown, else a purge at most every 0.5 s, else nothing
        (another thread has just done it). Decided and recorded in one step."""
        now = self._clock()
        with self._lock:
            if self._last_cleanup_at is None or now - self._last_cleanup_at >= self._cooldown_s:
                self._last_cleanup_at = self._last_release_at = now
                return Release.CLEANUP
            if self._last_release_at is None or now - self._last_release_at >= SHED_RELEASE_INTERVAL_S:
                self._last_release_at = now
                return Release.PURGE
            return None

    def update(self, rss: int, *, idle: bool = False) -> bool:
        """Start shedding above the limit, stop it below the limit less a margin once it has lasted
        ``SHED_MIN_S``; True while shedding. While it lasts, the engine runs its smallest batches. With no work
        in flight (``idle``) nothing can take memory back up: under the limit is enough then, so memory that
        stays just under it after a purge is not a replica kept out of the balancer for good."""
        limit = self.limit_bytes
        now = self._clock()
        with self._lock:
            under = rss < limit - self.margin() or (idle and rss <= limit)
            if not self._shedding and rss > limit:
                self._shedding, self._since = True, now
                self._engine.limit_batch_tokens(1)  # one text at a time: the least activation memory
                log.warning("memory.shedding_started", rss_bytes=rss, limit_bytes=limit)
            elif self._shedding and under and now - self._since >= self._min_s:
                self._shedding = False
                self._engine.limit_batch_tokens(self._batch_tokens())
                log.info("memory.shedding_stopped", rss_bytes=rss, limit_bytes=limit)
            return self._shedding
