"""Writes dashboards/embedding-service.json: the Grafana dashboard of the embedding service.

    python dashboards/generate.py        # rewrite the JSON after changing a panel here

The JSON is committed (Grafana provisions it as is); tests/unit/test_dashboards.py
checks that it equals this script's output, so the two cannot drift apart.
Every query filters on ``instance=~"$instance"`` and every panel uses the
``$datasource`` variable. Metric names are those of app/metrics.py (DESIGN section 7).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("embedding-service.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
INSTANCE = 'instance=~"$instance"'
EMBED_ROUTES = 'route=~"/embed|/v1/embeddings"'
RI = "$__rate_interval"
SERVER_ERRORS = 'code=~"5.."'


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": ref, **extra}


def targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


class Layout:
    """Places panels left to right, rows top to bottom, with ids in order."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = 0
        self.row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {"type": "row", "id": len(self.panels) + 1, "title": title, "collapsed": False,
             "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []}
        )  # fmt: skip
        self.y += 1

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > 24:
            self._newline()
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        panel["datasource"] = DS
        self.panels.append(panel)
        self.x += w
        self.row_height = max(self.row_height, h)

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_height
        self.x, self.row_height = 0, 0


def stat(title: str, description: str, unit: str, expr: str, **field: Any) -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "targets": [target(expr, title)],
        "fieldConfig": {"defaults": {"unit": unit, **field}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value"},
    }


def timeseries(title: str, description: str, unit: str, *queries: tuple[str, str], **field: Any) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "targets": targets(*queries),
        "fieldConfig": {"defaults": {"unit": unit, **field}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
    }


def thresholds_as_lines(panel: dict[str, Any]) -> dict[str, Any]:
    """Draw the configured memory thresholds (series named by level) as dashed red lines."""
    panel["fieldConfig"]["overrides"].append(
        {
            "matcher": {"id": "byRegexp", "options": "^(elevated|high|limit)$"},
            "properties": [
                {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
                {"id": "custom.fillOpacity", "value": 0},
            ],
        }
    )
    return panel


def rate(metric: str, by: str = "", extra: str = "") -> str:
    selector = ",".join(filter(None, [INSTANCE, extra]))
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{selector}}}[{RI}]))"


def quantile(q: float, metric: str, by: str = "", extra: str = "") -> str:
    return f"histogram_quantile({q}, {rate(metric + '_bucket', ','.join(filter(None, ['le', by])), extra)})"


def ratio(metric: str) -> str:
    return f"{rate(metric + '_sum')} / {rate(metric + '_count')}"


