"""Where the resident memory is: RSS by kind (the kernel's accounts) and the allocator's own accounts.

One RSS number cannot tell the model's weights from live objects, from memory the allocator freed but
kept (what a cleanup can give back), from a leak. These accounts can:

- RSS by kind, from ``/proc/self/status`` (``RssAnon``, ``RssFile``, ``RssShmem``, ``VmSwap``; they add
  up to ``VmRSS``) with ``/proc/self/smaps_rollup`` for what is shared with other processes. File-backed
  is mostly the memory-mapped weights (the kernel can drop and re-read it); anonymous is the heap,
  tensors and stacks.
- Python: the objects the cyclic garbage collector tracks, by generation, and the interpreter's allocated
  blocks; a leak of Python objects grows these, a leak of tensors or buffers does not.
- The allocator: jemalloc's ``stats.allocated`` (live), ``active``, ``resident``, ``retained`` and
  ``mapped`` (``epoch`` refreshed first); glibc's ``mallinfo2`` (in use, free in its arenas, mmapped) and the
  resident pages of its arenas (:func:`glibc_arena_resident`). ``resident - allocated`` (jemalloc) or
  ``resident - in_use`` (glibc) is memory freed but kept: a cleanup's target. glibc's ``free`` is not: it
  counts free chunks whose pages ``malloc_trim`` already gave back.

Sampled by the memory manager's monitor thread, never on the request path (docs/architecture.md §5).
"""

from __future__ import annotations

import ctypes
import gc
import os
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import ConfigDict

from app import allocator

PROC_SELF = Path("/proc/self")
JEMALLOC_ACCOUNTS = ("allocated", "active", "resident", "retained", "mapped")
GLIBC_HEAP_BYTES = 64 << 20
"""glibc's ``HEAP_MAX_SIZE`` on 64-bit: each heap of an arena other than the main one is a mapping of this size,
aligned to it, that starts with a ``heap_info`` header (arena, previous heap, size, mprotect_size)."""


# The breakdown's records are also the schema of GET /memory's answer (app/schemas.py): no undeclared field.
_ANSWER = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class RssByKind:
    """The process's resident memory by kind, in bytes (``shared`` overlaps the others)."""

    __pydantic_config__: ClassVar[ConfigDict] = _ANSWER

    rss: int
    anon: int
    file: int
    shmem: int
    swap: int
    shared: int | None
    source: str


def _kb_fields(path: Path) -> dict[str, int]:
    fields: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name.strip()] = int(parts[0]) * 1024
    return fields


def rss_by_kind(proc: Path = PROC_SELF, *, shared: bool = True) -> RssByKind | None:
    """RSS split by kind, or None where the kernel does not report it (not Linux). ``shared=False`` skips
    ``smaps_rollup``, which walks every mapping (about 9 ms in a process that has loaded torch)."""
    status = _kb_fields(proc / "status")
    if "VmRSS" not in status:
        return None
    rollup = _kb_fields(proc / "smaps_rollup") if shared else {}
    shared_bytes = rollup.get("Shared_Clean", 0) + rollup.get("Shared_Dirty", 0) if rollup else None
    return RssByKind(
        rss=status["VmRSS"],
        anon=status.get("RssAnon", 0),
        file=status.get("RssFile", 0),
        shmem=status.get("RssShmem", 0),
        swap=status.get("VmSwap", 0),
        shared=shared_bytes,
        source="status+smaps_rollup" if rollup else "status",
    )


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
        )
    ]  # fmt: skip


