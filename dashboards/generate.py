"""Writes dashboards/embedding-service.json: the Grafana dashboard of the embedding service.

    python dashboards/generate.py                        # rewrite the JSON after changing a panel here
    EMBEDDING_MEMORY_HIGH_BYTES=4GB python dashboards/generate.py --from-env --out my-dashboard.json

The JSON is committed (Grafana provisions it as is); tests/unit/test_dashboards.py
checks that it equals this script's output with the default settings, and that
Grafana's own typed models (grafana-foundation-sdk) know every key of it.
``--from-env`` reads the memory levels the way the service does (``EMBEDDING_*``),
so the colours of the stat panels match a deployment's own thresholds (the
threshold lines of the RSS panel always come from the service's metrics).

Conventions: every query filters on ``instance=~"$instance"`` (the instances that
export ``embedding_model_info``) and every panel uses the ``$datasource`` variable.
Each query answers per instance (legend ``{{instance}}``) or as an aggregate that is
right for any number of instances (a sum, a ratio of sums, a quantile of merged
histograms). Counts per interval are exact differences of the counter between two
points (``x - x offset $__interval``), drawn as bars: windows that overlap, like
``increase(x[$__rate_interval])`` at a shorter step, count each event several times.
Bytes are SI (``decbytes``), as the service's settings are: 2.5GB is 2.5e9 bytes.
Metric names are those of app/metrics.py (docs: README "Monitoring").
"""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from pathlib import Path
from typing import Any

from app.config import Settings
from app.routes import EMBED_LABELS, prometheus_regex

OUT = Path(__file__).with_name("embedding-service.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
INSTANCE = 'instance=~"$instance"'
SERVICE_JOB = "embedding-service"
"""The scrape job the instances are listed from (the alert rules' default selector). On Kubernetes the job is
the deployment's ``app.kubernetes.io/instance``: another instance's dashboard lists its own (``build(job=...)``;
deploy/kubernetes/generate.py --instance)."""
SLOS = tomllib.loads((Path(__file__).resolve().parents[1] / "alerts" / "slos.toml").read_text())
"""The service level objectives (alerts/slos.toml), quoted in the panels' descriptions."""
AVAILABILITY_BUDGET = f"{1 - float(SLOS['availability']['objective']):.1%}"
LATENCY_OBJECTIVE = f"{float(SLOS['latency']['objective']):.0%} start within {SLOS['latency']['threshold_seconds']} s"
EMBED_ROUTES = f'route=~"{prometheus_regex(EMBED_LABELS)}"'
"""The routes that run the model (app/routes.py): text-embeddings-inference's and OpenAI's."""
RI = "$__rate_interval"
RUNBOOK_BASE = "https://runbooks.example.com/embedding-service/runbooks.md"
"""Where ops/runbooks.md is published: the alert rules' placeholder (alerts/generate.py --runbook-base)."""
ALERT_NAME = re.compile(r"\bEmbedding[A-Z][A-Za-z]+\b")
SERVER_ERRORS = 'code=~"5..|424"'
"""Failed answers: 5xx, and the 424 text-embeddings-inference's routes answer for a failed inference."""
COUNT_INTERVAL = "1m"
"""Least width of one bar of the per-interval count panels (4 scrapes at the default 15 s)."""

LEVEL_STYLE = {
    # level -> (colour, line style); the same colour marks that level on the stat panels.
    "elevated": ("orange", {"fill": "dash", "dash": [10, 10]}),
    "high": ("red", {"fill": "dash", "dash": [10, 10]}),
    "limit": ("purple", {"fill": "dash", "dash": [4, 6]}),
    "container": ("dark-red", {"fill": "dot", "dash": [0, 10]}),
}
STATUS_CODES = {"normal": 0, "elevated": 1, "high": 2}
STATUS_COLOURS = {"normal": "green", "elevated": LEVEL_STYLE["elevated"][0], "high": LEVEL_STYLE["high"][0]}


# --- queries -----------------------------------------------------------------------------------


def selector(metric: str, extra: str = "") -> str:
    return f"{metric}{{{','.join(filter(None, [INSTANCE, extra]))}}}"


def rate(metric: str, by: str = "", extra: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({selector(metric, extra)}[{RI}]))"


def quantile(q: float, metric: str, by: str = "", extra: str = "") -> str:
    return f"histogram_quantile({q}, {rate(metric + '_bucket', ','.join(filter(None, ['le', by])), extra)})"


def ratio(metric: str) -> str:
    """The mean of a histogram over the selected instances: the ratio of the summed sum and count."""
    return f"{rate(metric + '_sum')} / {rate(metric + '_count')}"


def per_interval(metric: str, by: str) -> str:
    """Exact count of a counter's increments in each interval, summed by ``by``. Each series is differenced
    before the sum: where an instance restarted (its counter went down), its bar is what it counted since
    the restart (a new process counts from 0), for that instance alone; a new instance's first point (no
    sample an interval earlier) is not booked as one bar of everything it counted so far."""
    series, before = selector(metric), f"{selector(metric)} offset $__interval"
    return f"sum by ({by}) (({series} - {before} >= 0) or ({series} and {before}))"


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": ref, **extra}


def targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


# --- panels ------------------------------------------------------------------------------------


def steps(*levels: tuple[str, float | None]) -> dict[str, Any]:
    """Explicit thresholds: the first step is the base colour (Grafana's default paints red above 80)."""
    return {"mode": "absolute", "steps": [{"color": colour, "value": value} for colour, value in levels]}


NEUTRAL = steps(("text", None))


def stat(
    title: str,
    description: str,
    unit: str,
    expr: str,
    thresholds: dict[str, Any],
    *,
    legend: str = "",
    color_mode: str = "value",
    **field: Any,
) -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "targets": [target(expr, legend or title)],
        "fieldConfig": {
            "defaults": {"unit": unit, "color": {"mode": "thresholds"}, "thresholds": thresholds, **field},
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": color_mode,
            "graphMode": "none",
            "textMode": "auto",
            "justifyMode": "auto",
            "orientation": "auto",
        },
    }


