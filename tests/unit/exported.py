"""The series the service really exports, by metric type: what dashboards and alert rules may query."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

from app.config import Settings
from app.engine import Engine
from app.memory import MemoryManager
from app.metrics import Metrics
from tests.doubles import FakeBackend

METRIC = re.compile(r"\b((?:embedding|process|python)_[a-z0-9_]+)\b")
"""A metric name of the service (its own, and the standard process and Python collectors') in PromQL."""

SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}
"""The series each metric type exposes in the Prometheus text format (``_created`` is switched off)."""


def service_registry() -> CollectorRegistry:
    """The registry of a service whose memory manager has registered its series, as at start."""
    metrics = Metrics()
    engine = Engine(FakeBackend(), batch_size=4, queue_size=8, metrics=metrics, rss_sampler=lambda: 0)
    MemoryManager(Settings(model="fake"), metrics=metrics, engine=engine, cgroup_limit=lambda: None)
    return metrics.registry


def exported_series() -> dict[str, str]:
    """Every series name the service can expose, mapped to its metric family (``x_bucket`` -> ``x``)."""
    return {
        family.name + suffix: family.name for family in service_registry().collect() for suffix in SUFFIXES[family.type]
    }


def metric_names(promql: str) -> set[str]:
    """The service's metric names a PromQL expression (or template) reads."""
    return set(METRIC.findall(promql))
