"""Memory sampling of this process."""

from __future__ import annotations

import functools
import os

import psutil


@functools.cache
def _process(pid: int) -> psutil.Process:
    return psutil.Process(pid)


def rss_bytes() -> int:
    """Resident set size of this process, in bytes (correct after a fork, too)."""
    return int(_process(os.getpid()).memory_info().rss)
