"""Every Prometheus metric of the service, defined once (catalogue: docs/architecture.md section 6).

Each app gets its own :class:`Metrics` on its own registry, so tests can build
several apps side by side and read values with ``registry.get_sample_value``.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
BATCH_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# 2 s is a bucket bound: the latency objective (alerts/slos.toml) counts the requests that waited longer.
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
INPUT_TOKENS_BUCKETS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
PADDED_TOKENS_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_MIB = 1024 * 1024
# RSS change per batch: both signs, since a batch can give memory back as well as take it.
MEMORY_DELTA_BUCKETS = tuple(
    sign * size * _MIB for sign, size in [(-1, 64), (-1, 16), (-1, 4), (-1, 1), (-1, 0.25), (1, 0), (1, 0.25)]
) + tuple(size * _MIB for size in (1, 4, 16, 64))
FREED_BYTES_BUCKETS = tuple(size * _MIB for size in (0, 1, 4, 16, 64, 128, 256, 512, 1024, 2048))
FREED_OBJECTS_BUCKETS = (0, 10, 100, 1_000, 10_000, 100_000, 1_000_000)
CLEANUP_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The service's metrics on one registry (a fresh one unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Counters and histograms would each export a `_created` timestamp series too: one more series per
        # label set that no panel or alert reads. The switch is process-wide, and every registry here wants it.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # client_python leaves it unannotated
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        process_collector.ProcessCollector(registry=r)
        platform_collector.PlatformCollector(registry=r)
        gc_collector.GCCollector(registry=r)

        self.requests = Counter(
            "embedding_requests", "HTTP requests answered, by route and status code.", ["route", "code"], registry=r
        )
        self.request_duration = Histogram(
            "embedding_request_duration_seconds",
            "Time from receiving a request to answering it.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inputs = Counter("embedding_inputs", "Texts embedded.", registry=r)
        self.tokens = Counter("embedding_tokens", "Tokens embedded (after truncation).", registry=r)
        self.queue_depth = Gauge("embedding_queue_depth", "Texts waiting for the inference thread.", registry=r)
        self.inputs_truncated = Counter(
            "embedding_inputs_truncated",
            "Texts cut because truncation is on, by where: characters (longer than EMBEDDING_MAX_INPUT_CHARS, cut "
            "before tokenizing) or tokens (longer than the model's maximum sequence length).",
            ["at"],
            registry=r,
        )
        for at in ("characters", "tokens"):
            self.inputs_truncated.labels(at=at)
        self.model_name_mismatches = Counter(
            "embedding_model_name_mismatches",
            "OpenAI requests that named a model other than the served one (EMBEDDING_SERVED_MODEL_NAME); answered "
            "by the served model under EMBEDDING_MODEL_NAME_POLICY=any, refused under served.",
            registry=r,
        )
        self.inference_stalled = Gauge(
            "embedding_inference_stalled_seconds",
            "Seconds since the inference thread last made progress (a batch finished, or work arrived at an idle "
            "engine) while it has work; 0 while idle. Grows without bound when the thread is wedged.",
            registry=r,
        )
        self.rejected = Counter(
            "embedding_rejected",
            "Requests refused before inference, by reason: queue_full, queue_time (it would time out waiting), "
            "too_slow (it alone would take longer than its timeout), memory (over the hard limit), budget (no room "
            "in the memory budget), too_costly (more than the whole budget), and the HTTP front's body_too_large, "
            "body_timeout, header_timeout, bad_request, uri_too_long, headers_too_large, not_supported, unauthorized "
            "(no or a wrong EMBEDDING_API_KEY).",
            ["reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "embedding_batch_size", "Texts per model batch.", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_duration = Histogram(
            "embedding_batch_duration_seconds",
            "Time to tokenize and encode one model batch.",
            buckets=BATCH_DURATION_BUCKETS,
            registry=r,
        )
        self.inference_busy = Counter(
            "embedding_inference_busy_seconds",
            "Seconds the inference thread spent on batches: its rate is the fraction of the time the one model was "
            "busy (1 = saturated), what the autoscaler scales on.",
            registry=r,
        )
        self.queue_wait = Histogram(
            "embedding_queue_wait_seconds",
            "Time a request waited from being queued to the start of the first model batch holding its texts.",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.input_tokens = Histogram(
            "embedding_input_tokens",
            "Tokens of each embedded text, as the model saw it (after truncation).",
            buckets=INPUT_TOKENS_BUCKETS,
            registry=r,
        )
        self.batch_padded_tokens = Histogram(
            "embedding_batch_padded_tokens",
            "Padded token slots of one model batch (texts x longest text): the compute and activation memory it took.",
            buckets=PADDED_TOKENS_BUCKETS,
            registry=r,
        )
        self.memory_by_kind = Gauge(
            "embedding_memory_rss_kind_bytes",
            "Resident memory by kind (/proc/self/status): anon (heap, tensors), file (mapped weights, reclaimable "
            "by the kernel), shmem; and swap. Sampled by the monitor thread.",
            ["kind"],
            registry=r,
        )
        self.allocator_bytes = Gauge(
            "embedding_allocator_bytes",
            "The allocator's own accounts: jemalloc allocated, active, resident, retained, mapped; glibc in_use, "
            "free, mmapped, resident. Sampled by the monitor thread.",
            ["allocator", "account"],
            registry=r,
        )
        self.gc_tracked_objects = Gauge(
            "embedding_gc_tracked_objects",
            "Objects the garbage collector tracks, by generation (0, 1, 2; the oldest counted at most once a minute) "
            "and frozen out of its reach (the loaded model's). "
            "Sampled by the monitor thread.",
            ["generation"],
            registry=r,
        )
        self.python_allocated_blocks = Gauge(
            "embedding_python_allocated_blocks",
            "Memory blocks the Python interpreter has allocated (sys.getallocatedblocks). Sampled by the monitor "
            "thread.",
            registry=r,
        )
        self.model_info = Gauge(
            "embedding_model_info",
            "The loaded model, the precision and the runtime its forward pass runs in (value 1).",
            ["model", "device", "dimensions", "dtype", "backend"],
            registry=r,
        )
        self.ready = Gauge("embedding_ready", "1 once the model is loaded and warmed up, else 0.", registry=r)
        self.unclean_exits = Counter(
            "embedding_unclean_exits",
            "Runs of this service (same state directory) that ended without a clean shutdown: crashes, OOM "
            "kills, SIGKILL. Counted at the next start and carried across restarts.",
            registry=r,
        )
        self.previous_exit_unclean = Gauge(
            "embedding_previous_exit_unclean",
            "1 when this run started after a run that ended without a clean shutdown, else 0.",
            registry=r,
        )

        self.batch_memory_delta = Histogram(
            "embedding_batch_memory_delta_bytes",
            "Change of resident memory across one model batch (negative: memory given back).",
            buckets=MEMORY_DELTA_BUCKETS,
            registry=r,
        )
        self.memory_rss = Gauge("embedding_memory_rss_bytes", "Resident set size of the service.", registry=r)
        self.memory_uss = Gauge(
            "embedding_memory_uss_bytes",
            "Unique set size at the last monitor pass or GET /memory (0 where unknown).",
            registry=r,
        )
        self.memory_threshold = Gauge(
            "embedding_memory_threshold_bytes",
            "Configured memory thresholds: elevated, high (cleanup) and limit (load shedding).",
            ["level"],
            registry=r,
        )
        self.budget = Gauge(
            "embedding_memory_budget_bytes",
            "Memory that requests in flight may hold at once (derived from the thresholds and the warmed baseline, "
            "or EMBEDDING_MEMORY_BUDGET_BYTES).",
            registry=r,
        )
        self.budget_used = Gauge(
            "embedding_memory_budget_used_bytes",
            "Memory the requests in flight hold in the budget now: bodies, texts, queued work and answers.",
            registry=r,
        )
        self.memory_status = Gauge(
            "embedding_memory_status", "1 for the current memory status, 0 for the others.", ["status"], registry=r
        )
        self.cleanups = Counter("embedding_cleanups", "Memory cleanups run, by trigger.", ["reason"], registry=r)
        self.cleanups_ineffective = Counter(
            "embedding_cleanups_ineffective",
            "Cleanups that gave less than 1 MiB back to the operating system, by trigger.",
            ["reason"],
            registry=r,
        )
        self.cleanup_freed_objects = Histogram(
            "embedding_cleanup_freed_objects",
            "Objects freed by the garbage collector in one cleanup.",
            buckets=FREED_OBJECTS_BUCKETS,
            registry=r,
        )
        self.cleanup_freed_bytes = Histogram(
            "embedding_cleanup_freed_bytes",
            "Resident memory given back to the operating system by one cleanup.",
            buckets=FREED_BYTES_BUCKETS,
            registry=r,
        )
        self.cleanup_duration = Histogram(
            "embedding_cleanup_duration_seconds",
            "Time one cleanup took.",
            buckets=CLEANUP_DURATION_BUCKETS,
            registry=r,
        )
        self.last_cleanup = Gauge(
            "embedding_last_cleanup_timestamp_seconds", "Unix time the last cleanup finished.", registry=r
        )
        self.trims = Counter("embedding_memory_trims", "Heap trims after a batch (smart policy).", registry=r)
        self.trimmed_bytes = Counter(
            "embedding_memory_trimmed_bytes", "Resident memory given back by heap trims after batches.", registry=r
        )

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