def build() -> dict[str, Any]:
    lay = Layout()
    thresholds_query = (
        f'embedding_memory_threshold_bytes{{{INSTANCE},level=~"elevated|high|limit|container"}}',
        "{{level}}",
    )

    lay.row("Overview")
    lay.add(
        stat("RSS", "Resident memory of the service now.", "bytes", f"max(embedding_memory_rss_bytes{{{INSTANCE}}})"),
        4,
        5,
    )
    status = stat(
        "Memory status",
        "normal below the elevated threshold, elevated up to the high one, high above it.",
        "none",
        f'max(embedding_memory_status{{{INSTANCE},status="high"}}) * 2'
        f' + max(embedding_memory_status{{{INSTANCE},status="elevated"}})',
        mappings=[
            {"type": "value", "options": {"0": {"text": "normal", "color": "green"},
                                          "1": {"text": "elevated", "color": "orange"},
                                          "2": {"text": "high", "color": "red"}}}
        ],
    )  # fmt: skip
    lay.add(status, 4, 5)
    requests_per_s = rate("embedding_requests_total", extra=EMBED_ROUTES)
    lay.add(stat("Requests/s", "Embedding requests answered per second.", "reqps", requests_per_s), 4, 5)
    lay.add(
        stat(
            "p95 latency",
            "95th percentile time to answer an embedding request.",
            "s",
            quantile(0.95, "embedding_request_duration_seconds", extra=EMBED_ROUTES),
        ),
        4,
        5,
    )
    lay.add(
        stat(
            "Error ratio",
            "Share of requests answered with a 5xx status.",
            "percentunit",
            f"({rate('embedding_requests_total', extra=SERVER_ERRORS)} or vector(0)) / "
            f"{rate('embedding_requests_total')}",
        ),
        4,
        5,
    )
    lay.add(
        stat(
            "Model",
            "The loaded model and the device it runs on.",
            "none",
            f"max by (model, device, dimensions) (embedding_model_info{{{INSTANCE}}})",
        ),
        4,
        5,
    )
    lay.panels[-1]["options"]["textMode"] = "name"
    lay.panels[-1]["targets"][0]["legendFormat"] = "{{model}} on {{device}} ({{dimensions}}d)"

    lay.row("Memory")
    lay.add(
        thresholds_as_lines(
            timeseries(
                "RSS and USS against the thresholds",
                "Resident and unique memory of the service; dashed: configured elevated, high and limit thresholds.",
                "bytes",
                (f"embedding_memory_rss_bytes{{{INSTANCE}}}", "RSS {{instance}}"),
                (f"embedding_memory_uss_bytes{{{INSTANCE}}} > 0", "USS {{instance}}"),
                thresholds_query,
            )
        ),
        12,
        8,
    )
    lay.add(
        {
            "type": "heatmap",
            "title": "RSS change per batch",
            "description": "How much resident memory each model batch added (or gave back), over time.",
            "targets": [target(f"sum by (le) (increase(embedding_batch_memory_delta_bytes_bucket{{{INSTANCE}}}[{RI}]))",
                               "{{le}}", format="heatmap")],
            "fieldConfig": {"defaults": {"unit": "bytes"}, "overrides": []},
            "options": {"calculate": False, "yAxis": {"unit": "bytes"}, "cellGap": 1,
                        "color": {"mode": "scheme", "scheme": "Oranges"}},
        },
        12,
        8,
    )  # fmt: skip
    lay.add(
        timeseries(
            "Garbage collector",
            "Python garbage collections per second by generation, and objects they collected.",
            "ops",
            (
                f"sum by (generation) (rate(python_gc_collections_total{{{INSTANCE}}}[{RI}]))",
                "collections gen {{generation}}",
            ),
            (f"sum(rate(python_gc_objects_collected_total{{{INSTANCE}}}[{RI}]))", "objects collected"),
        ),
        12,
        7,
    )
    lay.add(
        timeseries(
            "Heap given back after batches",
            "Memory returned to the OS per second by the smart policy's trims after batches"
            " (glibc only: under jemalloc, cleanups return it).",
            "Bps",
            (rate("embedding_memory_trimmed_bytes_total"), "trimmed bytes/s"),
        ),
        12,
        7,
    )

    lay.row("Cleanup")
    lay.add(
        timeseries(
            "Cleanups by reason",
            "Memory cleanups in each interval, by trigger.",
            "short",
            (f"sum by (reason) (increase(embedding_cleanups_total{{{INSTANCE}}}[{RI}]))", "{{reason}}"),
            drawStyle="bars",
        ),
        8,
        7,
    )
    lay.add(
        timeseries(
            "Freed bytes per cleanup",
            "Average resident memory each cleanup gave back to the operating system.",
            "bytes",
            (ratio("embedding_cleanup_freed_bytes"), "freed bytes"),
        ),
        8,
        7,
    )
    lay.add(
        timeseries(
            "Freed objects per cleanup",
            "Average objects the garbage collector freed in each cleanup.",
            "short",
            (ratio("embedding_cleanup_freed_objects"), "freed objects"),
        ),
        8,
        7,
    )
    lay.add(
        timeseries(
            "Cleanup duration",
            "Average and 95th percentile time one cleanup took (the model waits meanwhile).",
            "s",
            (ratio("embedding_cleanup_duration_seconds"), "average"),
            (quantile(0.95, "embedding_cleanup_duration_seconds"), "p95"),
        ),
        8,
        7,
    )
    lay.add(
        stat(
            "Time since last cleanup",
            "Seconds since the last cleanup finished (empty before the first one).",
            "s",
            f"time() - max(embedding_last_cleanup_timestamp_seconds{{{INSTANCE}}} > 0)",
        ),
        8,
        7,
    )
    lay.add(
        timeseries(
            "Ineffective cleanups",
            "Cleanups that gave less than 1 MiB back, by reason: memory is live, not garbage.",
            "short",
            (f"sum by (reason) (increase(embedding_cleanups_ineffective_total{{{INSTANCE}}}[{RI}]))", "{{reason}}"),
            drawStyle="bars",
        ),
        8,
        7,
    )

    lay.row("Throughput")
    lay.add(
        timeseries(
            "Texts and tokens per second",
            "Texts embedded and tokens processed per second.",
            "short",
            (rate("embedding_inputs_total"), "texts/s"),
            (rate("embedding_tokens_total"), "tokens/s"),
        ),
        12,
        7,
    )
    lay.add(
        timeseries(
            "Batch size",
            "Average and 95th percentile texts per model batch (at most EMBEDDING_BATCH_SIZE).",
            "short",
            (ratio("embedding_batch_size"), "average"),
            (quantile(0.95, "embedding_batch_size"), "p95"),
        ),
        12,
        7,
    )
    lay.add(
        timeseries(
            "Queue depth",
            "Texts waiting for the inference thread; at EMBEDDING_QUEUE_SIZE new requests get 429.",
            "short",
            (f"max(embedding_queue_depth{{{INSTANCE}}})", "queued texts"),
        ),
        12,
        7,
    )
    lay.add(
        timeseries(
            "Latency percentiles",
            "50th, 95th and 99th percentile time to answer, by route.",
            "s",
            (quantile(0.5, "embedding_request_duration_seconds", "route", EMBED_ROUTES), "p50 {{route}}"),
            (quantile(0.95, "embedding_request_duration_seconds", "route", EMBED_ROUTES), "p95 {{route}}"),
            (quantile(0.99, "embedding_request_duration_seconds", "route", EMBED_ROUTES), "p99 {{route}}"),
        ),
        12,
        7,
    )

    lay.row("Errors and rejections")
    lay.add(
        timeseries(
            "Responses by status code",
            "Requests answered per second, by status code.",
            "reqps",
            (rate("embedding_requests_total", "code"), "{{code}}"),
        ),
        12,
        7,
    )
    lay.add(
        timeseries(
            "Rejections by reason",
            "Embedding requests refused before inference: queue_full (429) or memory (503).",
            "reqps",
            (rate("embedding_rejected_total", "reason"), "{{reason}}"),
        ),
        12,
        7,
    )

    return {
        "uid": "embedding-service",
        "title": "Embedding service",
        "description": "Memory, cleanups, throughput and errors of the embedding service.",
        "tags": ["embedding", "memory"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                },
                {
                    "name": "instance",
                    "label": "Instance",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": "label_values(embedding_model_info, instance)", "refId": "instance"},
                    "definition": "label_values(embedding_model_info, instance)",
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {},
                    "hide": 0,
                    "sort": 1,
                },
            ]
        },
        "panels": lay.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
