"""Recent request activity, per minute, so operators (and ops/upgrade.sh) can tell a busy service from an idle one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

WINDOW_MINUTES = 24 * 60
OPS_CHECK_HEADER = "X-Ops-Check"
"""An embedding request with this header is not counted: ops/service.sh's and ops/upgrade.sh's own check
that a version serves must not make the next upgrade see the service as in use."""


class ActivityTracker:
    """Counts embedding requests in one-minute buckets over the last day."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets = [0] * WINDOW_MINUTES
        self._stamps = [-1] * WINDOW_MINUTES  # which minute each bucket holds
        self.last_request_at: float | None = None

    def record(self) -> None:
        """Count one request now."""
        now = self._clock()
        minute = int(now // 60)
        slot = minute % WINDOW_MINUTES
        with self._lock:
            if self._stamps[slot] != minute:
                self._stamps[slot], self._buckets[slot] = minute, 0
            self._buckets[slot] += 1
            self.last_request_at = now

    def requests_within(self, minutes: int) -> int:
        """Requests in the current minute and the ``minutes - 1`` before it (at most a day)."""
        current = int(self._clock() // 60)
        oldest = current - min(max(minutes, 1), WINDOW_MINUTES) + 1
        with self._lock:
            return sum(n for n, stamp in zip(self._buckets, self._stamps, strict=True) if oldest <= stamp <= current)
