"""Samples the service's own ``/metrics`` during a load run into a CSV."""

from __future__ import annotations

import contextlib
import csv
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from app.reasons import CleanupReason
from app.routes import EMBED_LABELS

EMBED_ROUTES = EMBED_LABELS
"""The routes that run the model (app/routes.py)."""
REASONS = tuple(CleanupReason)  # a column each (cleanups_<reason>); a test keeps Sample's fields in step


@dataclass(frozen=True)
class Sample:
    """One reading of the service's metrics; counters are cumulative."""

    t_s: float
    rss_bytes: float
    requests: float
    inputs: float
    cleanups_threshold: float = 0
    cleanups_periodic: float = 0
    cleanups_request_count: float = 0
    cleanups_manual: float = 0
    cleanups_limit: float = 0
    cleanups_legacy: float = 0

    @property
    def cleanups(self) -> float:
        return sum(getattr(self, f"cleanups_{reason}") for reason in REASONS)


def read_metrics(url: str, t_s: float) -> Sample:
    """One sample from ``GET {url}/metrics``."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    values: dict[str, float] = {"requests": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "embedding_memory_rss_bytes":
                values["rss_bytes"] = s.value
            elif s.name == "embedding_inputs_total":
                values["inputs"] = s.value
            elif s.name == "embedding_requests_total" and s.labels.get("route") in EMBED_ROUTES:
                values["requests"] += s.value
            elif s.name == "embedding_cleanups_total" and s.labels.get("reason") in REASONS:
                values[f"cleanups_{s.labels['reason']}"] = s.value
    return Sample(t_s=t_s, **values)


def write_csv(path: Path, samples: list[Sample]) -> None:
    names = [f.name for f in fields(Sample)]
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(names)
        writer.writerows([getattr(s, n) for n in names] for s in samples)


def read_csv(path: Path) -> list[Sample]:
    with path.open(newline="") as src:
        return [Sample(**{k: float(v) for k, v in row.items()}) for row in csv.DictReader(src)]


class MetricsSampler:
    """A thread that reads ``/metrics`` every ``interval_s`` until stopped."""

    def __init__(self, url: str, interval_s: float = 2.0) -> None:
        self.url = url
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)
        self._started = 0.0

    def start(self) -> MetricsSampler:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(30)
        return self.samples

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(requests.RequestException):  # a missed sample is a gap, not a failed run
                self.samples.append(read_metrics(self.url, time.monotonic() - self._started))
            self._stop.wait(self.interval_s)
