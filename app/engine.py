"""The inference engine: one thread owns the model; request threads enqueue and wait.

Requests wait in one bounded queue (``queue_size`` texts in all). The inference
thread takes a window of texts round-robin over the waiting requests, one text
from each in turn, so a small request is never stuck behind a huge one; a window
holds a few batches' worth of texts and of tokens (texts over the token budget
go back to the queue, already counted). It sorts the window by token count and
cuts it into batches of at most ``batch_size`` texts of similar length
(:func:`plan_batches`), so little compute and memory goes to padding; a budget of
padded tokens a batch (``max_batch_tokens``) bounds the activation memory of
batches of long texts. The shortest batches run first, so short requests finish
first.
Between batches it runs the hooks the memory manager registers.
A failing batch is retried text by text, so one bad input fails only its own
request. The texts of a request that has finished (its client gave up or went
away) are dropped, not computed.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import structlog

from app.backend import EmbeddingBackend, ModelInfo, Token
from app.errors import ModelFailed, QueueFull, ServiceError, TokenizerFailed, TooSlow, Unavailable, Unprocessable
from app.metrics import Metrics
from app.truncation import Fitted, Fitter

log = structlog.get_logger("app.engine")

WINDOW_BATCHES = 4
"""How many batches' worth of queued texts are sorted together."""

IDLE_TICK_S = 1.0
"""How often an idle inference thread wakes to run its idle hooks."""

WARM_UP_TEXTS = ("warm-up", "A short sentence to warm the model up.")


def plan_batches(lengths: list[int], max_size: int, overhead: int, max_tokens: int | None = None) -> list[slice]:
    """Cut texts sorted by length (longest first) into batches that waste the least padding.

    Minimises the sum over batches of ``overhead + size * longest`` with at most
    ``max_size`` texts a batch: a window of mixed titles and passages becomes a
    few batches of similar length instead of every text padded to the longest.
    With ``max_tokens``, no batch holds more than that many padded token slots
    (a single text always fits): it bounds the activation memory of one batch.
    """
    count = len(lengths)
    best = [0.0] + [float("inf")] * count  # best[j]: cheapest plan for the first j texts
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        for start in range(max(0, end - max_size), end):
            if max_tokens is not None and end - start > 1 and (end - start) * lengths[start] > max_tokens:
                continue
            cost = best[start] + overhead + (end - start) * lengths[start]
            if cost <= best[end]:  # on a tie, the later cut: full batches first
                best[end], cut[end] = cost, start
    spans: list[slice] = []
    end = count
    while end > 0:
        spans.append(slice(cut[end], end))
        end = cut[end]
    return spans[::-1]


QUEUE_TIME_SHARE = 0.8
"""A request is queued only if the work ahead of it and its own are estimated to take at most this share of
its timeout: one that would time out waiting is refused at once, before it costs any work."""

PADDING_SLACK = 1.15
"""Texts are padded to the longest of their batch: a text's tokens cost about this much more in a batch."""

SPEED_WINDOW = 9
"""Full batches whose speed (seconds per padded token) is remembered; their median is the drain rate."""

CRASH_MESSAGE = "the inference thread crashed; the service restarts"


class StartupTimedOut(RuntimeError):
    """The model was not loaded, calibrated and warmed within ``EMBEDDING_STARTUP_TIMEOUT_S``: the worker stops
    the server (exit code 3) rather than hold its socket, or answer 503, for ever."""


class EngineCrashed(RuntimeError):
    """The inference thread died while serving (a bug): the process must be replaced, not kept half alive."""


@dataclass(frozen=True)
class BatchStats:
    """What one model batch did; handed to batch observers and logged."""

    size: int
    tokens: int
    requests: int
    duration_s: float
    rss_before_bytes: int
    rss_after_bytes: int
    padded_tokens: int = 0

    @property
    def rss_delta_bytes(self) -> int:
        return self.rss_after_bytes - self.rss_before_bytes