def timeseries(
    title: str, description: str, unit: str, *queries: tuple[str, str], bars: bool = False, **custom: Any
) -> dict[str, Any]:
    style = {"drawStyle": "bars", "fillOpacity": 80, "lineWidth": 1} if bars else {"drawStyle": "line"}
    panel: dict[str, Any] = {
        "type": "timeseries",
        "title": title,
        "description": description,
        "targets": targets(*queries),
        "fieldConfig": {
            "defaults": {"unit": unit, "min": 0, "custom": {**style, **custom}},
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
            "tooltip": {"mode": "multi", "sort": "none"},
        },
    }
    if bars:
        panel["interval"] = COUNT_INTERVAL
        panel["fieldConfig"]["defaults"]["custom"]["stacking"] = {"mode": "normal", "group": "A"}
        panel["fieldConfig"]["defaults"]["decimals"] = 0
    return panel


def threshold_lines(panel: dict[str, Any]) -> dict[str, Any]:
    """Draw the series named after a memory level as a line of that level's own colour and dash."""
    for level, (colour, line_style) in LEVEL_STYLE.items():
        panel["fieldConfig"]["overrides"].append(
            {
                "matcher": {"id": "byName", "options": level},
                "properties": [
                    {"id": "color", "value": {"mode": "fixed", "fixedColor": colour}},
                    {"id": "custom.lineStyle", "value": line_style},
                    {"id": "custom.lineWidth", "value": 2},
                    {"id": "custom.fillOpacity", "value": 0},
                ],
            }
        )
    return panel


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
        alerts = sorted(set(ALERT_NAME.findall(panel.get("description", ""))))
        if alerts:  # from the panel's menu to what the on-call should do
            panel["links"] = [
                {
                    "title": f"Runbook: {name}",
                    "type": "link",
                    "url": f"{RUNBOOK_BASE}#{name.lower()}",
                    "targetBlank": True,
                }
                for name in alerts
            ]
        self.panels.append(panel)
        self.x += w
        self.row_height = max(self.row_height, h)

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_height
        self.x, self.row_height = 0, 0


# --- the dashboard -----------------------------------------------------------------------------