def _jemalloc_stats() -> dict[str, int] | None:
    mallctl = allocator.process_library().mallctl
    epoch = ctypes.c_uint64(1)
    if mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.c_size_t(ctypes.sizeof(epoch))) != 0:
        return None
    stats: dict[str, int] = {}
    for name in JEMALLOC_ACCOUNTS:
        value, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
        if mallctl(f"stats.{name}".encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
            return None  # a jemalloc built without statistics
        stats[name] = int(value.value)
    return stats


def _arena_candidates(proc: Path) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """From the process's mappings: the main arena's ``[heap]`` ranges, and anonymous read-write memory (where the
    other arenas' heaps are), neighbouring mappings joined. Read a line at a time, keeping only those: the monitor
    samples this beside the requests' work."""
    heap: list[tuple[int, int]] = []
    writable: list[tuple[int, int]] = []
    with (proc / "maps").open() as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            name = fields[5].strip() if len(fields) > 5 else ""
            if name != "[heap]" and (name or not fields[1].startswith("rw")):
                continue
            low, high = (int(address, 16) for address in fields[0].split("-"))
            if name:
                heap.append((low, high))
            elif writable and writable[-1][1] == low:
                writable[-1] = (writable[-1][0], high)
            else:
                writable.append((low, high))
    return heap, writable


def _heap_header(mem: int, address: int) -> tuple[int, int, int] | None:
    """A glibc heap header's previous heap, size and mprotect_size at ``address``, read through the process's
    ``mem`` file: memory another thread unmapped since the mappings were read answers an error there, where
    reading it directly would crash the process."""
    try:
        header = os.pread(mem, 32, address)
    except OSError:
        return None
    if len(header) < 32:
        return None
    _, prev, size, protected = struct.unpack("4Q", header)
    return prev, size, protected


def _arena_heaps(writable: list[tuple[int, int]], mem: int) -> list[tuple[int, int]]:
    """The heaps of glibc's arenas other than the main one, found at the 64 MiB boundaries of anonymous writable
    memory by their header: a heap's ``size`` (what it uses) and ``mprotect_size`` (what is writable) are page
    multiples, 0 < size <= mprotect_size <= 64 MiB, and the previous heap of its arena is another boundary or none.
    Other threads allocate while this reads (and so does this thread): a heap may have grown since the mappings
    were read, so its range stops at theirs."""
    page = os.sysconf("SC_PAGE_SIZE")
    heaps = []
    for start, end in writable:
        boundary = -(-start // GLIBC_HEAP_BYTES) * GLIBC_HEAP_BYTES
        for heap in range(boundary, end, GLIBC_HEAP_BYTES):
            header = _heap_header(mem, heap)
            if header is None:
                continue
            prev, size, protected = header
            if (
                0 < size <= protected <= GLIBC_HEAP_BYTES
                and size % page == 0 == protected % page
                and prev % GLIBC_HEAP_BYTES == 0
            ):
                heaps.append((heap, min(heap + size, end)))
    return heaps


PAGEMAP_CHUNK_PAGES = 1 << 12
"""Pages whose ``pagemap`` entries are read at once (32 KiB of them, for 16 MiB of memory): the monitor counts a heap
of gigabytes in pieces, holding little while requests work beside it."""


def _resident_bytes(ranges: list[tuple[int, int]], proc: Path) -> int:
    """How many bytes of ``ranges`` (of this process) are in RAM: the present bit of each page in ``pagemap``."""
    page = os.sysconf("SC_PAGE_SIZE")
    present = 0
    with (proc / "pagemap").open("rb", buffering=0) as pagemap:
        for start, end in ranges:
            for first in range(start // page, end // page, PAGEMAP_CHUNK_PAGES):
                pagemap.seek(first * 8)
                entries = pagemap.read(min(PAGEMAP_CHUNK_PAGES, end // page - first) * 8)
                present += int(np.count_nonzero(np.frombuffer(entries, dtype=np.uint64) >> np.uint64(63)))
    return present * page


def glibc_arena_resident(proc: Path = PROC_SELF) -> int | None:
    """Bytes of glibc's arenas in RAM, or None where they cannot be read. ``malloc_trim`` gives the pages of free
    chunks back and leaves the chunks in the free lists, so ``mallinfo2``'s free memory overstates what is held
    (after the service's trims, most of it is gone from RSS); the pages themselves do not."""
    try:
        mem = os.open(proc / "mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        heap, writable = _arena_candidates(proc)
        return _resident_bytes(heap + _arena_heaps(writable, mem), proc)
    except (OSError, ValueError, struct.error):
        return None
    finally:
        os.close(mem)


def _glibc_stats() -> dict[str, int] | None:
    libc = allocator.libc()
    if libc is None or not hasattr(libc, "mallinfo2"):  # glibc before 2.33
        return None
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    stats = {"in_use": int(info.uordblks) + int(info.hblkhd), "free": int(info.fordblks), "mmapped": int(info.hblkhd)}
    arenas = glibc_arena_resident()
    if arenas is not None:  # mmapped chunks are each one allocation, in use and resident
        stats["resident"] = arenas + int(info.hblkhd)
    return stats


def allocator_accounts() -> tuple[str, dict[str, int]]:
    """The active allocator and its accounts in bytes (empty where it reports none)."""
    name = allocator.active()
    stats = _jemalloc_stats() if name == "jemalloc" else _glibc_stats() if name == "glibc" else None
    return name, stats or {}


def free_but_kept(name: str, accounts: dict[str, int]) -> int | None:
    """Memory the allocator holds resident but no object uses: what a cleanup can give back."""
    if name == "jemalloc" and {"resident", "allocated"} <= accounts.keys():
        return max(accounts["resident"] - accounts["allocated"], 0)
    if name == "glibc" and {"resident", "in_use"} <= accounts.keys():
        return max(accounts["resident"] - accounts["in_use"], 0)
    return None


@dataclass(frozen=True)
class PythonSample:
    """Tracked objects by generation ("0" youngest, "2" counted at most once a minute, "frozen" out of the
    collector's reach) and the interpreter's allocated blocks."""

    __pydantic_config__: ClassVar[ConfigDict] = _ANSWER

    gc_tracked_objects: dict[str, int]
    allocated_blocks: int


@dataclass
class PythonObjects:
    """Objects the garbage collector tracks, by generation, and the interpreter's allocated memory blocks.

    ``frozen`` counts what ``gc.freeze()`` moved out of the collector's reach (the service freezes the loaded
    model's objects, about 450,000); ``2`` what survived since. Counting a generation walks it while holding
    the interpreter lock (70 to 90 ms for 450,000 objects), so the oldest, the one a leak of Python objects
    grows, is counted at most once per ``oldest_every_s`` and its last count repeated in between.
    """

    oldest_every_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _oldest: int | None = field(default=None, init=False)
    _oldest_at: float = field(default=0.0, init=False)

    def sample(self) -> PythonSample:
        now = self.clock()
        oldest = len(gc.get_count()) - 1
        if self._oldest is None or now - self._oldest_at >= self.oldest_every_s:
            self._oldest, self._oldest_at = len(gc.get_objects(generation=oldest)), now
        tracked = {str(g): len(gc.get_objects(generation=g)) for g in range(oldest)}
        tracked[str(oldest)] = self._oldest
        tracked["frozen"] = gc.get_freeze_count()
        return PythonSample(tracked, sys.getallocatedblocks())
