"""Where the live heap grows: two ``tracemalloc`` snapshots some seconds apart, compared by allocation site.

``POST /debug/memory/snapshot?seconds=N`` (app/debug.py) runs :meth:`HeapTracer.growth`. Tracing starts
for the window only (unless it was already on, e.g. ``PYTHONTRACEMALLOC``) and stops afterwards, so the
service pays for it only while an operator asks. What it sees: memory allocated through Python's
allocators, which includes numpy arrays and every Python object; not torch's CPU tensors, which torch
allocates itself (the allocator accounts of app/breakdown.py see those).

Cost while tracing, measured with the bundled model on 2 CPUs (README "Where the memory is"): every
Python allocation records its site, so allocation-heavy code (tokenising, building responses) runs
slower, and the traces themselves take memory (``tracemalloc_memory_bytes`` in the answer).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import tracemalloc

from app.errors import Conflict
from app.schemas import GrowthSite, HeapGrowthResponse

FRAMES = (
    8  # frames kept per allocation: the line that allocated is often in a library (numpy.repeat), its caller is not
)
MAX_SECONDS = 120
MAX_TOP = 100
_IGNORED = (tracemalloc.__file__, threading.__file__, "<frozen importlib._bootstrap>", "<unknown>")


class HeapTracer:
    """Takes one growth snapshot at a time (409 otherwise); :meth:`stop` ends a window early at shutdown."""

    def __init__(self) -> None:
        self._busy = threading.Lock()
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def growth(self, seconds: float, top: int) -> HeapGrowthResponse:
        """Trace for ``seconds``; the ``top`` sites whose held memory grew most, largest first."""
        if not self._busy.acquire(blocking=False):
            raise Conflict("a memory snapshot is already being taken; one at a time")
        try:
            return self._growth(seconds, top)
        finally:
            self._busy.release()

    def _growth(self, seconds: float, top: int) -> HeapGrowthResponse:
        started_here = not tracemalloc.is_tracing()
        if started_here:
            tracemalloc.start(FRAMES)
        try:
            began = time.monotonic()
            first = tracemalloc.take_snapshot()
            self._stopping.wait(seconds)
            second = tracemalloc.take_snapshot()
            window_s = time.monotonic() - began
            traces_bytes = tracemalloc.get_tracemalloc_memory()
        finally:
            if started_here:
                tracemalloc.stop()
        ignore = [tracemalloc.Filter(False, pattern) for pattern in _IGNORED]
        differences = second.filter_traces(ignore).compare_to(first.filter_traces(ignore), "traceback")
        # A Traceback lists its frames oldest first: [-1] is the line that allocated.
        grown = sorted((d for d in differences if d.size_diff > 0), key=lambda d: d.size_diff, reverse=True)
        return HeapGrowthResponse(
            seconds=round(window_s, 3),
            started_tracing=started_here,
            growth_bytes=sum(d.size_diff for d in grown),
            tracemalloc_memory_bytes=traces_bytes,
            sites=[
                GrowthSite(
                    file=short_path(d.traceback[-1].filename),
                    line=d.traceback[-1].lineno,
                    size_bytes=d.size_diff,
                    count=d.count_diff,
                    held_bytes=d.size,
                    traceback=[f"{short_path(f.filename)}:{f.lineno}" for f in reversed(d.traceback)],
                )
                for d in grown[:top]
            ],
        )


def short_path(filename: str) -> str:
    """``filename`` relative to the import path entry it lies under (``torch/nn/functional.py``,
    ``app/engine.py``): the name an operator can look up, without the host's directories."""
    best = ""
    for entry in sys.path:
        root = os.path.join(os.path.abspath(entry or "."), "")
        if filename.startswith(root) and len(root) > len(best):
            best = root
    return filename[len(best) :] if best else filename
