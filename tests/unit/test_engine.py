from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from app.backend import ModelInfo
from app.engine import Engine, EngineCrashed, Job, StartupTimedOut, plan_batches
from app.errors import ClientClosed, QueueFull, ServiceError, TooSlow, Unavailable, Unprocessable
from app.metrics import Metrics
from tests.doubles import FakeBackend


def make_engine(
    backend: FakeBackend, *, batch_size: int = 4, queue_size: int = 64, max_batch_tokens: int | None = None
) -> tuple[Engine, Metrics]:
    metrics = Metrics()
    engine = Engine(
        backend,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        queue_size=queue_size,
        metrics=metrics,
        rss_sampler=lambda: 1000,
    )
    return engine, metrics


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def running(backend: FakeBackend) -> Iterator[tuple[Engine, Metrics]]:
    engine, metrics = make_engine(backend)
    engine.start()
    wait_for(lambda: engine.ready)
    yield engine, metrics
    backend.gate.set()
    engine.stop(timeout_s=5)


def wait_for(condition: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_each_request_gets_its_own_vectors_in_input_order(
    running: tuple[Engine, Metrics], backend: FakeBackend
) -> None:
    engine, _ = running
    texts = ["one", "two words", "three words here", "four", "five five"]
    result = engine.submit(texts).wait(5)
    np.testing.assert_array_equal(result.embeddings, np.stack([backend.vector(t) for t in texts]))
    assert result.token_counts == [3, 4, 5, 3, 4]


def test_concurrent_requests_share_batches_of_similar_length() -> None:
    backend = FakeBackend(max_seq_length=128)
    engine, metrics = make_engine(backend, batch_size=4)
    engine.start()
    wait_for(lambda: engine.ready)
    backend.gate.clear()  # hold the model so requests pile up in the queue
    blocker = engine.submit(["blocker"])
    wait_for(lambda: engine.queue_depth == 0)  # the blocker is in the model
    words = (1, 100, 2, 100, 1, 90, 2, 1)
    jobs = [engine.submit([" ".join(["w"] * n)]) for n in words]
    backend.gate.set()
    blocker.wait(5)
    results = [job.wait(5) for job in jobs]
    engine.stop(5)
    batches = [[len(t.split()) for t in batch] for batch in backend.batches[2:]]
    assert sorted(n for batch in batches for n in batch) == sorted(words)
    assert batches[-1] == [100, 100, 90]  # long texts together, short ones not padded to their length
    assert all(max(batch) <= 2 for batch in batches[:-1])  # and the short batches first
    assert all(len(batch) <= 4 for batch in batches)
    for job, result in zip(jobs, results, strict=True):
        np.testing.assert_array_equal(result.embeddings[0], backend.vector(job.texts[0]))
    count = metrics.registry.get_sample_value("embedding_batch_size_count")
    assert count == 1 + len(batches)  # the blocker's batch + these; the warm-up is not counted


@pytest.mark.parametrize(
    ("lengths", "max_size", "max_tokens", "expected"),
    [
        ([], 4, None, []),
        ([10, 10, 10, 10, 10], 4, None, [4, 1]),
        ([256, 250, 20, 18, 17, 9], 32, None, [2, 4]),
        ([100] * 3 + [90] * 3, 32, None, [6]),  # close lengths: one batch beats two
        ([256] + [8] * 40, 32, None, [1, 32, 8]),
        ([256] * 8 + [8] * 8, 32, 1024, [4, 4, 8]),  # token budget: long texts 4 at a time, short ones together
        ([300, 10], 32, 256, [1, 1]),  # a text over the budget goes alone, it is never dropped
    ],
)
def test_plan_batches_groups_by_length_within_the_size_and_token_limits(
    lengths: list[int], max_size: int, max_tokens: int | None, expected: list[int]
) -> None:
    spans = plan_batches(lengths, max_size, overhead=32, max_tokens=max_tokens)
    assert [s.stop - s.start for s in spans] == expected
    assert [i for s in spans for i in range(s.start, s.stop)] == list(range(len(lengths)))


def test_long_texts_are_split_into_smaller_batches_by_the_token_budget() -> None:
    backend = FakeBackend(max_seq_length=128)
    engine, _ = make_engine(backend, batch_size=8, max_batch_tokens=256)
    engine.start()
    wait_for(lambda: engine.ready)
    backend.gate.clear()
    blocker = engine.submit(["blocker"])
    wait_for(lambda: engine.queue_depth == 0)
    long_job = engine.submit([" ".join(["w"] * 100)] * 6)  # 102 tokens each: two fit in 256
    short_job = engine.submit(["short text"] * 8)
    backend.gate.set()
    blocker.wait(5)
    long_result, short_result = long_job.wait(5), short_job.wait(5)
    engine.stop(5)
    sizes = [len(batch) for batch in backend.batches[2:]]
    assert sizes == [8, 2, 2, 2]  # the short texts' batch first, then the long ones two at a time
    assert long_result.embeddings.shape[0] == 6 and short_result.embeddings.shape[0] == 8


def submitted_while_busy(engine: Engine, backend: FakeBackend, requests: list[list[str]]) -> list[Job]:
    """Start ``engine``, hold the model on a first one-text request, submit ``requests`` behind it (one window),
    and let the model go: the submitted requests' jobs, once the first is answered."""
    engine.start()
    wait_for(lambda: engine.ready)
    backend.gate.clear()
    blocker = engine.submit(["blocker"])
    wait_for(lambda: engine.queue_depth == 0)
    jobs = [engine.submit(texts) for texts in requests]
    backend.gate.set()
    blocker.wait(5)
    return jobs


@pytest.mark.parametrize(("overhead", "sizes"), [(1, [6, 2]), (1000, [8])])
def test_batches_are_cut_at_the_cost_of_a_forward_pass_the_model_measured(overhead: int, sizes: list[int]) -> None:
    """The planner trades padding for batches at the rate the backend measured at start: where a forward pass
    costs little, six short texts do not wait padded to two long ones; where it costs much, one batch."""
    backend = FakeBackend(max_seq_length=64, batch_overhead_tokens=overhead)
    engine, _ = make_engine(backend, batch_size=8)
    jobs = submitted_while_busy(engine, backend, [[" ".join(["w"] * 10)] * 2, ["short"] * 6])
    for job in jobs:
        job.wait(5)
    engine.stop(5)
    assert [len(batch) for batch in backend.batches[2:]] == sizes


def test_a_full_queue_is_refused_with_retry_after(backend: FakeBackend) -> None:
    engine, metrics = make_engine(backend, batch_size=2, queue_size=10)
    engine.start()
    wait_for(lambda: engine.ready)
    backend.gate.clear()
    first = engine.submit(["a"])
    wait_for(lambda: engine.queue_depth == 0)
    queued = engine.submit(["b"] * 10)
    assert engine.queue_depth == 10
    counted: list[str] = []
    token_spans = backend.token_spans
    backend.token_spans = lambda texts: counted.extend(texts) or token_spans(texts)  # type: ignore[method-assign]
    with pytest.raises(QueueFull) as caught:
        engine.submit(["c"])
    assert counted == []  # refused before the tokenizer ran: an overloaded service does no work for it
    assert caught.value.status == 429
    assert caught.value.headers() == {"Retry-After": "1"}
    assert metrics.registry.get_sample_value("embedding_rejected_total", {"reason": "queue_full"}) == 1
    assert metrics.registry.get_sample_value("embedding_queue_depth") == 10
    backend.gate.set()
    first.wait(5)
    assert len(queued.wait(5).embeddings) == 10  # the queued work was not lost
    engine.stop(5)


def test_a_failing_text_fails_only_its_own_request(backend: FakeBackend) -> None:
    backend.poison = "poison"
    engine, _ = make_engine(backend, batch_size=8)
    good, bad, other = submitted_while_busy(engine, backend, [["fine", "also fine"], ["poison"], ["more"]])
    assert good.wait(5).embeddings.shape == (2, 8)
    assert other.wait(5).embeddings.shape == (1, 8)
    with pytest.raises(ServiceError) as caught:
        bad.wait(5)
    assert caught.value.status == 500
    assert engine.submit(["after"]).wait(5).embeddings.shape == (1, 8)  # the thread lives on
    engine.stop(5)


@pytest.mark.parametrize("short_texts_fit", [False, True])
def test_a_batch_without_memory_is_retried_shortest_first_and_stops_at_the_first_text_that_does_not_fit(
    backend: FakeBackend, short_texts_fit: bool
) -> None:
    """No memory for a batch's forward pass: its texts are retried alone, shortest first. The first that does not
    fit fails the texts left (as long or longer) without a pass each: when nothing fits, the retry cost the
    batch's size plus one passes. Where the short texts fit, they are answered."""
    attempts: list[int] = []
    encode = backend.encode
    long_text = "the longest of the five texts"

    def out_of_memory(prepared: Any) -> Any:
        backend.gate.wait()
        texts: list[str] = prepared.features
        attempts.append(len(texts))
        fits = texts == ["blocker"] or (len(texts) == 1 and short_texts_fit and long_text not in texts)
        if not fits:
            raise MemoryError("out of memory")
        return encode(prepared)

    engine, _ = make_engine(backend, batch_size=8)
    engine.start()
    wait_for(lambda: engine.ready)  # warmed up with the real encode
    backend.encode = out_of_memory  # type: ignore[method-assign]
    backend.gate.clear()
    with capture_logs() as logs:
        blocker = engine.submit(["blocker"])  # holds the inference thread while the five requests queue
        wait_for(lambda: engine.queue_depth == 0)
        jobs = [engine.submit([text], request_id=f"req-{text[0]}") for text in (long_text, "b", "c", "d", "e")]
        backend.gate.set()
        blocker.wait(5)
        answered = []
        for job in jobs:
            try:
                job.wait(5)
                answered.append(True)
            except ServiceError as error:
                assert error.status == 500
                answered.append(False)
    abandoned = [e["request_ids"] for e in logs if e["event"] == "batch.abandoned"]
    if short_texts_fit:
        assert answered == [False, True, True, True, True]
        assert attempts == [1, 5, 1, 1, 1, 1, 1] and abandoned == []  # the longest text was tried last
    else:
        assert answered == [False] * 5
        assert attempts == [1, 5, 1]  # the blocker, the batch, its shortest text; the four others without a pass
        assert abandoned == [["req-c", "req-d", "req-e", "req-t"]]


def test_a_batch_log_names_its_requests_and_the_ready_gauge_falls_at_stop(backend: FakeBackend) -> None:
    engine, metrics = make_engine(backend, batch_size=8)
    engine.start()
    wait_for(lambda: engine.ready)
    assert metrics.ready._value.get() == 1
    backend.gate.clear()
    with capture_logs() as logs:
        first = engine.submit(["one"], request_id="req-a")
        wait_for(lambda: engine.queue_depth == 0)
        second, third = engine.submit(["two"], request_id="req-b"), engine.submit(["three"], request_id="req-c")
        backend.gate.set()
        for job in (first, second, third):
            job.wait(5)
    batches = [e["request_ids"] for e in logs if e["event"] == "batch.completed"]
    assert batches == [["req-a"], ["req-b", "req-c"]]
    engine.stop(5)
    assert metrics.ready._value.get() == 0  # a stopping engine is not ready (it was 1 until the process left)


def test_no_truncation_refuses_a_text_longer_than_the_model_takes(running: tuple[Engine, Metrics]) -> None:
    engine, _ = running
    long_text = " ".join(["word"] * 20)  # 22 tokens > 16
    with pytest.raises(Unprocessable) as caught:
        engine.submit(["short", long_text], truncate=False).wait(5)
    assert "input[1] has 22 tokens" in caught.value.message
    result = engine.submit([long_text], truncate=True).wait(5)
    assert result.token_counts == [16]


def test_stop_finishes_queued_work_then_refuses(backend: FakeBackend) -> None:
    engine, _ = make_engine(backend)
    engine.start()
    wait_for(lambda: engine.ready)
    backend.gate.clear()
    jobs = [engine.submit([f"text {i}"]) for i in range(10)]
    stopper = threading.Thread(target=engine.stop, kwargs={"timeout_s": 5})
    stopper.start()
    wait_for(lambda: engine.state == "stopping")
    with pytest.raises(Unavailable, match="shutting down"):
        engine.submit(["late"])
    backend.gate.set()
    stopper.join(5)
    assert all(job.wait(0.1).embeddings.shape == (1, 8) for job in jobs)
    assert engine.state == "stopped"


def test_a_model_that_does_not_load_fails_the_engine_and_reports_it() -> None:
    reported: list[BaseException] = []
    backend = FakeBackend(load_error="no such model")
    metrics = Metrics()
    engine = Engine(
        backend, batch_size=4, queue_size=8, metrics=metrics, rss_sampler=lambda: 0, on_fatal=reported.append
    )
    engine.start()
    wait_for(lambda: reported)
    assert engine.state == "failed"
    assert [str(e) for e in reported] == ["no such model"]
    with pytest.raises(Unavailable, match="model failed to load: no such model"):
        engine.submit(["x"])


class SlowToLoad(FakeBackend):
    """A model whose load takes ``load_s``."""

    def __init__(self, load_s: float) -> None:
        super().__init__()
        self.load_s = load_s

    def load(self) -> ModelInfo:
        time.sleep(self.load_s)
        return super().load()


@pytest.mark.parametrize(("load_s", "fails"), [(0.1, False), (0.6, True)])
def test_a_model_not_ready_within_the_start_up_timeout_fails_the_start(load_s: float, fails: bool) -> None:
    """EMBEDDING_STARTUP_TIMEOUT_S (here 0.3 s): a load within it serves and leaves no deadline behind; one past it
    fails the start with the setting named (the worker then exits with code 3), and its late end never makes it
    ready."""
    reported: list[BaseException] = []
    engine = Engine(
        SlowToLoad(load_s),
        batch_size=4,
        queue_size=8,
        metrics=Metrics(),
        rss_sampler=lambda: 0,
        on_fatal=reported.append,
        startup_timeout_s=0.3,
    )
    engine.start()
    time.sleep(load_s + 0.4)
    assert engine.state == ("failed" if fails else "ready")
    assert [type(e) for e in reported] == ([StartupTimedOut] if fails else [])
    if fails:
        assert "not ready within 0.3 s" in str(reported[0]) and "EMBEDDING_STARTUP_TIMEOUT_S" in str(reported[0])
        with pytest.raises(Unavailable, match=r"model failed to load: the model was not ready within 0\.3 s"):
            engine.submit(["x"])
    else:
        assert engine.submit(["x"]).wait(5).embeddings.shape == (1, 8)
    assert not [t for t in threading.enumerate() if t.name == "startup-deadline"]
    engine.stop(5)


class SeesItsDeadline(FakeBackend):
    """Loads at once, noting whether the start-up deadline was already running."""

    def load(self) -> ModelInfo:
        self.deadline_running = any(t.name == "startup-deadline" for t in threading.enumerate())
        return super().load()


def test_a_model_that_loads_at_once_serves_under_a_start_up_deadline() -> None:
    """The deadline runs before the load begins, so the inference thread can always end it once ready: started after
    the thread, a load quicker than the deadline's start stopped the thread unseen and every request waited out
    EMBEDDING_REQUEST_TIMEOUT_S (seen in CI with the fake model)."""
    for _ in range(30):
        backend = SeesItsDeadline()
        engine = Engine(
            backend, batch_size=4, queue_size=8, metrics=Metrics(), rss_sampler=lambda: 0, startup_timeout_s=60
        )
        engine.start()
        assert engine.wait_until_settled(5) and engine.ready
        assert engine.submit(["x"]).wait(5).embeddings.shape == (1, 8)
        assert backend.deadline_running
        assert engine.stop(5)


def test_a_timed_out_request_is_skipped_by_the_engine_and_its_wait_counted(backend: FakeBackend) -> None:
    engine, metrics = make_engine(backend)
    engine.start()
    wait_for(lambda: engine.ready)
    backend.gate.clear()
    blocker = engine.submit(["blocker"])
    wait_for(lambda: engine.queue_depth == 0)
    late: Job = engine.submit(["never needed"])
    with pytest.raises(Unavailable, match="timed out"):
        late.wait(0.05)
    backend.gate.set()
    blocker.wait(5)
    engine.stop(5)
    assert ["never needed"] not in backend.batches
    assert metrics.registry.get_sample_value("embedding_queue_wait_seconds_count") == 2
    assert late.queue_wait_s is not None and late.queue_wait_s >= 0.05


def test_hooks_run_between_batches_and_when_idle(backend: FakeBackend) -> None:
    engine, _ = make_engine(backend, batch_size=2)
    between: list[int] = []
    idle = threading.Event()
    engine.add_between_batches_hook(lambda: between.append(1))
    engine.add_idle_hook(idle.set)
    engine.add_between_batches_hook(lambda: 1 / 0)  # a broken hook must not stop the engine
    engine.start()
    wait_for(lambda: engine.ready)
    engine.submit(["a", "b", "c", "d", "e"]).wait(5)
    wait_for(lambda: len(between) == 3)  # one per batch: 2 + 2 + 1
    time.sleep(0.05)
    assert len(between) == 3
    assert idle.wait(3)
    engine.stop(5)


def test_queue_wait_is_measured_once_per_request_up_to_its_first_batch(backend: FakeBackend) -> None:
    engine, metrics = make_engine(backend, batch_size=2)
    engine.start()
    wait_for(lambda: engine.ready)
    backend.gate.clear()
    blocker = engine.submit(["blocker"])
    wait_for(lambda: engine.queue_depth == 0)  # the blocker is in the model, the next request must wait
    waiting = engine.submit(["a", "b", "c", "d", "e"])  # three batches, one wait
    time.sleep(0.2)
    backend.gate.set()
    blocker.wait(5)
    waiting.wait(5)
    engine.stop(5)
    value = metrics.registry.get_sample_value
    assert value("embedding_queue_wait_seconds_count") == 2
    assert blocker.queue_wait_s is not None and blocker.queue_wait_s < 0.2
    assert waiting.queue_wait_s is not None and waiting.queue_wait_s >= 0.2
    assert value("embedding_queue_wait_seconds_sum") == pytest.approx(blocker.queue_wait_s + waiting.queue_wait_s)


def test_tokens_per_input_and_padded_tokens_per_batch_are_observed(backend: FakeBackend) -> None:
    engine, metrics = make_engine(backend, batch_size=4)
    engine.start()
    wait_for(lambda: engine.ready)
    before = metrics.registry.get_sample_value("embedding_input_tokens_count") or 0
    engine.submit(["one", "two words here four"]).wait(5)  # 3 and 6 tokens: one batch of 2 x 6 slots
    engine.stop(5)
    value = metrics.registry.get_sample_value
    assert before == 0  # the warm-up is not counted
    assert value("embedding_input_tokens_count") == 2
    assert value("embedding_input_tokens_sum") == 9 == value("embedding_tokens_total")
    assert value("embedding_input_tokens_bucket", {"le": "4.0"}) == 1
    assert value("embedding_batch_padded_tokens_count") == 1
    assert value("embedding_batch_padded_tokens_sum") == 12


def held_behind_a_blocker(backend: FakeBackend, **engine_args: int) -> tuple[Engine, Metrics, Job]:
    """A running engine whose model is busy with one text until ``backend.gate`` is set."""
    engine, metrics = make_engine(backend, **engine_args)
    engine.start()
    wait_for(lambda: engine.ready)
    backend.gate.clear()
    blocker = engine.submit(["blocker"])
    wait_for(lambda: engine.queue_depth == 0)
    return engine, metrics, blocker


def release(engine: Engine, backend: FakeBackend, blocker: Job, *jobs: Job) -> list[list[str]]:
    """Let the model go on, wait for the blocker and ``jobs``, stop; the batches after warm-up and blocker."""
    backend.gate.set()
    for job in (blocker, *jobs):
        job.wait(5)
    engine.stop(5)
    return backend.batches[2:]


def test_a_small_request_is_not_stuck_behind_a_huge_one(backend: FakeBackend) -> None:
    engine, _, blocker = held_behind_a_blocker(backend, batch_size=4)
    huge = engine.submit([f"huge text {i}" for i in range(40)])
    small = engine.submit(["small text x"])
    batches = release(engine, backend, blocker, small, huge)
    (where,) = [n for n, batch in enumerate(batches) if "small text x" in batch]
    assert where < 4, f"the small request waited for {where} batches of the huge one"  # first-in-first-out: 10
    assert len(batches) == 11  # 41 texts in batches of 4: taking turns costs no batch


def test_a_window_holds_a_few_batches_of_tokens_and_counts_each_text_once(backend: FakeBackend) -> None:
    counted: list[str] = []
    counted_on: set[str] = set()
    token_spans = backend.token_spans

    def counting(texts: list[str]) -> list[list[tuple[int, int]]]:
        counted.extend(texts)
        counted_on.add(threading.current_thread().name)
        return token_spans(texts)

    backend.token_spans = counting  # type: ignore[method-assign]
    backend.max_seq_length = 128
    engine, _, blocker = held_behind_a_blocker(backend, batch_size=8, max_batch_tokens=64)
    long_text = " ".join(["w"] * 28)  # 30 tokens: a window of 4 x 64 tokens holds 8 of them
    huge = engine.submit([f"{i} {long_text}" for i in range(20)])
    small = engine.submit(["small"])
    batches = release(engine, backend, blocker, small, huge)
    assert "small" in batches[0]  # in the first window, and the shortest batch runs first
    assert len(batches) == 11  # 20 long texts two at a time, and the small one
    # Each text counted once, on the submitting thread: the inference thread only tokenizes for the model
    # (prepare), and a text put back in the queue for a later window is not counted again.
    assert Counter(text for text in counted if text in {"small", *huge.texts}) == dict.fromkeys(
        ["small", *huge.texts], 1
    )
    assert counted_on == {threading.current_thread().name}


def test_the_texts_of_a_request_whose_client_left_are_not_computed(backend: FakeBackend) -> None:
    engine, metrics, blocker = held_behind_a_blocker(backend)
    gone = engine.submit([f"never needed {i}" for i in range(5)])
    gone.fail(ClientClosed("the client closed the connection"))
    release(engine, backend, blocker, engine.submit(["after"]))
    assert not any(text.startswith("never needed") for batch in backend.batches for text in batch)
    assert metrics.registry.get_sample_value("embedding_queue_depth") == 0
    assert gone.queue_wait_s is not None


def test_a_crashed_inference_thread_fails_waiting_requests_and_asks_for_a_restart(backend: FakeBackend) -> None:
    reported: list[BaseException] = []
    metrics = Metrics()
    engine = Engine(
        backend, batch_size=4, queue_size=8, metrics=metrics, rss_sampler=lambda: 0, on_fatal=reported.append
    )
    engine.start()
    wait_for(lambda: engine.ready)

    def bug(window: object) -> None:
        raise RuntimeError("a bug in the engine")

    engine._process = bug  # type: ignore[method-assign]
    with pytest.raises(ServiceError, match="crashed"):
        engine.submit(["x"]).wait(5)
    wait_for(lambda: reported)
    assert engine.state == "failed"
    assert [type(e) for e in reported] == [EngineCrashed]
    with pytest.raises(Unavailable, match="crashed"):
        engine.submit(["y"])


def test_a_request_past_its_timeout_lets_its_texts_go_and_they_are_not_computed(backend: FakeBackend) -> None:
    engine, _, blocker = held_behind_a_blocker(backend)
    late = engine.submit([f"too late {i}" for i in range(5)])
    started = time.monotonic()
    with pytest.raises(Unavailable, match="timed out after 1s") as caught:
        late.wait(1.0, waited_s=0.9)  # 0.9 s of its timeout went before it was queued (reading, tokenizing)
    assert time.monotonic() - started < 0.5
    assert caught.value.status == 503
    assert late.texts == [""] * 5  # its memory goes now, not when the engine reaches it
    batches = release(engine, backend, blocker, engine.submit(["after"]))
    assert not any("too late" in text for batch in batches for text in batch)


def test_batches_are_held_to_fewer_tokens_while_memory_is_short(backend: FakeBackend) -> None:
    engine, _, blocker = held_behind_a_blocker(backend, batch_size=8, max_batch_tokens=64)
    engine.limit_batch_tokens(1)  # the least there is: one text of the model's maximum length (16 tokens)
    assert engine.max_batch_tokens == backend.max_seq_length
    held = engine.submit([f"t{i} x" for i in range(6)])  # 4 tokens each
    batches = release(engine, backend, blocker, held)
    assert sorted(len(b) for b in batches) == [2, 4]  # 16 padded tokens a batch instead of 64
    engine.limit_batch_tokens(None)
    assert engine.max_batch_tokens == 64


def test_a_text_the_tokenizer_cannot_take_fails_its_request_with_its_index(running: tuple[Engine, Metrics]) -> None:
    engine, _ = running
    backend: FakeBackend = engine._backend  # type: ignore[assignment]
    spans = backend.token_spans

    def breaking(texts: list[str]) -> list[list[tuple[int, int]]]:
        if any("\x00boom" in text for text in texts):
            raise ValueError("the tokenizer cannot take this")
        return spans(texts)

    backend.token_spans = breaking  # type: ignore[method-assign]
    with pytest.raises(Unprocessable, match=r"input\[2\] could not be tokenized") as caught:
        engine.submit(["fine", "also fine", "bad \x00boom", "fine too"])
    assert caught.value.status == 422
    assert engine.submit(["fine"]).wait(5).embeddings.shape == (1, 8)  # other requests go on


class SlowBackend(FakeBackend):
    """The fake model at 1 ms a padded token (texts x longest): a speed the engine can measure."""

    def encode(self, prepared: Any) -> Any:
        time.sleep(0.001 * len(prepared.token_counts) * max(prepared.token_counts))
        return super().encode(prepared)


class OverheadBackend(FakeBackend):
    """The fake model at 50 ms a batch plus 0.1 ms a padded token: a one-text batch looks slow per token."""

    def encode(self, prepared: Any) -> Any:
        time.sleep(0.05 + 0.0001 * len(prepared.token_counts) * max(prepared.token_counts))
        return super().encode(prepared)


def test_a_small_batchs_fixed_cost_does_not_make_a_long_queue_look_slow() -> None:
    engine = Engine(
        OverheadBackend(),
        batch_size=32,
        queue_size=4096,
        metrics=Metrics(),
        rss_sampler=lambda: 0,
        request_timeout_s=1.0,
    )
    engine.start()
    wait_for(lambda: engine.ready)
    engine.submit(["one"]).wait(5)  # about 17 ms a token, were it counted per token
    engine.submit(["x " * 10] * 32).wait(5)  # one full batch: about 0.24 ms a token
    answer = engine.submit(["x " * 10] * 96).wait(5)  # three batches: about 0.3 s, well within the 1 s timeout
    assert len(answer.token_counts) == 96
    engine.stop(5)


def test_a_request_that_would_time_out_waiting_is_refused_before_it_costs_work() -> None:
    backend = SlowBackend()
    metrics = Metrics()
    engine = Engine(
        backend, batch_size=32, queue_size=4096, metrics=metrics, rss_sampler=lambda: 0, request_timeout_s=1.0
    )
    engine.start()
    wait_for(lambda: engine.ready)
    assert len(engine.submit(["x " * 10] * 40).wait(30).token_counts) == 40  # nothing measured yet: admitted
    with pytest.raises(TooSlow) as alone:
        engine.submit(["x " * 10] * 200)  # 2400 tokens: about 2.8 s, never within the 1 s timeout
    assert alone.value.status == 413 and "longer than its timeout allows (1 s" in alone.value.message
    backend.gate.clear()  # the model holds the next batch: what is queued stays queued
    blocker = engine.submit(["blocker"])
    wait_for(lambda: engine.queue_depth == 0)
    admitted: list[Job] = []
    with pytest.raises(QueueFull) as late:
        for _ in range(100):
            admitted.append(engine.submit(["a b c d e f g h"] * 2))  # 20 tokens, about 23 ms each
    assert 10 <= len(admitted) < 100  # the first ones fit in the 0.8 s there is, then the queue is full of time
    assert late.value.headers()["Retry-After"] in {str(n) for n in range(1, 61)}
    assert "would not be answered within its timeout" in late.value.message
    assert metrics.registry.get_sample_value("embedding_rejected_total", {"reason": "queue_time"}) == 1
    assert metrics.registry.get_sample_value("embedding_rejected_total", {"reason": "too_slow"}) == 1
    backend.gate.set()
    for job in (blocker, *admitted):
        job.wait(30)
    engine.stop(5)


def test_a_wedged_inference_thread_shows_as_stalled_seconds(running: tuple[Engine, Metrics]) -> None:
    engine, metrics = running

    def stalled() -> float:
        value = metrics.registry.get_sample_value("embedding_inference_stalled_seconds")
        assert value is not None
        return value

    assert stalled() == 0  # idle: nothing waits
    backend: FakeBackend = engine._backend  # type: ignore[assignment]
    backend.gate.clear()  # the model holds its batch: no progress
    first = engine.submit(["held"])
    queued = engine.submit(["waits behind it"])
    time.sleep(0.3)
    assert stalled() >= 0.25  # texts wait, no batch finishes
    backend.gate.set()
    first.wait(5)
    queued.wait(5)
    wait_for(lambda: stalled() == 0)  # idle again


def test_the_time_the_inference_thread_is_busy_is_counted_batch_by_batch(
    running: tuple[Engine, Metrics], backend: FakeBackend
) -> None:
    """embedding_inference_busy_seconds_total, the autoscaler's saturation signal: each batch's time, held batches
    included, and nothing while idle."""
    engine, metrics = running
    busy = lambda: metrics.registry.get_sample_value("embedding_inference_busy_seconds_total") or 0.0  # noqa: E731
    before = busy()
    time.sleep(0.2)  # idle: not counted
    assert busy() == before
    backend.gate.clear()  # the batch is held in the model
    job = engine.submit(["held", "texts"])
    wait_for(lambda: not engine.is_idle())
    time.sleep(0.3)
    backend.gate.set()
    job.wait(5)
    assert 0.3 <= busy() - before < 5
