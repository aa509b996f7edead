"""Every Prometheus metric of the service, defined once (names: DESIGN section 7).

Each app gets its own :class:`Metrics` on its own registry, so tests can build
several apps side by side and read values with ``registry.get_sample_value``.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
BATCH_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The service's metrics on one registry (a fresh one unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
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
        self.rejected = Counter(
            "embedding_rejected", "Embedding requests refused before inference, by reason.", ["reason"], registry=r
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
        self.model_info = Gauge(
            "embedding_model_info", "The loaded model (value 1).", ["model", "device", "dimensions"], registry=r
        )
        self.ready = Gauge("embedding_ready", "1 once the model is loaded and warmed up, else 0.", registry=r)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
