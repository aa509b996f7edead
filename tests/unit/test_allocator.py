"""The C allocator: jemalloc preloaded by re-executing the program, purging on request, glibc's arena cap.

Each check runs in a subprocess, because the allocator of a process is fixed when it starts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app import allocator
from app.allocator import REEXEC_MARK, jemalloc_conf, jemalloc_library

ROOT = Path(__file__).resolve().parents[2]


def run_python(script: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", REEXEC_MARK)}
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()


@pytest.fixture(scope="module")
def jemalloc() -> str:
    library = jemalloc_library()
    assert library is not None, "jemalloc is not installed: run `make system-deps` (Debian package libjemalloc2)"
    return library


# Prints the allocator and MALLOC_CONF, then asks for jemalloc: a re-executed program prints again.
_EXEC_SCRIPT = """
import os, sys
from app.allocator import active, exec_under_jemalloc
print(active(), os.environ.get("MALLOC_CONF", "-"))
exec_under_jemalloc(sys.argv[1], 2)
"""


def test_asking_for_jemalloc_runs_the_program_again_under_jemalloc(jemalloc: str) -> None:
    assert run_python(_EXEC_SCRIPT, "jemalloc") == ["glibc", "-", "jemalloc", jemalloc_conf(2)]
    assert jemalloc_conf(2) == "narenas:2,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def test_a_malloc_conf_of_the_operator_is_kept(jemalloc: str) -> None:
    lines = run_python(_EXEC_SCRIPT, "jemalloc", env={"MALLOC_CONF": "narenas:4"})
    assert lines == ["glibc", "narenas:4", "jemalloc", "narenas:4"]


def test_glibc_runs_when_it_is_asked_for(jemalloc: str) -> None:
    assert run_python(_EXEC_SCRIPT, "glibc") == ["glibc", "-"]


def test_without_the_library_the_program_goes_on_under_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    execs: list[object] = []
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: None)
    monkeypatch.setattr(allocator.os, "execve", lambda *args: execs.append(args))
    monkeypatch.delenv(REEXEC_MARK, raising=False)
    allocator.exec_under_jemalloc("jemalloc", 2)
    assert execs == []


# Fills 256 MB in 4 MB blocks, frees them, and reports RSS after the free and after a release.
_PURGE_SCRIPT = """
import ctypes, psutil
from app.allocator import active, release_free_memory
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(4 << 20) for _ in range(64)]
for block in blocks:
    ctypes.memset(block, 1, 4 << 20)
for block in blocks:
    libc.free(block)
rss = psutil.Process().memory_info().rss
assert release_free_memory()
print(active(), rss >> 20, psutil.Process().memory_info().rss >> 20)
"""


def test_jemalloc_keeps_freed_memory_until_the_release_purges_it(jemalloc: str) -> None:
    name, freed, released = run_python(_PURGE_SCRIPT, env={"LD_PRELOAD": jemalloc, "MALLOC_CONF": jemalloc_conf(2)})
    assert name == "jemalloc"
    assert int(freed) - int(released) >= 200  # MB: decay is off, so only the release gave it back


# Eight threads malloc at once; each reports the arena its block came from (glibc: a block
# outside the main heap lives in a 64 MiB-aligned heap of its arena).
_ARENAS_SCRIPT = """
import ctypes, sys, threading
from app.allocator import limit_glibc_arenas
if int(sys.argv[1]):
    assert limit_glibc_arenas(int(sys.argv[1]))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.sbrk.restype = ctypes.c_void_p
