"""The C allocator under the service: which one runs, how it gives free memory back, how to start under jemalloc.

Measured with the bundled model (issue 3): under an indexing load glibc's malloc
fragments. Freed activation memory stays in its heaps, about 140 MB more than
the model needs, however small the batches are. ``malloc_trim(0)`` gives it
back, but when it runs after every batch each batch faults its pages in again,
and that costs 5-10% of throughput.

jemalloc fragments less, and with its time-based purging turned off
(``dirty_decay_ms:-1``) it takes no page faults at all. Its purging then happens
only when the memory manager asks for it: at cleanups, and between batches at
most every ``EMBEDDING_TRIM_INTERVAL_S`` (2 s). Under the Locust load, that kept the
steady RSS at 1.07x the idle baseline, where never purging let it creep to 1.2-1.3x.
jemalloc's own decay purges on a timer in the middle of batches (5-8% of
throughput). Where jemalloc is missing, glibc runs, with the same trims.

jemalloc has to be in the process before anything allocates, so it cannot be
switched on from Python. :func:`exec_under_jemalloc` runs the program once more
with ``LD_PRELOAD`` set. gunicorn's master calls it from its config file, before
it binds a socket or forks a worker.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
from typing import Any

ALLOCATORS = ("jemalloc", "glibc")
"""What ``EMBEDDING_ALLOCATOR`` accepts."""

REEXEC_MARK = "EMBEDDING_ALLOCATOR_EXEC"
"""Set in the environment of the re-executed program, so a failed preload never loops."""

_PURGE_ALL_ARENAS = b"arena.4096.purge"  # jemalloc 5: arena 4096 (MALLCTL_ARENAS_ALL) means every arena
_M_ARENA_MAX = -8  # glibc <malloc.h>


@functools.cache
def process_library() -> Any:
    """The symbols of the process itself (``mallctl`` when jemalloc replaces malloc)."""
    return ctypes.CDLL(None)


@functools.cache
def libc() -> Any:
    """glibc, or None elsewhere."""
    if platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


@functools.cache
def active() -> str:
    """The allocator serving ``malloc`` in this process: ``jemalloc``, ``glibc`` or ``other``."""
    if hasattr(process_library(), "mallctl"):  # exported only when jemalloc replaces malloc (preloaded or linked)
        return "jemalloc"
    return "glibc" if libc() is not None else "other"


def release_free_memory() -> bool:
    """Hand the allocator's free memory back to the operating system; False where there is no way to.

    jemalloc: purge the unused pages of every arena. glibc: ``malloc_trim(0)``.
    """
    allocator = active()
    if allocator == "jemalloc":
        return int(process_library().mallctl(_PURGE_ALL_ARENAS, None, None, None, ctypes.c_size_t(0))) == 0
    if allocator == "glibc":
        libc().malloc_trim(0)
        return True
    return False


def limit_glibc_arenas(arenas: int) -> bool:
    """Let at most ``arenas`` glibc malloc arenas serve all threads; False where it does not apply.

    glibc gives threads their own arenas, up to eight per core, and each keeps its
    own free memory. Request threads, the inference thread and the tokenizer's
    threads then hold free memory in many heaps. Call it before threads start;
    arenas that already exist stay. Under jemalloc the same cap is its ``narenas``
    (:func:`jemalloc_conf`).
    """
    if active() != "glibc" or arenas <= 0:
        return False
    return bool(libc().mallopt(_M_ARENA_MAX, arenas))


OPENVINO_CONFLICT = (
    "OpenVINO's CPU plugin initialises TBB, which loads its hwloc binding with RTLD_DEEPBIND: hwloc then frees with "
    "glibc's free what the preloaded jemalloc allocated, and the process aborts (free(): invalid pointer)"
)
"""oneTBB's own switch, ``TBB_ENABLE_SANITIZERS=1`` (named for sanitizers, which refuse deep binding), drops the
flag: OpenVINO then runs beside jemalloc (measured: 189.5 texts/s against torch's 171.3 under the load-test verdict,
with AMX), but its RSS levelled off at 1.18x its warmed baseline (739 -> 870 MB, the verdict's bound 1.15x), so it
is not set here."""


_MADV_DONTNEED = 4  # <sys/mman.h>


def drop_file_pages(ranges: list[tuple[int, int]]) -> int:
    """Take the pages of ``ranges`` (address, bytes) out of the process's RSS where they lie in a file's mapping
    (a memory-mapped checkpoint), with ``madvise(MADV_DONTNEED)``: they stay in the page cache, and a later read
    would fault them in again from the file. Ranges anywhere else (the heap) are left alone: there the call would
    discard memory. Bytes dropped."""
    c = libc()
    if c is None:
        return 0
    files = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/"):
                start, end = (int(bound, 16) for bound in fields[0].split("-"))
                files.append((start, end))
    page, dropped = os.sysconf("SC_PAGE_SIZE"), 0
    for address, size in ranges:
        if not any(start <= address and address + size <= end for start, end in files):
            continue
        first, last = -(-address // page) * page, (address + size) // page * page  # whole pages inside
        if last > first and c.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0:
            dropped += last - first
    return dropped


def allocator_for(requested: str, backend: str) -> str:
    """The allocator to start under: jemalloc as asked, except with ``EMBEDDING_BACKEND=openvino``
    (:data:`OPENVINO_CONFLICT`), which runs on glibc with the same arena cap and trims."""
    return "glibc" if backend == "openvino" else requested


def jemalloc_library() -> str | None:
    """The shared jemalloc library to preload (Debian: package ``libjemalloc2``), or None."""
    return ctypes.util.find_library("jemalloc")


def jemalloc_conf(arenas: int) -> str:
    """``MALLOC_CONF`` for the service: purging only when the memory manager asks, ``arenas`` arenas (0: default)."""
    options = ["dirty_decay_ms:-1", "muzzy_decay_ms:-1"]
    if arenas > 0:
        options.insert(0, f"narenas:{arenas}")
    return ",".join(options)


KERNEL_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32", "LRU_CACHE_CAPACITY": "32"}
"""Entries the CPU kernels' caches keep: oneDNN's primitives and the computations PyTorch's ideep layer keeps
beside them (1024 each by default). On CPUs where the model computes in bfloat16 (AVX-512 BF16, AMX), every
new batch shape (texts x tokens) adds about 0.75 MB to them: with all-MiniLM-L6-v2, 400 shapes grew RSS by
560 MB, and an indexing load of whole documents grew it by 250 MB in 6 minutes without levelling off. At 32
each it stayed flat (+10 MB after 400 shapes) at the same speed. float32 uses neither, and stays flat."""


def bound_kernel_caches(environ: dict[str, str] | None = None) -> None:
    """Bound the CPU kernels' caches (:data:`KERNEL_CACHES`) unless the environment sets them: before torch is
    imported (gunicorn's master calls it from its config file, so the worker it forks inherits it)."""
    env = os.environ if environ is None else environ
    for name, value in KERNEL_CACHES.items():
        env.setdefault(name, value)


OPENMP_SPIN_COUNT = "10000"
"""How long a thread of the forward pass's OpenMP team that waits for the others spins before it sleeps
(``GOMP_SPINCOUNT``; libgomp's default, 300,000, is a few hundred microseconds). The team has one thread per
core, so while anything else runs (the next version loading beside this one during a handover, its interpreter
importing), a thread that spins at every operation's barrier holds the core its preempted teammate needs, and
the forward pass nearly stops: 8 clients of a 768-wide model got 2-4 answers a second instead of 24-30, with
gaps of 4-8 s, for the whole of a handover. Sleeping after 10,000 spins, the gaps were under 1 s and twice as
many answers came, at the same speed when nothing else runs (docs/operations.md, docs/benchmarks.md)."""


def yield_waiting_openmp_threads(environ: dict[str, str] | None = None) -> None:
    """Let the forward pass's waiting OpenMP threads sleep soon (:data:`OPENMP_SPIN_COUNT`) unless the environment
    says how they wait (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``): before torch is imported, as
    :func:`bound_kernel_caches`."""
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT


def exec_under_jemalloc(requested: str, arenas: int) -> None:
    """Run this program again with jemalloc preloaded; return only where that is not wanted or not possible.

    Does nothing when ``requested`` is not ``jemalloc``, when jemalloc already
    runs, when this is the re-executed program, or when the library is not
    installed (the service then logs that it runs on glibc). A ``MALLOC_CONF``
    already in the environment is kept.
    """
    if requested != "jemalloc" or active() == "jemalloc" or os.environ.get(REEXEC_MARK):
        return
    library = jemalloc_library()
    if library is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(filter(None, [library, env.get("LD_PRELOAD")]))
    env.setdefault("MALLOC_CONF", jemalloc_conf(arenas))
    env[REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)  # noqa: S606  # the same program, with the same arguments
