"""Parsing the kernel's and the allocators' accounts (the real ones: tests/integration/test_api.py)."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import struct
from pathlib import Path

from app.breakdown import PythonObjects, _heap_header, free_but_kept, rss_by_kind

STATUS = """Name:\tpython
VmRSS:\t  648000 kB
RssAnon:\t  430000 kB
RssFile:\t  218000 kB
RssShmem:\t       0 kB
VmSwap:\t    1000 kB
Threads:\t40
"""
ROLLUP = """5644ca083000-7ffc421d0000 ---p 00000000 00:00 0                          [rollup]
Rss:              648000 kB
Shared_Clean:      30000 kB
Shared_Dirty:       1000 kB
Anonymous:        430000 kB
"""


def test_rss_by_kind_reads_status_and_smaps_rollup(tmp_path: Path) -> None:
    (tmp_path / "status").write_text(STATUS)
    (tmp_path / "smaps_rollup").write_text(ROLLUP)
    kinds = rss_by_kind(tmp_path)
    assert kinds is not None
    assert (kinds.rss, kinds.anon, kinds.file, kinds.shmem, kinds.swap) == (
        648000 * 1024,
        430000 * 1024,
        218000 * 1024,
        0,
        1000 * 1024,
    )
    assert kinds.shared == 31000 * 1024
    assert kinds.source == "status+smaps_rollup"


def test_without_smaps_rollup_the_status_alone_answers(tmp_path: Path) -> None:
    (tmp_path / "status").write_text(STATUS)
    kinds = rss_by_kind(tmp_path)
    assert kinds is not None
    assert (kinds.shared, kinds.source) == (None, "status")


def test_no_proc_means_no_breakdown(tmp_path: Path) -> None:
    assert rss_by_kind(tmp_path) is None


def test_free_but_kept_is_what_the_allocator_holds_beyond_live_objects() -> None:
    assert free_but_kept("jemalloc", {"allocated": 100, "resident": 160}) == 60
    assert free_but_kept("glibc", {"in_use": 100, "free": 25, "mmapped": 0, "resident": 110}) == 10
    assert free_but_kept("glibc", {"in_use": 100, "free": 25, "mmapped": 0}) is None  # the arenas unread
    assert free_but_kept("jemalloc", {}) is None  # a jemalloc built without statistics
    assert free_but_kept("other", {}) is None


def test_the_oldest_generation_is_counted_at_most_once_per_interval() -> None:
    now = [0.0]
    objects = PythonObjects(oldest_every_s=60.0, clock=lambda: now[0])
    gc.collect()  # garbage earlier tests left in the oldest generation goes now, not between the two counts
    first = objects.sample()
    assert set(first.gc_tracked_objects) == {"0", "1", "2", "frozen"}
    held = [[i] for i in range(50_000)]  # tracked containers; a collection moves them to the oldest generation
    gc.collect()
    now[0] = 59.0
    assert objects.sample().gc_tracked_objects["2"] == first.gc_tracked_objects["2"]  # not counted again yet
    now[0] = 60.0
    # At least the 50,000 held, give or take the few objects the collection between the counts freed there.
    assert objects.sample().gc_tracked_objects["2"] >= first.gc_tracked_objects["2"] + 49_000
    assert objects.sample().allocated_blocks > 0
    del held


def test_a_heap_header_is_read_safely_from_memory_unmapped_meanwhile() -> None:
    # The monitor reads heap headers at addresses from a snapshot of the mappings while other threads unmap memory
    # (glibc's large blocks): an address gone since answers nothing, and the process goes on.
    region = mmap.mmap(-1, 1 << 20)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    struct.pack_into("4Q", region, 0, 0, 64 << 20, 4096, 8192)
    mem = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        assert _heap_header(mem, address) == (64 << 20, 4096, 8192)
        region.close()
        assert _heap_header(mem, address) is None
    finally:
        os.close(mem)