@dataclass(frozen=True)
class EmbeddingResult:
    """The embeddings of one request's texts, in input order, and their token counts."""

    embeddings: np.ndarray
    token_counts: list[int]
    queue_s: float = 0.0
    """Seconds from the request's enqueueing to the start of its first batch."""
    inference_s: float = 0.0
    """Seconds from the start of its first batch to its last text's vector."""
    token_vectors: list[np.ndarray] | None = None
    """Each text's token vectors (``POST /embed_all``), when the request asked for them."""
    tokenization_s: float = 0.0
    """Seconds spent cutting and counting its texts' tokens, on the request's thread, before it was queued."""
    truncated: frozenset[int] = frozenset()
    """Indices of the texts cut at the model's maximum sequence length (the model did not read them whole)."""

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


@dataclass(eq=False)
class Job:
    """One request's texts on their way through the engine."""

    texts: list[str]
    truncate: bool
    dimensions: int
    request_id: str | None = None
    enqueued_at: float = field(default_factory=time.perf_counter)
    queue_wait_s: float | None = None
    """Seconds from :attr:`enqueued_at` to the start of its first batch (or to being dropped unrun)."""
    completed_at: float | None = None
    """When its last text's vector was delivered."""
    lengths: list[int] = field(default_factory=list)
    """Tokens the model reads of each text (special tokens included), counted when it was submitted."""
    wants_tokens: bool = False
    """Answer each text's token vectors (``POST /embed_all``) instead of its pooled vector."""
    truncated: frozenset[int] = frozenset()
    """Indices of the texts cut at the model's maximum sequence length (found when it was submitted)."""
    tokenization_s: float = 0.0
    """Seconds its texts took to cut and count, on the request's thread (TEI's ``x-tokenization-time``)."""
    embeddings: np.ndarray = field(init=False)
    token_vectors: list[np.ndarray] | None = field(init=False)
    token_counts: list[int] = field(init=False)
    error: ServiceError | None = None
    cancelled: bool = False
    pending: deque[int] = field(init=False)
    """Indices of the texts not yet taken into a window (the engine's, under its lock)."""
    queued: bool = True
    """In the engine's queue of requests with texts to take."""
    _remaining: int = field(init=False)
    _done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.embeddings = np.zeros((len(self.texts), 0 if self.wants_tokens else self.dimensions), dtype=np.float32)
        self.token_vectors = [np.empty((0, 0), dtype=np.float32)] * len(self.texts) if self.wants_tokens else None
        self.token_counts = [0] * len(self.texts)
        self.pending = deque(range(len(self.texts)))
        self.lengths = self.lengths or [1] * len(self.texts)
        self._remaining = len(self.texts)

    @property
    def finished(self) -> bool:
        return self._done.is_set() or self.cancelled

    def deliver(self, index: int, vector: np.ndarray, tokens: int) -> None:
        """Store one text's embedding (its token vectors for a job that wants them); the job completes with its
        last text."""
        if self.token_vectors is not None:
            self.token_vectors[index] = vector
        else:
            self.embeddings[index] = vector
        self.token_counts[index] = tokens
        self._remaining -= 1
        if self._remaining == 0:
            self.completed_at = time.perf_counter()
            self._done.set()

    def fail(self, error: ServiceError) -> None:
        """Complete the job with an error (its other texts are skipped, and let go)."""
        if not self._done.is_set():
            self.error = error
            self._done.set()
            self._let_texts_go()

    def wait(self, timeout_s: float, *, waited_s: float = 0.0) -> EmbeddingResult:
        """Block until the job completes; raise its error, or 503 when ``timeout_s`` passes (``waited_s`` of it
        already spent before the job was queued): its texts are let go then, computed or not."""
        if not self._done.wait(max(0.0, timeout_s - waited_s)):
            self.cancelled = True
            self._let_texts_go()
            raise Unavailable(f"request timed out after {timeout_s:g}s in the inference queue", retry_after_s=5)
        if self.error is not None:
            raise self.error
        queue_s = self.queue_wait_s or 0.0
        inference_s = max(0.0, (self.completed_at or self.enqueued_at) - self.enqueued_at - queue_s)
        return EmbeddingResult(
            self.embeddings,
            self.token_counts,
            queue_s,
            inference_s,
            self.token_vectors,
            self.tokenization_s,
            self.truncated,
        )

    def _let_texts_go(self) -> None:
        """Drop the texts of a job no one waits for, so their memory goes before the engine reaches them
        (in place: the inference thread may be reading the list)."""
        for i in range(len(self.texts)):
            self.texts[i] = ""


