"""The memory manager's vocabulary: why a cleanup ran, and which policy decides when.

One definition, used by the memory manager, its metrics (pre-registered per policy), the settings, the
load-test sampler and the verdict plot. Members are strings (``StrEnum``), so they compare equal to,
log as and label metrics with their values.
"""

from __future__ import annotations

from enum import StrEnum


class CleanupReason(StrEnum):
    THRESHOLD = "threshold"  # RSS above EMBEDDING_MEMORY_HIGH_BYTES (once per cooldown)
    PERIODIC = "periodic"  # EMBEDDING_CLEANUP_INTERVAL_S since the last cleanup
    REQUEST_COUNT = "request_count"  # EMBEDDING_CLEANUP_EVERY_REQUESTS requests since the last cleanup
    MANUAL = "manual"  # POST /cleanup
    LIMIT = "limit"  # RSS above the hard limit, before shedding load
    LEGACY = "legacy"  # the old service's gc.collect() on every request above 1.5 GB


class MemoryPolicy(StrEnum):
    SMART = "smart"  # every trigger, trims between batches
    LEGACY = "legacy"  # the old service's behaviour, for comparison
    OFF = "off"  # no automatic cleanup (manual and the hard limit only)

    @property
    def reasons(self) -> tuple[CleanupReason, ...]:
        """The cleanups this policy can run, in the order they are shown."""
        automatic = {
            MemoryPolicy.SMART: (CleanupReason.THRESHOLD, CleanupReason.PERIODIC, CleanupReason.REQUEST_COUNT),
            MemoryPolicy.LEGACY: (CleanupReason.LEGACY,),
            MemoryPolicy.OFF: (),
        }[self]
        return (*automatic, CleanupReason.MANUAL, CleanupReason.LIMIT)