def overview(lay: Layout, settings: Settings) -> None:
    lay.row("Overview")
    elevated, high = settings.memory_elevated_bytes, settings.memory_high_bytes
    lay.add(
        stat(
            "RSS",
            "Resident memory of each instance now; orange above the elevated threshold, red above the high one.",
            "decbytes",
            selector("embedding_memory_rss_bytes"),
            steps(("green", None), (STATUS_COLOURS["elevated"], elevated), (STATUS_COLOURS["high"], high)),
            legend="{{instance}}",
        ),
        4,
        5,
    )
    # One number per instance (0 normal, 1 elevated, 2 high), from that instance's own status gauge.
    elevated_now = selector("embedding_memory_status", 'status="elevated"')
    high_now = selector("embedding_memory_status", 'status="high"')
    status_code = f"sum by (instance) ({elevated_now}) + 2 * sum by (instance) ({high_now})"
    lay.add(
        stat(
            "Memory status",
            "Each instance's own status: normal below its elevated threshold, elevated up to its high one, high above.",
            "none",
            status_code,
            steps(*((STATUS_COLOURS[name], None if code == 0 else code) for name, code in STATUS_CODES.items())),
            legend="{{instance}}",
            mappings=[
                {
                    "type": "value",
                    "options": {
                        str(code): {"text": name, "color": STATUS_COLOURS[name], "index": code}
                        for name, code in STATUS_CODES.items()
                    },
                }
            ],
        ),
        4,
        5,
    )
    lay.add(
        stat(
            "Requests/s",
            "Embedding requests answered per second, all selected instances together.",
            "reqps",
            rate("embedding_requests_total", extra=EMBED_ROUTES),
            NEUTRAL,
            color_mode="none",
        ),
        4,
        5,
    )
    lay.add(
        stat(
            "p95 latency",
            "95th percentile time to answer an embedding request, all selected instances together "
            "(it grows with the texts a request carries).",
            "s",
            quantile(0.95, "embedding_request_duration_seconds", extra=EMBED_ROUTES),
            steps(("green", None), ("orange", 5)),
        ),
        4,
        5,
    )
    lay.add(
        stat(
            "Error ratio",
            "Share of embedding requests that failed: 5xx, or 424 from a failed inference on TEI's routes "
            f"(the availability objective allows {AVAILABILITY_BUDGET}: EmbeddingAvailabilityBudgetBurn).",
            "percentunit",
            f"({rate('embedding_requests_total', extra=f'{EMBED_ROUTES},{SERVER_ERRORS}')} or vector(0)) / "
            f"{rate('embedding_requests_total', extra=EMBED_ROUTES)}",
            steps(("green", None), ("orange", 0.01), ("red", 0.05)),
        ),
        4,
        5,
    )
    model = stat(
        "Model",
        "The loaded model and the device it runs on.",
        "none",
        f"max by (model, device, dimensions, dtype, backend) ({selector('embedding_model_info')})",
        NEUTRAL,
        legend="{{model}} on {{device}} ({{dimensions}}d, {{dtype}})",
        color_mode="none",
    )
    model["options"]["textMode"] = "name"
    lay.add(model, 4, 5)