class Engine:
    """Owns the backend and the inference thread; the only code that touches the model."""

    def __init__(
        self,
        backend: EmbeddingBackend,
        *,
        batch_size: int,
        max_batch_tokens: int | None = None,
        queue_size: int,
        metrics: Metrics,
        rss_sampler: Callable[[], int],
        on_fatal: Callable[[BaseException], None] | None = None,
        request_timeout_s: float | None = None,
        startup_timeout_s: float | None = None,
    ) -> None:
        self._backend = backend
        self._request_timeout_s = request_timeout_s
        self._startup_timeout_s = startup_timeout_s
        self._deadline: threading.Timer | None = None
        self._batch_size = batch_size
        self._max_batch_tokens = max_batch_tokens
        self._queue_size = queue_size
        self._metrics = metrics
        self._rss = rss_sampler
        self._on_fatal = on_fatal
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()  # requests with texts to take, in round-robin order
        self._pending = 0  # texts queued and not yet taken into a window
        self._state = "created"
        self._busy = threading.Lock()  # held while the model runs a batch
        self._thread: threading.Thread | None = None
        self._between_batches: list[Callable[[], None]] = []
        self._on_idle: list[Callable[[], None]] = []
        self._on_ready: list[Callable[[], None]] = []
        self._batch_observers: list[Callable[[BatchStats], None]] = []
        self._batch_tokens_now = max_batch_tokens  # max_batch_tokens, or less while memory is short
        self._speeds: deque[float] = deque(maxlen=SPEED_WINDOW)  # seconds per padded token of recent full batches
        self._progress_at = time.monotonic()  # a batch finished, or work came to an idle engine
        metrics.inference_stalled.set_function(self.stalled_s)
        self._fitter: Fitter | None = None
        for reason in ("queue_full", "queue_time", "too_slow"):
            metrics.rejected.labels(reason=reason)
        self.info: ModelInfo | None = None
        self.failure: str | None = None

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the inference thread; it loads and warms the model, then serves."""
        with self._cond:
            if self._state != "created":
                raise RuntimeError("engine already started")
            self._state = "loading"
        if self._startup_timeout_s is not None:  # started first: the inference thread joins it once ready
            self._deadline = threading.Timer(self._startup_timeout_s, self._startup_overdue)
            self._deadline.name, self._deadline.daemon = "startup-deadline", True
            self._deadline.start()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    def _startup_overdue(self) -> None:
        """At the start-up deadline: a model still loading fails the start (however far it got)."""
        if self._state == "loading":
            self._fail(
                StartupTimedOut(
                    f"the model was not ready within {self._startup_timeout_s:g} s of the worker's start "
                    "(EMBEDDING_STARTUP_TIMEOUT_S): raise it for a model this large on this machine"
                )
            )

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Refuse new work, finish what is queued, stop the thread; True when it stopped in time."""
        with self._cond:
            if self._state in ("created", "stopped"):
                self._state = "stopped"
                return True
            if self._state != "failed":
                self._state = "stopping"
            self._metrics.ready.set(0)
            self._cond.notify_all()
        if self._deadline is not None:
            self._deadline.cancel()
            if self._deadline is not threading.current_thread():
                self._deadline.join(timeout_s)
        if self._thread is not None:
            self._thread.join(timeout_s)
            return not self._thread.is_alive()
        return True

    @property
    def state(self) -> str:
        """created, loading, ready, stopping, stopped or failed."""
        return self._state

    @property
    def ready(self) -> bool:
        return self._state == "ready"

    def wait_until_settled(self, timeout_s: float | None = None) -> bool:
        """Block until the model is loaded and warmed (True), or its load failed or the engine stopped (False)."""
        with self._cond:
            self._cond.wait_for(lambda: self._state not in ("created", "loading"), timeout_s)
            return self._state == "ready"

    @property
    def queue_depth(self) -> int:
        return self._pending

    def stalled_s(self) -> float:
        """Seconds the engine has had work without finishing a batch; 0 while idle."""
        return 0.0 if self.is_idle() else max(0.0, time.monotonic() - self._progress_at)

    def is_idle(self) -> bool:
        """True when nothing is queued and no batch is running."""
        return self._pending == 0 and not self._busy.locked()

    def release_model_caches(self) -> None:
        """Let the backend give back framework caches; call inside :meth:`exclusive`."""
        self._backend.release_caches()

    @property
    def max_batch_tokens(self) -> int | None:
        """The padded tokens a batch may hold now."""
        return self._batch_tokens_now

    def limit_batch_tokens(self, tokens: int | None) -> None:
        """Hold batches to at most ``tokens`` padded tokens (never under one text of the model's maximum
        length), or with None back to ``max_batch_tokens``: the memory manager's lever on activation memory.
        Takes effect at the next window."""
        if tokens is None:
            self._batch_tokens_now = self._max_batch_tokens
            return
        floor = self.info.max_seq_length if self.info else 1
        ceiling = self._max_batch_tokens if self._max_batch_tokens is not None else tokens
        self._batch_tokens_now = max(floor, min(tokens, ceiling))

    # --- hooks for the memory manager -------------------------------------

    def add_between_batches_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` on the inference thread after every batch."""
        self._between_batches.append(hook)

    def add_ready_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` on the inference thread once, after warm-up and before serving."""
        self._on_ready.append(hook)

    def add_idle_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` on the inference thread about every second while no work is queued."""
        self._on_idle.append(hook)

    def add_batch_observer(self, observer: Callable[[BatchStats], None]) -> None:
        """Call ``observer`` with the statistics of every completed batch."""
        self._batch_observers.append(observer)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the model: no batch starts until the block ends."""
        with self._busy:
            yield

    # --- request side -------------------------------------------------------

    def submit(
        self,
        texts: list[str],
        *,
        truncate: bool = True,
        keep_end: bool = False,
        prefix: str = "",
        request_id: str | None = None,
        token_vectors: bool = False,
    ) -> Job:
        """Queue texts, each with ``prefix`` before it, for embedding; raise 429 when the queue is full, 503
        when not serving, 422 when a text too long for the model must not be truncated. With ``keep_end``
        (``truncation_direction=left``) a text too long loses its start instead of its end; the prefix stays.
        With ``token_vectors`` the job answers each text's token vectors instead of its pooled vector.

        Here, on the caller's thread (in parallel with inference), each text is cut to what the model reads
        (:class:`app.truncation.Fitter`): the queue holds those pieces and their token counts, and the inference
        thread tokenizes each piece once, in ``prepare``.
        """
        with self._cond:
            self._refuse_unless_room(len(texts))  # refused before the tokenizer runs: overload costs no work
        started = time.perf_counter()
        fitted = self._fit(texts, prefix, keep_end=keep_end and truncate)
        if not truncate:
            self._refuse_over_long(texts, prefix, fitted)
        tokenization_s = time.perf_counter() - started
        with self._cond:
            self._refuse_unless_room(len(texts))  # again: the queue may have filled while this thread counted
            self._refuse_unless_in_time(sum(f.tokens for f in fitted))
            assert self.info is not None
            job = Job(
                [f.text for f in fitted],
                truncate,
                self.info.dimensions,
                request_id,
                lengths=[f.tokens for f in fitted],
                wants_tokens=token_vectors,
                truncated=frozenset(i for i, f in enumerate(fitted) if f.over),
                tokenization_s=tokenization_s,
            )
            if self.is_idle():
                self._progress_at = time.monotonic()
            self._jobs.append(job)
            self._pending += len(texts)
            if job.truncated:
                self._metrics.inputs_truncated.labels(at="tokens").inc(len(job.truncated))
            self._metrics.queue_depth.set(self._pending)
            self._cond.notify()
        return job

    def _fit(self, texts: list[str], prefix: str, *, keep_end: bool) -> list[Fitted]:
        """Each text as the model reads it; 422 naming the first text the tokenizer cannot take."""
        assert self._fitter is not None
        try:
            return self._fitter.fit(texts, prefix, keep_end=keep_end)
        except Exception:  # noqa: BLE001  (find the text that breaks the tokenizer: the request's, answered 422)
            index = self._first_untokenizable(texts, prefix, keep_end=keep_end)
        which = "the input" if index is None else f"input[{index}]"
        raise TokenizerFailed(f"{which} could not be tokenized", param="input")

    def _first_untokenizable(self, texts: list[str], prefix: str, *, keep_end: bool) -> int | None:
        assert self._fitter is not None
        for index, text in enumerate(texts):
            try:
                self._fitter.fit([text], prefix, keep_end=keep_end)
            except Exception as exc:  # noqa: BLE001  (a text the tokenizer cannot take is the client's)
                log.warning("tokenizer.failed", index=index, error=str(exc), error_type=type(exc).__name__)
                return index
        return None  # each alone passes: only the texts together failed

    def _token_spans(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        return self._backend.token_spans(texts)

    def _refuse_over_long(self, texts: list[str], prefix: str, fitted: list[Fitted]) -> None:
        """422 for the first text over the model's maximum, with its true length (tokenized whole, then let go)."""
        assert self._fitter is not None and self.info is not None
        limit = self.info.max_seq_length
        for index, (text, fit) in enumerate(zip(texts, fitted, strict=True)):
            if fit.over and (tokens := self._fitter.count(prefix + text)) > limit:
                raise Unprocessable(
                    f"input[{index}] has {tokens} tokens, more than the model's maximum of {limit}; "
                    "shorten it or set truncate to true",
                    param="input",
                )

    def decode(self, ids: list[list[int]], *, skip_special_tokens: bool = True) -> list[str]:
        """Each list of token ids as text (``POST /decode``), on the caller's thread; 422 if the tokenizer fails."""
        self._require_serving()
        try:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        except Exception as exc:  # noqa: BLE001  (ids the tokenizer cannot take are the client's)
            log.warning("tokenizer.failed", error=str(exc), error_type=type(exc).__name__)
            raise TokenizerFailed("the tokenizer could not decode the ids") from None

    def tokenize(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[Token]]:
        """Each text's tokens (``POST /tokenize``), on the caller's thread; 422 if the tokenizer fails."""
        self._require_serving()
        try:
            return self._backend.tokenize(texts, add_special_tokens=add_special_tokens)
        except Exception as exc:  # noqa: BLE001  (a text the tokenizer cannot take is the client's)
            log.warning("tokenizer.failed", error=str(exc), error_type=type(exc).__name__)
            raise TokenizerFailed("the tokenizer could not encode the input") from None

    def _require_serving(self) -> None:
        if self._state != "ready" or self.info is None:
            raise Unavailable(self.unavailable_reason(), retry_after_s=5)

    def _refuse_unless_room(self, texts: int) -> None:
        """503 unless serving, 429 when ``texts`` more would overflow the queue; called holding ``_cond``."""
        self._require_serving()
        if self._pending + texts > self._queue_size:
            self._metrics.rejected.labels(reason="queue_full").inc()
            raise QueueFull(
                f"inference queue is full ({self._pending} of {self._queue_size} texts waiting)",
                retry_after_s=1,
            )

    def _refuse_unless_in_time(self, tokens: int) -> None:
        """Refuse a request that would time out (``request_timeout_s``) before its answer, at the speed batches
        have run at: 413 when its own ``tokens`` take too long, 429 while the work ahead of it does (under
        ``_cond``). Until a full batch has run, nothing is known and nothing refused."""
        timeout = self._request_timeout_s
        if not self._speeds or timeout is None:
            return
        per_token = statistics.median(self._speeds)
        room_s = QUEUE_TIME_SHARE * timeout
        own_s = tokens * per_token * PADDING_SLACK
        if own_s > room_s:
            self._metrics.rejected.labels(reason="too_slow").inc()
            raise TooSlow(
                f"this request's {tokens} tokens would take about {own_s:.0f} s to embed, longer than its timeout "
                f"allows ({timeout:g} s, EMBEDDING_REQUEST_TIMEOUT_S); send fewer texts per request"
            )
        ahead = sum(job.lengths[i] for job in self._jobs for i in job.pending)
        ahead_s = ahead * per_token * PADDING_SLACK
        if ahead_s + own_s > room_s:
            self._metrics.rejected.labels(reason="queue_time").inc()
            raise QueueFull(
                f"the queue holds about {ahead_s:.0f} s of work; this request would not be answered within its "
                f"timeout ({timeout:g} s); retry shortly",
                retry_after_s=max(1, min(60, math.ceil(ahead_s + own_s - room_s))),
            )

    def unavailable_reason(self) -> str:
        """Why the engine takes no work now: its model loading, failed, or the engine stopping."""
        if self._state in ("created", "loading"):
            return "model is loading"
        if self._state == "failed":
            return f"model failed to load: {self.failure}"
        return "service is shutting down"

    # --- inference thread ---------------------------------------------------

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001  (the thread must report every start failure)
            if self._state == "ready":  # failed after it said ready: requests are waiting on a thread that has gone
                self._crash(exc)
            else:
                self._fail(exc)
            return
        if self._state == "failed":
            return
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001  (a dead inference thread must not leave a service that never answers)
            self._crash(exc)
            return
        with self._cond:
            self._state = "stopped"
        log.info("engine.stopped")

    def _serve(self) -> None:
        while True:
            window = self._take_window()
            if window is None:
                return
            if not window:
                self._run_hooks(self._on_idle)
                continue
            try:
                self._process(window)
            except BaseException:
                for job, _ in window:
                    job.fail(ModelFailed(CRASH_MESSAGE))
                raise

    def _crash(self, exc: BaseException) -> None:
        with self._cond:
            self._state = "failed"
            self._metrics.ready.set(0)
            self.failure = f"the inference thread crashed: {type(exc).__name__}: {exc}"
            jobs, self._jobs = list(self._jobs), deque()
        log.critical("engine.crashed", error=str(exc), error_type=type(exc).__name__, exc_info=exc)
        for job in jobs:
            job.fail(ModelFailed(CRASH_MESSAGE))
        if self._on_fatal is not None:
            self._on_fatal(EngineCrashed(self.failure))

    def _load(self) -> None:
        started = time.perf_counter()
        info = self._backend.load()
        loaded = time.perf_counter()
        self._fitter = Fitter(self._token_spans, max_tokens=info.max_seq_length, special_tokens=info.special_tokens)
        self.info = info
        warm_up = [*WARM_UP_TEXTS, " ".join(["warm"] * info.max_seq_length)]
        self._encode(warm_up, tokens=True)
        self._run_hooks(self._on_ready)
        self._metrics.model_info.labels(
            model=info.model_id,
            device=info.device,
            dimensions=str(info.dimensions),
            dtype=info.dtype,
            backend=info.backend,
        ).set(1)
        with self._cond:
            if self._state == "failed":
                return  # past the start-up deadline: it never serves
            if self._state == "loading":
                self._state = "ready"
                self._metrics.ready.set(1)
            self._cond.notify_all()
        if self._deadline is not None:  # gone once ready: a serving engine runs no thread of its start
            self._deadline.cancel()
            self._deadline.join()
        log.info(
            "model.loaded",
            model=info.model_id,
            device=info.device,
            dtype=info.dtype,
            dtype_reason=info.dtype_reason,
            backend=info.backend,
            backend_reason=info.backend_reason,
            dimensions=info.dimensions,
            max_seq_length=info.max_seq_length,
            batch_overhead_tokens=info.batch_overhead_tokens,
            batch_cost=info.batch_cost,
            calibration=info.calibration,
            calibrated_at=info.calibrated_at,
            calibration_note=info.calibration_note,
            load_s=round(loaded - started, 3),
            warm_up_s=round(time.perf_counter() - loaded, 3),
            rss_bytes=self._rss(),
        )

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._state != "loading":
                return  # the deadline and a failing load both fail a start: the first one says why
            self._state = "failed"
            self.failure = str(exc)
            self._cond.notify_all()
        log.error("model.load_failed", error=str(exc), error_type=type(exc).__name__)
        if self._on_fatal is not None:
            self._on_fatal(exc)

    def _take_window(self) -> list[tuple[Job, int]] | None:
        """Up to a few batches of queued texts, one from each request in turn; [] when idle; None when stopped."""
        with self._cond:
            if not self._pending:
                if self._state != "ready":
                    return None
                self._cond.wait(IDLE_TICK_S)
            window: list[tuple[Job, int]] = []
            limit = self._batch_size * WINDOW_BATCHES
            while self._jobs and len(window) < limit:
                for job in list(self._jobs):
                    if len(window) >= limit:
                        break
                    if job.finished or not job.pending:
                        self._unqueue(job)
                        self._leave_queue(job, time.perf_counter())  # it gave up waiting: the wait counts all the same
                        continue
                    window.append((job, job.pending.popleft()))  # one text from each request in turn
                    self._pending -= 1
                    if not job.pending:
                        self._unqueue(job)
            self._metrics.queue_depth.set(self._pending)
            return window

    def _unqueue(self, job: Job) -> None:
        """Take ``job`` off the queue with whatever texts it still had there (under the lock)."""
        self._pending -= len(job.pending)
        job.pending.clear()
        job.queued = False
        self._jobs.remove(job)

    def _put_back(self, items: list[tuple[Job, int]]) -> None:
        """Return texts taken but not computed to the front of their requests' queues."""
        by_job: dict[int, tuple[Job, list[int]]] = {}
        for job, index in items:
            if not job.finished:
                by_job.setdefault(id(job), (job, []))[1].append(index)
        with self._cond:
            for job, indices in reversed(list(by_job.values())):
                job.pending.extendleft(sorted(indices, reverse=True))
                self._pending += len(indices)
                if not job.queued:
                    job.queued = True
                    self._jobs.appendleft(job)
            self._metrics.queue_depth.set(self._pending)

    def _leave_queue(self, job: Job, now: float) -> None:
        """Record how long ``job`` waited for the model, once."""
        if job.queue_wait_s is None:
            job.queue_wait_s = now - job.enqueued_at
            self._metrics.queue_wait.observe(job.queue_wait_s)

    def _process(self, window: list[tuple[Job, int]]) -> None:
        max_tokens = self._batch_tokens_now
        window, lengths = self._within_token_budget(window, [job.lengths[i] for job, i in window], max_tokens)
        items = [(job, i, n) for (job, i), n in zip(window, lengths, strict=True) if not job.finished]
        items.sort(key=lambda item: item[2], reverse=True)
        assert self.info is not None
        overhead = self.info.batch_overhead_tokens  # measured at start (ModelInfo)
        spans = plan_batches([n for _, _, n in items], self._batch_size, overhead, max_tokens)
        for span in reversed(spans):  # shortest first: the requests of short texts are answered soonest
            batch = [(job, i) for job, i, _ in items[span] if not job.finished]
            if batch:
                self._run_batch(batch)
            self._run_hooks(self._between_batches)
        # Requests that never reached a batch (timed out, refused at tokenizing, client gone) waited until now.
        for job, _ in window:
            if job.finished:
                self._leave_queue(job, time.perf_counter())

    def _within_token_budget(
        self, window: list[tuple[Job, int]], lengths: list[int], max_tokens: int | None
    ) -> tuple[list[tuple[Job, int]], list[int]]:
        """The window's first texts up to a few batches' worth of tokens; the rest goes back to the queue."""
        if max_tokens is None:
            return window, lengths
        budget, total = max_tokens * WINDOW_BATCHES, 0
        for n, tokens in enumerate(lengths):
            total += tokens
            if total > budget and n > 0:
                self._put_back(window[n:])
                return window[:n], lengths[:n]
        return window, lengths

    def _run_batch(self, batch: list[tuple[Job, int]]) -> Exception | None:
        """Encode ``batch`` and deliver its vectors; a failed batch is retried text by text. Returns the failure
        of a one-text batch (its text is failed), else None."""
        texts = [job.texts[i] for job, i in batch]
        with self._busy:
            rss_before = self._rss()
            started = time.perf_counter()
            for job, _ in batch:
                self._leave_queue(job, started)
            try:
                vectors, token_counts, token_rows = self._encode(
                    texts, tokens=any(job.wants_tokens for job, _ in batch)
                )
            except Exception as exc:  # noqa: BLE001  (isolate the failure to the texts that cause it)
                log.warning(
                    "batch.failed",
                    size=len(batch),
                    error=str(exc),
                    error_type=type(exc).__name__,
                    request_ids=_request_ids(batch),
                )
                failure: Exception | None = exc
            else:
                failure = None
            duration = time.perf_counter() - started
            rss_after = self._rss()
            self._progress_at = time.monotonic()
        self._metrics.inference_busy.inc(duration)  # failed batches too: the model was busy
        if failure is not None:
            if len(batch) > 1:
                self._retry_one_by_one(batch)
            else:
                job, index = batch[0]
                job.fail(ModelFailed(f"the model failed on input[{index}]"))
            return failure
        for k, ((job, index), tokens) in enumerate(zip(batch, token_counts, strict=True)):
            job.deliver(index, token_rows[k] if job.wants_tokens else vectors[k], tokens)
        requests = len({id(job) for job, _ in batch})
        padded = len(batch) * max(token_counts)
        stats = BatchStats(len(batch), sum(token_counts), requests, duration, rss_before, rss_after, padded)
        self._observe(stats, token_counts, _request_ids(batch))
        return None

    def _is_full(self, stats: BatchStats) -> bool:
        """A batch the size of those that drain a long queue: by count, or at least half the tokens allowed now.
        A small batch's time is mostly the model's fixed cost per batch: counted per token, a one-text batch
        looks ten or twenty times slower than the batches a queue drains in."""
        allowed = self._batch_tokens_now
        return stats.size >= self._batch_size or (allowed is not None and 2 * stats.padded_tokens >= allowed)

    def _retry_one_by_one(self, batch: list[tuple[Job, int]]) -> None:
        """Find the texts a batch failed on, shortest first. A text that finds no memory for its forward pass
        fails the texts left without running them: they are as long or longer, and each would fail the same
        way, one forward pass at a time (a systematic failure cost the batch's size plus one passes)."""
        ordered = sorted(batch, key=lambda item: item[0].lengths[item[1]])
        for position, item in enumerate(ordered):
            if item[0].finished:
                continue
            failure = self._run_batch([item])
            if failure is not None and _is_systematic(failure):
                rest = [(job, i) for job, i in ordered[position + 1 :] if not job.finished]
                for job, index in rest:
                    job.fail(ModelFailed(f"the model failed on input[{index}]: {failure}"))
                if rest:
                    log.warning("batch.abandoned", size=len(rest), error=str(failure), request_ids=_request_ids(rest))
                return

    def _encode(self, texts: list[str], *, tokens: bool = False) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
        """The batch's pooled vectors, token counts and, with ``tokens``, each text's token vectors."""
        prepared = self._backend.prepare(texts)
        encoded = self._backend.encode(prepared)
        vectors = self._backend.finish(encoded)
        rows = self._backend.finish_tokens(encoded, prepared.token_counts) if tokens else []
        del encoded
        # Reduced precision can overflow; never answer NaN (or null) vectors.
        if not np.isfinite(vectors).all() or not all(np.isfinite(row).all() for row in rows):
            raise FloatingPointError("the model's output holds non-finite values")
        return vectors, prepared.token_counts, rows

    def _observe(self, stats: BatchStats, token_counts: list[int], request_ids: list[str]) -> None:
        if self._is_full(stats):
            self._speeds.append(stats.duration_s / max(1, stats.padded_tokens))
        self._metrics.batch_size.observe(stats.size)
        self._metrics.batch_duration.observe(stats.duration_s)
        self._metrics.batch_padded_tokens.observe(stats.padded_tokens)
        self._metrics.inputs.inc(stats.size)
        self._metrics.tokens.inc(stats.tokens)
        for tokens in token_counts:
            self._metrics.input_tokens.observe(tokens)
        log.info(
            "batch.completed",
            size=stats.size,
            tokens=stats.tokens,
            padded_tokens=stats.padded_tokens,
            requests=stats.requests,
            duration_ms=round(stats.duration_s * 1000, 2),
            rss_bytes=stats.rss_after_bytes,
            rss_delta_bytes=stats.rss_delta_bytes,
            request_ids=request_ids,
        )
        for observer in self._batch_observers:
            observer(stats)

    def _run_hooks(self, hooks: list[Callable[[], None]]) -> None:
        for hook in hooks:
            try:
                hook()
            except Exception as exc:  # noqa: BLE001  (a hook must never stop the inference thread)
                log.error("engine.hook_failed", hook=getattr(hook, "__qualname__", repr(hook)), error=str(exc))


def _request_ids(batch: list[tuple[Job, int]]) -> list[str]:
    """The requests a batch's texts came from, in order, each once: what ties a batch's log line to theirs."""
    return list(dict.fromkeys(job.request_id for job, _ in batch if job.request_id is not None))


def _is_systematic(failure: Exception) -> bool:
    """A failure that is not the text's: no memory for the forward pass (CPU or GPU)."""
    text = str(failure).lower()
    return isinstance(failure, MemoryError) or "out of memory" in text or "can't allocate memory" in text
