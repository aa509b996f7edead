"""The memory manager's shared state under many threads: no request count, no asked-for cleanup and no shedding
transition is lost.

Each test runs the real parts (``Triggers``, ``Shedder``, ``MemoryManager``) from as many threads as the service
has kinds of (request threads admitting, the readiness probe, the monitor, the inference thread), with the
interpreter switching threads every microsecond so that an unlocked read-then-write interleaves. Without the
parts' locks they fail (docs/architecture.md, "The memory manager's threads").
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from structlog.testing import capture_logs

from app import memory
from app.config import Settings
from app.memory import MemoryManager
from app.metrics import Metrics
from app.reasons import CleanupReason
from app.shedding import Shedder
from tests.doubles import QUIET_HEAP, FakeClock, FakeSampler

GB = 1_000_000_000
ROUNDS = 3000


@pytest.fixture(autouse=True)
def fast_switching() -> Iterator[None]:
    """Switch threads every microsecond (the default is 5 ms): races that are rare in service happen here."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def hammer(
    *workers: tuple[int, Callable[[], object]], rounds: int = ROUNDS, meanwhile: tuple[Callable[[], object], ...] = ()
) -> None:
    """Run each ``(threads, step)`` on that many threads, ``rounds`` steps each, all released at once; and each
    of ``meanwhile`` on a thread of its own, over and over until they have all finished."""
    start = threading.Barrier(sum(n for n, _ in workers) + len(meanwhile))
    done = threading.Event()
    errors: list[BaseException] = []

    def run(step: Callable[[], object], rounds: int | None) -> None:
        start.wait()
        try:
            while (rounds is None and not done.is_set()) or (rounds is not None and rounds > 0):
                step()
                rounds = None if rounds is None else rounds - 1
        except BaseException as exc:  # noqa: BLE001  (reported below, on the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(step, rounds)) for n, step in workers for _ in range(n)]
    background = [threading.Thread(target=run, args=(step, None)) for step in meanwhile]
    for thread in threads + background:
        thread.start()
    for thread in threads:
        thread.join(60)
    done.set()
    for thread in background:
        thread.join(60)
    assert not errors, errors


class BusyEngine:
    """An engine always in the middle of a batch: the monitor asks the inference thread for each cleanup."""

    info = None

    def __init__(self) -> None:
        self.batch_tokens: list[int | None] = []

    def add_ready_hook(self, hook: Callable[[], None]) -> None: ...
    def add_between_batches_hook(self, hook: Callable[[], None]) -> None: ...
    def add_idle_hook(self, hook: Callable[[], None]) -> None: ...
    def add_batch_observer(self, observer: Callable[..., None]) -> None: ...

    def is_idle(self) -> bool:
        return False

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def release_model_caches(self) -> None: ...

    def limit_batch_tokens(self, tokens: int | None) -> None:
        self.batch_tokens.append(tokens)


def busy_manager(settings: Settings) -> MemoryManager:
    """A memory manager whose engine is always busy: the monitor asks the inference thread for each cleanup."""
    return MemoryManager(
        settings,
        metrics=Metrics(),
        engine=BusyEngine(),
        sampler=FakeSampler(GB),
        clock=FakeClock(),
        cgroup_limit=lambda: None,
        heap=QUIET_HEAP,
    )