def memory(lay: Layout) -> None:
    lay.row("Memory")
    lay.add(
        threshold_lines(
            timeseries(
                "RSS and USS against the thresholds",
                "Resident and unique memory of each instance. Lines: the configured elevated (orange), high (red) "
                "and shedding-limit (purple) thresholds and the container's limit (dotted), the lowest among the "
                "selected instances.",
                "decbytes",
                (selector("embedding_memory_rss_bytes"), "RSS {{instance}}"),
                (f"{selector('embedding_memory_uss_bytes')} > 0", "USS {{instance}}"),
                (f"min by (level) ({selector('embedding_memory_threshold_bytes')})", "{{level}}"),
            )
        ),
        12,
        8,
    )
    lay.add(
        {
            "type": "heatmap",
            "title": "RSS change per batch",
            "description": "How many model batches in each interval added (or gave back) how much resident memory. "
                           "The buckets are binary (a quarter, 1, 4, 16, 64 MiB): the axis is in IEC units.",
            "interval": COUNT_INTERVAL,
            "targets": [target(per_interval("embedding_batch_memory_delta_bytes_bucket", "le"), "{{le}}",
                               format="heatmap")],
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
            (rate("python_gc_collections_total", "generation"), "collections gen {{generation}}"),
            (rate("python_gc_objects_collected_total"), "objects collected"),
        ),
        12,
        7,
    )
    lay.add(
        timeseries(
            "Python objects",
            "Objects the garbage collector tracks, by generation (the oldest counted at most once a minute; "
            "frozen: the model's, out of its reach), "
            "and the interpreter's allocated blocks. Growing under steady load: a leak of Python objects "
            "(POST /debug/memory/snapshot names the line); flat while the allocator's allocated grows: a leak "
            "of tensors or buffers.",
            "short",
            (selector("embedding_gc_tracked_objects"), "gen {{generation}} {{instance}}"),
            (selector("embedding_python_allocated_blocks"), "blocks {{instance}}"),
        ),
        12,
        7,
    )
    where = timeseries(
        "Where the memory is",
        "Resident memory by kind, stacked (it adds up to RSS): file-backed is mostly the memory-mapped weights "
        "(the kernel can drop and re-read it), anonymous is the heap and tensors, shmem shared memory; swap "
        "apart. Sampled by each instance's monitor thread (EMBEDDING_MONITOR_INTERVAL_S).",
        "decbytes",
        ("sum by (instance, kind) (" + selector("embedding_memory_rss_kind_bytes", 'kind!="swap"') + ")",
         "{{kind}} {{instance}}"),
        stacking={"mode": "normal", "group": "A"},
        fillOpacity=40,
    )  # fmt: skip
    where["title"] = "Where the memory is: $instance"
    where["repeat"], where["repeatDirection"], where["maxPerRow"] = "instance", "h", 2  # a stack per instance
    lay.add(where, 12, 7)
    lay.add(
        timeseries(
            "Allocator accounts",
            "The allocator's view of the heap. jemalloc: allocated (live objects), active, resident, retained, "
            "mapped; glibc: in_use, free (free chunks in its arenas, whether still in RAM or already trimmed), "
            "mmapped, resident (its arenas' pages in RAM, and mmapped). Resident minus allocated (jemalloc) or "
            "in_use (glibc) is what a cleanup can give back; allocated growing under steady load is a leak "
            "(ops/runbooks.md).",
            "decbytes",
            (selector("embedding_allocator_bytes"), "{{account}} {{instance}}"),
        ),
        12,
        7,
    )

    lay.add(
        timeseries(
            "Heap given back after batches",
            "Memory the smart policy's trims between batches returned to the operating system, per second "
            "(at most one trim every EMBEDDING_TRIM_INTERVAL_S), and the trims per second.",
            "Bps",
            (rate("embedding_memory_trimmed_bytes_total"), "trimmed bytes/s"),
            (rate("embedding_memory_trims_total"), "trims/s"),
        ),
        12,
        7,
    )
    lay.panels[-1]["fieldConfig"]["overrides"].append(
        {"matcher": {"id": "byName", "options": "trims/s"}, "properties": [{"id": "unit", "value": "ops"}]}
    )
    budget = timeseries(
        "Memory budget of the work in flight",
        "What the requests in flight hold (bodies, texts, queued work, answers) against the budget each instance "
        "derived from its thresholds and warmed baseline (or EMBEDDING_MEMORY_BUDGET_BYTES). At the budget, "
        "new requests are refused at once (429, 'Rejections by reason': budget); EmbeddingMemoryBudgetExhausted "
        "fires when that lasts.",
        "decbytes",
        (selector("embedding_memory_budget_used_bytes"), "in flight {{instance}}"),
        (selector("embedding_memory_budget_bytes"), "budget {{instance}}"),
    )
    budget["fieldConfig"]["overrides"].append(
        {
            "matcher": {"id": "byRegexp", "options": "budget .*"},
            "properties": [
                {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                {"id": "custom.fillOpacity", "value": 0},
            ],
        }
    )
    lay.add(budget, 12, 7)


def cleanup(lay: Layout, settings: Settings) -> None:
    lay.row("Cleanup")
    lay.add(
        timeseries(
            "Cleanups by reason",
            "Memory cleanups in each interval, by trigger.",
            "short",
            (per_interval("embedding_cleanups_total", "reason"), "{{reason}}"),
            bars=True,
        ),
        8,
        7,
    )
    lay.add(
        timeseries(
            "Memory given back by cleanups",
            "Resident memory the cleanups of each interval gave back to the operating system (0 where none ran: "
            "no gaps between cleanups).",
            "decbytes",
            (per_interval("embedding_cleanup_freed_bytes_sum", "instance"), "{{instance}}"),
            bars=True,
        ),
        8,
        7,
    )
    lay.add(
        timeseries(
            "Objects freed by cleanups",
            "Objects the garbage collector freed in the cleanups of each interval (0 where none ran).",
            "short",
            (per_interval("embedding_cleanup_freed_objects_sum", "instance"), "{{instance}}"),
            bars=True,
        ),
        8,
        7,
    )
    lay.add(
        timeseries(
            "Time spent cleaning up",
            "Seconds the cleanups of each interval took, per instance (the model waits meanwhile; 0 where none ran).",
            "s",
            (per_interval("embedding_cleanup_duration_seconds_sum", "instance"), "{{instance}}"),
            bars=True,
        ),
        8,
        7,
    )
    lay.add(
        stat(
            "Time since last cleanup",
            "Seconds since each instance's last cleanup finished (empty before the first one); orange after two "
            "periodic intervals without one.",
            "s",
            f"time() - max by (instance) ({selector('embedding_last_cleanup_timestamp_seconds')} > 0)",
            steps(("green", None), ("orange", 2 * settings.cleanup_interval_s)),
            legend="{{instance}}",
        ),
        8,
        7,
    )
    lay.add(
        timeseries(
            "Ineffective cleanups",
            "Cleanups in each interval that gave less than 1 MiB back, by reason. Periodic and request-count ones "
            "are normal on an idle service; threshold and limit ones mean the memory is live, not garbage.",
            "short",
            (per_interval("embedding_cleanups_ineffective_total", "reason"), "{{reason}}"),
            bars=True,
        ),
        8,
        7,
    )


def throughput(lay: Layout) -> None:
    lay.row("Throughput")
    lay.add(
        timeseries(
            "Texts and tokens per second",
            "Texts embedded and tokens processed per second, all selected instances together.",
            "short",
            (rate("embedding_inputs_total"), "texts/s"),
            (rate("embedding_tokens_total"), "tokens/s"),
        ),
        8,
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
        8,
        7,
    )
    lay.add(
        timeseries(
            "CPU",
            "CPU cores each instance uses (1 = one core busy all the time).",
            "short",
            (f"rate({selector('process_cpu_seconds_total')}[{RI}])", "{{instance}}"),
        ),
        8,
        7,
    )
    lay.add(
        timeseries(
            "Inference saturation",
            "The share of the time each instance's one inference thread spent on batches: 1 = it never waits for "
            "work, so more requests only queue. What the Kubernetes autoscaler scales on (target 0.7).",
            "percentunit",
            (f"rate({selector('embedding_inference_busy_seconds_total')}[{RI}])", "{{instance}}"),
        ),
        8,
        7,
    )
    lay.add(
        timeseries(
            "Queue depth",
            "Texts waiting for each instance's inference thread; at EMBEDDING_QUEUE_SIZE new requests get 429.",
            "short",
            (selector("embedding_queue_depth"), "{{instance}}"),
        ),
        8,
        7,
    )
    lay.add(
        timeseries(
            "Queue wait and batch time",
            "How long requests waited for the model to start on them (the latency objective: "
            f"{LATENCY_OBJECTIVE}, EmbeddingLatencyBudgetBurn), and how long one model batch took.",
            "s",
            (quantile(0.5, "embedding_queue_wait_seconds"), "queue wait p50"),
            (quantile(0.95, "embedding_queue_wait_seconds"), "queue wait p95"),
            (quantile(0.95, "embedding_batch_duration_seconds"), "batch p95"),
        ),
        8,
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
        8,
        7,
    )
    lay.add(
        timeseries(
            "Tokens per text",
            "Median and 95th percentile tokens of one text as the model saw it (after truncation to its maximum).",
            "short",
            (quantile(0.5, "embedding_input_tokens"), "p50"),
            (quantile(0.95, "embedding_input_tokens"), "p95"),
        ),
        12,
        7,
    )
    lay.add(
        timeseries(
            "Padded tokens per batch",
            "Token slots one model batch computed (texts x longest text), average and 95th percentile; the share "
            "of them that were real tokens (the rest is padding) on the right axis.",
            "short",
            (ratio("embedding_batch_padded_tokens"), "average"),
            (quantile(0.95, "embedding_batch_padded_tokens"), "p95"),
            (f"{rate('embedding_tokens_total')} / {rate('embedding_batch_padded_tokens_sum')}", "real tokens"),
        ),
        12,
        7,
    )
    lay.panels[-1]["fieldConfig"]["overrides"].append(
        {
            "matcher": {"id": "byName", "options": "real tokens"},
            "properties": [
                {"id": "unit", "value": "percentunit"},
                {"id": "max", "value": 1},
                {"id": "custom.axisPlacement", "value": "right"},
            ],
        }
    )


STARTED = f"max_over_time({selector('process_start_time_seconds')}[2m])"
"""When each instance's process started. During a handover (ops/upgrade.sh) two processes serve one port for
seconds and a scrape may reach either: the raw start time can go back and forth; its 2-minute maximum only
moves forward, so one handover is one start (as in the EmbeddingServiceRestarting rule)."""


def annotations() -> list[dict[str, Any]]:
    """Marks on every panel: each restart of a selected instance, and the alerts firing on them."""
    return [
        {
            "name": "Restarts",
            "datasource": DS,
            "enable": True,
            "iconColor": "orange",
            "expr": f"changes({STARTED}[1m:]) > 0",
        },
        {
            "name": "Alerts",
            "datasource": DS,
            "enable": True,
            "iconColor": "red",
            "expr": f'ALERTS{{alertstate="firing", alertname=~"Embedding.*", {INSTANCE}}}',
        },
    ]


def objectives(lay: Layout) -> None:
    """How fast each objective's error budget burns, from the ratios the alert rules record."""
    lay.row("Objectives")
    selected = f"up{{{INSTANCE}}}"  # the services (namespace, job) of the selected instances
    queries = []
    for slo, recorded in (("availability", "embedding:request_errors"), ("latency", "embedding:queue_wait_slow")):
        budget = 1 - float(SLOS[slo]["objective"])
        for window in ("5m", "1h", "6h"):
            expr = f"{recorded}:ratio_rate{window} / {budget:g} and on (namespace, job) {selected}"
            queries.append((expr, f"{slo} {window} {{{{job}}}}"))
    rates = sorted({float(r["factor"]) for r in SLOS["burn_rates"]})
    panel = timeseries(
        "Error budget burn rate",
        f"How many times too fast each objective's error budget burns, over 5 minutes, 1 hour and 6 hours, per "
        f"service (alerts/slos.toml: availability {SLOS['availability']['objective']:.1%} without a server error, "
        f"latency {LATENCY_OBJECTIVE}). 1 spends the budget in exactly {SLOS['period']}. Lines: "
        f"{' and '.join(f'{r:g}' for r in rates)}, where EmbeddingAvailabilityBudgetBurn and "
        "EmbeddingLatencyBudgetBurn ticket (over 6 hours and 30 minutes) and page (over 1 hour and 5 minutes).",
        "x",
        *queries,
        thresholdsStyle={"mode": "line"},
    )
    panel["fieldConfig"]["defaults"]["thresholds"] = steps(
        ("green", None), *((colour, rate) for colour, rate in zip(("orange", "red"), rates, strict=True))
    )
    lay.add(panel, 24, 8)


def errors(lay: Layout) -> None:
    lay.row("Errors and rejections")
    lay.add(
        timeseries(
            "Up and ready",
            "Whether Prometheus scrapes each instance (up) and whether it is ready to serve (/ready: model loaded, "
            "not shedding load). EmbeddingServiceDown and EmbeddingServiceNotReady page on these.",
            "short",
            (selector("up"), "up {{instance}}"),
            (selector("embedding_ready"), "ready {{instance}}"),
        ),
        12,
        7,
    )
    lay.add(
        timeseries(
            "Restarts and unclean exits",
            "Starts of each instance's process in each interval, and those that followed a run ended without a "
            "clean shutdown (a crash, an OOM kill: EmbeddingServiceExitedUncleanly).",
            "short",
            (
                f"sum by (instance) (changes({STARTED}[$__interval:]))",
                "starts {{instance}}",
            ),
            (per_interval("embedding_unclean_exits_total", "instance"), "unclean {{instance}}"),
            bars=True,
        ),
        12,
        7,
    )
    lay.add(
        timeseries(
            "Responses by status code",
            "Requests answered per second by status code, every route (health checks and scrapes included).",
            "reqps",
            (rate("embedding_requests_total", "code"), "{{code}}"),
        ),
        12,
        7,
    )
    lay.add(
        timeseries(
            "Rejections by reason",
            "Requests refused before inference: queue_full and queue_time (429: no room or no time in the queue), "
            "too_slow (413: longer than its timeout alone), memory (503, over the hard limit), budget (429, "
            "no room in the memory budget), too_costly (413, more than the whole budget), and what the HTTP front "
            "refuses itself: body_too_large (413), body_timeout and header_timeout (408), bad_request, "
            "uri_too_long, headers_too_large, not_supported, unauthorized (401: no or a wrong API key).",
            "reqps",
            (rate("embedding_rejected_total", "reason"), "{{reason}}"),
        ),
        12,
        7,
    )
    lay.add(
        timeseries(
            "Texts cut, and other model names",
            "Texts embedded in part, as truncation allows: cut at EMBEDDING_MAX_INPUT_CHARS before tokenizing "
            "(characters) or at the model's maximum sequence length (tokens); a pipeline whose chunks are mostly cut "
            "should chunk smaller. And OpenAI requests that named a model other than the served names "
            "(EMBEDDING_SERVED_MODEL_NAME): answered by the served model, or 404 under "
            "EMBEDDING_MODEL_NAME_POLICY=served.",
            "ops",
            (rate("embedding_inputs_truncated_total", "at"), "cut at {{at}}"),
            (rate("embedding_model_name_mismatches_total"), "other model name"),
        ),
        12,
        7,
    )


def build(settings: Settings | None = None, job: str = SERVICE_JOB) -> dict[str, Any]:
    """The dashboard of the instances of ``job``, its stat colours from ``settings`` (default: the service's
    defaults); uid and title name the job unless it is the default one."""
    settings = settings or Settings()
    lay = Layout()
    overview(lay, settings)
    memory(lay)
    cleanup(lay, settings)
    throughput(lay)
    errors(lay)
    objectives(lay)
    return {
        "uid": job,
        "title": "Embedding service" if job == SERVICE_JOB else f"Embedding service: {job}",
        "description": "Memory, cleanups, throughput and errors of the embedding service.",
        "tags": ["embedding", "memory"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "annotations": {"list": annotations()},
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
                    # "All" is the union of the listed instances (no catch-all regex), so the process_* and
                    # python_* series of other jobs' targets never join the queries.
                    "name": "instance",
                    "label": "Instance",
                    "type": "query",
                    "datasource": DS,
                    # From the scrape targets: an instance still loading its model (no model info yet) shows.
                    "query": {"query": f'label_values(up{{job="{job}"}}, instance)', "refId": "instance"},
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "current": {},
                    "hide": 0,
                    "sort": 1,
                },
            ]
        },
        "panels": lay.panels,
    }


def render(settings: Settings | None = None) -> str:
    return json.dumps(build(settings), indent=2) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-env", action="store_true", help="stat colours from the EMBEDDING_* memory levels")
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the dashboard")
    args = parser.parse_args()
    args.out.write_text(render(Settings.from_env() if args.from_env else None))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
