"""The memory manager's vocabulary: why a cleanup ran, which policy decides when, and what a cleanup did.

One definition, used by the memory manager, its metrics (pre-registered per policy), the settings, the
OpenAPI schemas, the load-test sampler and the verdict plot. Members are strings (``StrEnum``), so they
compare equal to, log as and label metrics with their values. Nothing here imports the manager: the schemas
describe its records without reaching its threads.
"""

from __future__ import annotations

from dataclasses import asdict, field
from enum import StrEnum
from typing import Any

from pydantic import ConfigDict, computed_field
from pydantic.dataclasses import dataclass as pydantic_dataclass

INEFFECTIVE_BELOW_BYTES = 1024 * 1024
"""A cleanup that gives back less than this to the operating system is counted as ineffective."""


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