def test_request_counts_and_asked_cleanups_survive_every_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Request threads count, the monitor asks for a cleanup once 7 requests have been, the inference thread
    takes and runs them: every admitted request is either covered by a cleanup or still counted, and every
    cleanup the monitor was promised ran (or is still asked for)."""
    settings = Settings(model="fake", cleanup_every_requests=7, cleanup_interval_s=1e9)
    manager = busy_manager(settings)
    monkeypatch.setattr(memory, "_accounts", dict)  # the accounts' /proc reads: not what is tested, and slow
    triggers = manager.triggers
    covered: list[int] = []
    promised: list[CleanupReason] = []
    cleaned, ask = triggers.cleaned, triggers.ask

    def counting_cleaned(counted: int, now: float) -> None:
        covered.append(counted)
        cleaned(counted, now)

    def counting_ask(reason: CleanupReason) -> bool:
        accepted = ask(reason)
        if accepted:
            promised.append(reason)
        return accepted

    triggers.cleaned = counting_cleaned  # type: ignore[method-assign]
    triggers.ask = counting_ask  # type: ignore[method-assign]

    admitted = [0] * 4

    def admitting(k: int) -> Callable[[], None]:
        def step() -> None:
            manager.admit()
            admitted[k] += 1

        return step

    def monitor_pass() -> None:
        manager.tick()
        time.sleep(0.001)  # a pass that reads RSS alone takes microseconds: let requests come between passes

    # The monitor's passes set the pace; request threads admit and the inference thread takes all along.
    hammer((1, monitor_pass), rounds=300, meanwhile=(*map(admitting, range(4)), manager.run_pending))
    left = triggers.pending

    _, counts, _ = manager.cleaner.history()
    print(f"\n{len(promised)} cleanups asked, {len(covered)} ran")
    assert len(promised) > 20  # the monitor asked, over and over, while the inference thread took
    assert sum(counts.values()) + (left is not None) == len(promised)
    assert sum(covered) + triggers.state().requests_since_cleanup == sum(admitted)


def test_shedding_transitions_are_applied_in_the_order_they_happen() -> None:
    """Admission, the readiness probe and the monitor see RSS on either side of the limit at once: shedding
    starts and stops strictly alternately, and the engine's batch limit always matches the flag."""
    limit = 3 * GB
    engine = BusyEngine()
    shedder = Shedder(
        limit,
        engine=engine,
        clock=FakeClock(),
        cooldown_s=30,
        baseline=lambda: GB,
        batch_tokens=lambda: 4096,
        min_s=0,
    )
    rng = random.Random(7)

    def see() -> None:
        shedder.update(rng.choice((limit + GB, limit - GB)))

    with capture_logs() as logs:
        hammer((4, see), (1, see), (1, lambda: shedder.update(limit - GB, idle=True)))

    transitions = [e["event"] for e in logs if e["event"].startswith("memory.shedding_")]
    assert len(transitions) > 10
    expected = ["memory.shedding_started", "memory.shedding_stopped"] * len(transitions)
    assert transitions == expected[: len(transitions)]
    assert len(engine.batch_tokens) == len(transitions)
    assert engine.batch_tokens[-1] == (1 if shedder.shedding else 4096)


def test_the_monitor_asks_for_nothing_while_an_asked_cleanup_waits_or_runs() -> None:
    """The monitor, woken by every request past the count, sees the count still due while the inference thread
    runs the cleanup it asked for (the count resets when that one ends): it must not ask for a second."""
    settings = Settings(model="fake", cleanup_every_requests=3, cleanup_interval_s=1e9)
    manager = busy_manager(settings)
    for _ in range(3):
        manager.admit()
    assert manager.tick() == "request_count"  # asked of the busy inference thread
    assert manager.tick() is None  # asked already: waiting for the inference thread
    assert manager.triggers.take() == "request_count"  # the inference thread takes it and starts it
    manager.admit()
    assert manager.tick() is None  # running: the count it will reset is still due, and nothing is asked
    assert manager.triggers.pending is None
    manager.cleaner.try_run(CleanupReason.REQUEST_COUNT)
    manager.triggers.done()
    assert manager.triggers.state().requests_since_cleanup == 0  # the one admitted meanwhile was covered
    for _ in range(3):
        manager.admit()
    assert manager.tick() == "request_count"  # due again, asked again


def test_the_monitor_is_woken_once_for_the_count_not_by_every_request_after_it() -> None:
    """Each wake is a full memory sample on the monitor thread. Woken by every request past the count until the
    inference thread had run the cleanup, the monitor took a quarter of a core from the model under 16 single-text
    clients (3.4 s of 14 s): once is enough, and the monitor's own pass still finds a count it missed."""
    settings = Settings(model="fake", cleanup_every_requests=3, cleanup_interval_s=1e9)
    manager = busy_manager(settings)
    wakes = []
    for _ in range(8):
        manager._wake.clear()
        manager.admit()
        wakes.append(manager._wake.is_set())
    assert wakes == [False, False, True, False, False, False, False, False]
    assert manager.tick() == "request_count"  # a pass that missed the wake still asks for the cleanup due