brk = libc.sbrk(0)
arenas, lock, ready = set(), threading.Lock(), threading.Barrier(8)
def work():
    ready.wait()
    block = libc.malloc(4096)
    with lock:
        arenas.add("main" if abs(block - brk) < (1 << 30) else block & ~((64 << 20) - 1))
    ready.wait()  # every thread stays alive until all have allocated
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(len(arenas))
"""


def arenas_used(cap: int) -> int:
    return int(run_python(_ARENAS_SCRIPT, str(cap))[0])


def test_threads_share_the_capped_malloc_arenas() -> None:
    assert arenas_used(0) > 2  # glibc's default: each thread gets an arena of its own
    assert arenas_used(2) <= 2
    assert arenas_used(1) == 1


def test_the_cpu_kernels_caches_are_bounded_unless_the_environment_says_otherwise() -> None:
    env = {"LRU_CACHE_CAPACITY": "256"}
    allocator.bound_kernel_caches(env)
    assert env == {"LRU_CACHE_CAPACITY": "256", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32"}


def test_gunicorns_master_bounds_them_before_the_worker_imports_torch() -> None:
    script = "import os, sys, app.gunicorn_conf\nprint(os.environ['LRU_CACHE_CAPACITY'], 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k not in allocator.KERNEL_CACHES}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "EMBEDDING_ALLOCATOR": "glibc"},
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.stdout.split() == ["32", "False"]


def resident_bytes(address: int) -> int:
    """RSS of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    rows = Path("/proc/self/smaps").read_text().splitlines()
    for i, row in enumerate(rows):
        mapping = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", row)  # a mapping's first line; its fields follow
        if mapping and int(mapping[1], 16) <= address < int(mapping[2], 16):
            return next(int(r.split()[1]) * 1024 for r in rows[i + 1 :] if r.startswith("Rss:"))
    raise AssertionError(f"no mapping holds {address:#x}")


def test_pages_of_a_mapped_file_leave_rss_and_the_heap_is_left_alone(tmp_path: Path) -> None:
    """What replaced weights of a memory-mapped checkpoint leave behind: their pages, read in, counted in RSS.
    Dropped, they leave RSS and read back unchanged from the file; a heap range given by mistake is left as it
    is (there madvise would discard live memory)."""
    import numpy as np

    checkpoint = tmp_path / "model.safetensors"
    np.arange(4 << 20, dtype=np.float32).tofile(checkpoint)  # 16 MiB
    weights = np.memmap(checkpoint, dtype=np.float32, mode="r")
    assert float(weights[:: 1 << 10].sum()) > 0  # every page read in, as loading a model does
    before = resident_bytes(weights.ctypes.data)
    heap = np.ones(4 << 20, dtype=np.float32)
    dropped = allocator.drop_file_pages([(weights.ctypes.data, weights.nbytes), (heap.ctypes.data, heap.nbytes)])
    after = resident_bytes(weights.ctypes.data)
    print(f"\nmapped file: {before / 1e6:.1f} MB resident, {dropped / 1e6:.1f} MB dropped, {after / 1e6:.1f} MB after")
    assert before >= 16 << 20 and after < 100_000
    assert (16 << 20) - 8192 <= dropped <= 16 << 20
    assert float(heap.sum()) == 4 << 20  # the heap range kept its values
    assert float(weights[-1]) == (4 << 20) - 1  # and the file's pages read back as they were


# 64 MB of small blocks, freed (a block kept after them, so they are not at the top of the heap), then trimmed:
# each step prints glibc's accounts in MB (mallinfo2's free, the arenas' resident pages, free but kept). In the main
# thread's arena, or in a thread's own (heaps at 64 MiB boundaries), with "thread".
_GLIBC_ACCOUNTS_SCRIPT = """
import ctypes, sys, threading
from app.breakdown import allocator_accounts, free_but_kept
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def show():
    name, accounts = allocator_accounts()
    assert name == "glibc"
    print(accounts["free"] >> 20, accounts["resident"] >> 20, free_but_kept(name, accounts) >> 20)
def work():
    blocks = [libc.malloc(4000) for _ in range(16000)]
    for block in blocks:
        ctypes.memset(block, 1, 4000)
    fence = libc.malloc(4000)
    show()
    for block in blocks:
        libc.free(block)
    show()
if sys.argv[1] == "thread":
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
else:
    work()
libc.malloc_trim(0)
show()
"""


@pytest.mark.parametrize("where", ["main", "thread"])
def test_glibc_free_but_kept_counts_the_free_memory_still_in_ram(where: str) -> None:
    out = [int(mb) for mb in run_python(_GLIBC_ACCOUNTS_SCRIPT, where)]
    (_, filled, kept_filled), (free, freed, kept_freed), (free_trimmed, trimmed, kept_trimmed) = (
        out[0:3], out[3:6], out[6:9]
    )  # fmt: skip
    assert kept_filled < 8  # all in use
    assert free >= 60 and kept_freed >= 60  # freed, still resident: what a cleanup can give back
    assert freed - trimmed >= 55  # the trim gave the pages back ...
    assert kept_trimmed < 8  # ... and the account says so,
    assert free_trimmed >= 60  # where mallinfo2 still counts the chunks free
    assert filled >= 60  # a thread's arena is counted too
