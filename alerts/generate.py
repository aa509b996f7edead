"""Writes alerts/embedding-service.rules.yml: the Prometheus alert rules of the embedding service.

    python alerts/generate.py                      # rewrite the committed file after changing a rule here
    python alerts/generate.py --runbook-base https://wiki.example.org/embedding/runbooks.md --out rules.yml

The committed YAML is what Prometheus loads and what ``promtool test rules`` tests
(alerts/tests/); tests/unit/test_alert_rules.py checks that it equals this
script's output. ``--runbook-base`` writes a copy whose ``runbook_url``
annotations point at your published copy of ops/runbooks.md (each alert's
anchor is its name in lower case, as GitHub and most Markdown renderers make it).

The rules follow the kubernetes and node-exporter monitoring mixins: a static
``summary``, a templated ``description`` that quotes the measured value and the
configured threshold (from ``embedding_memory_threshold_bytes``), a ``for`` on
every alert but the Watchdog, and guards so that an idle or healthy service
pages nobody. Sums keep every target label but the ones they aggregate over
(``without``), so the labels a platform adds (namespace, pod) reach Alertmanager.
Byte values are SI (``humanize``), as the service's settings are: 2.5GB is 2.5e9 bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).with_name("embedding-service.rules.yml")
RUNBOOK_BASE = "https://runbooks.example.com/embedding-service/runbooks.md"
"""Where the runbooks are published; the committed rules use this placeholder (see the README)."""

JOB_NAME = "embedding-service"
JOB = f'job="{JOB_NAME}"'
EMBED_ROUTES = 'route=~"/|/embed|/v1/embeddings"'
"""The embedding routes: text-embeddings-inference's (``/`` and ``/embed``) and OpenAI's."""
SERVER_ERRORS = 'code=~"5..|424"'
"""Failed answers: 5xx, and the 424 text-embeddings-inference's routes answer for a failed inference."""
MIN_TRAFFIC_RPS = 0.05
"""Ratios of fewer requests than this (3 a minute) are noise: ratio alerts need at least this much traffic."""

RSS = "embedding_memory_rss_bytes"


def threshold(level: str) -> str:
    return f'embedding_memory_threshold_bytes{{level="{level}"}}'


# The level memory must stay under: the hard (load-shedding) limit where one is set, else the high threshold.
CEILING = f"({threshold('limit')} or ignoring(level) {threshold('high')})"


def quoted(query: str, fmt: str = "{{ . | first | value | humanize }}B") -> str:
    """A template that runs ``query`` for the alert's instance and renders its first sample with ``fmt``.

    ``query`` is a Go raw string (between backquotes, so PromQL keeps its double quotes) with
    ``%[1]s`` and ``%[2]s`` for the instance and job.
    """
    return f"{{{{ with printf `{query}` $labels.instance $labels.job | query }}}}{fmt}{{{{ end }}}}"


def configured(level: str) -> str:
    """The configured threshold ``level`` of the alert's instance, e.g. ``2.5GB``."""
    return quoted(f'embedding_memory_threshold_bytes{{level="{level}",instance="%[1]s",job="%[2]s"}}')


CURRENT_RSS = quoted('embedding_memory_rss_bytes{instance="%[1]s",job="%[2]s"}')
CONFIGURED_CEILING = quoted(
    'embedding_memory_threshold_bytes{level="limit",instance="%[1]s",job="%[2]s"}'
    ' or ignoring(level) embedding_memory_threshold_bytes{level="high",instance="%[1]s",job="%[2]s"}',
    '{{ with . | first }}{{ . | label "level" }} threshold of {{ . | value | humanize }}B{{ end }}',
)


def requests_rate(window: str, extra: str = "") -> str:
    selector = ", ".join(filter(None, [EMBED_ROUTES, extra]))
    return f"sum without (route, code) (rate(embedding_requests_total{{{selector}}}[{window}]))"


def alert(
    name: str,
    expr: str,
    summary: str,
    description: str,
    *,
    severity: str = "warning",
    for_: str | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr.strip() + ("\n" if "\n" in expr.strip() else "")}
    if for_ is not None:
        rule["for"] = for_
    rule["labels"] = {"severity": severity, **(labels or {})}
    rule["annotations"] = {"summary": summary, "description": description}
    return rule


def rules() -> list[dict[str, Any]]:
    """Every alert, in the order of ops/runbooks.md."""
    return [
        alert(
            "Watchdog",
            "vector(1)",
            "The alerting pipeline of the embedding service works.",
            "Always firing, on purpose: it proves that Prometheus evaluates these rules and Alertmanager delivers "
            "them. Route it to a dead man's switch, which pages when the notifications stop.",
            severity="none",
        ),
        alert(
            "EmbeddingServiceDown",
            f"up{{{JOB}}} == 0",
            "An embedding service instance cannot be scraped.",
            "Prometheus has failed to scrape {{ $labels.instance }} for 2 minutes: "
            "the process is gone, hung or unreachable.",
            severity="critical",
            for_="2m",
        ),
        alert(
            "EmbeddingServiceAbsent",
            f"absent(up{{{JOB}}} == 1)",
            "No embedding service instance is up.",
            f"For 5 minutes Prometheus has had no healthy target in {JOB_NAME}: "
            "every instance is down, or none is discovered any more.",
            severity="critical",
            for_="5m",
            labels={"job": JOB_NAME},  # absent() of a comparison has no labels to take it from
        ),
        alert(
            "EmbeddingServiceNotReady",
            "embedding_ready == 0",
            "An embedding service instance has not become ready.",
            "{{ $labels.instance }} serves HTTP but has answered 503 on /ready for 5 minutes: "
            "its model has not finished loading and warming up.",
            for_="5m",
        ),
        alert(
            "EmbeddingServiceRestarting",
            f"changes(process_start_time_seconds{{{JOB}}}[30m]) >= 3",
            "An embedding service instance keeps restarting.",
            "{{ $labels.instance }} has restarted {{ $value }} times in the last 30 minutes.",
            for_="5m",
        ),
        alert(
            "EmbeddingMemoryHigh",
            f"{RSS} > ignoring(level) {threshold('high')}",
            "Embedding service memory is above its high threshold.",
            "RSS of {{ $labels.instance }} is {{ $value | humanize }}B, above its high threshold of "
            + configured("high")
            + " (EMBEDDING_MEMORY_HIGH_BYTES), for 5 minutes: cleanups have not brought it back under.",
            for_="5m",
        ),
        alert(
            "EmbeddingMemoryNearContainerLimit",
            f"{RSS} / ignoring(level) {threshold('container')} > 0.95",
            "Embedding service memory is close to its container's limit.",
            "RSS of {{ $labels.instance }} is {{ $value | humanizePercentage }} of its container's memory limit of "
            + configured("container")
            + " for 2 minutes. The kernel kills the process at 100%.",
            severity="critical",
            for_="2m",
        ),
        alert(
            "EmbeddingMemoryGrowthPredicted",
            f"""
predict_linear({RSS}[2h], 4 * 3600) > ignoring(level) {CEILING}
and {RSS} < ignoring(level) {CEILING}
and deriv({RSS}[30m]) > 0
""",
            "Embedding service memory keeps growing towards its limit.",
            "RSS of {{ $labels.instance }} is "
            + CURRENT_RSS
            + " and still rising: at the rate of the last 2 hours it reaches {{ $value | humanize }}B within 4 hours,"
            " past its " + CONFIGURED_CEILING + ".",
            for_="30m",
        ),
        alert(
            "EmbeddingCleanupStorm",
            f"""
sum without (reason) (rate(embedding_cleanups_total[10m]))
  / {requests_rate("10m")} > 0.5
and {requests_rate("10m")} > {MIN_TRAFFIC_RPS}
""",
            "The embedding service cleans up memory on nearly every request.",
            "{{ $labels.instance }} ran a memory cleanup for {{ $value | humanizePercentage }} of its embedding "
            "requests over the last 10 minutes (bound 50%).",
            for_="10m",
        ),
        alert(
            "EmbeddingCleanupIneffective",
            "sum without (reason) "
            '(increase(embedding_cleanups_ineffective_total{reason=~"threshold|limit"}[30m])) >= 3',
            "Memory cleanups of the embedding service free nothing.",
            '{{ printf "%.0f" $value }} cleanups of {{ $labels.instance }} triggered by high memory in the last '
            "30 minutes each gave back less than 1 MiB: the memory above the threshold is in use, not garbage.",
            for_="10m",
        ),
        alert(
            "EmbeddingErrorRate",
            f"""
{requests_rate("5m", SERVER_ERRORS)}
  / {requests_rate("5m")} > 0.05
and {requests_rate("5m")} > {MIN_TRAFFIC_RPS}
""",
            "The embedding service answers embedding requests with errors.",
            "{{ $value | humanizePercentage }} of the embedding requests to {{ $labels.instance }} "
            "failed (5xx, or 424 for a failed inference on TEI's routes) over the last 5 minutes.",
            severity="critical",
            for_="5m",
        ),
        alert(
            "EmbeddingQueueWaitHigh",
            f"""
histogram_quantile(0.95, rate(embedding_queue_wait_seconds_bucket[10m])) > 5
and rate(embedding_queue_wait_seconds_count[10m]) > {MIN_TRAFFIC_RPS}
""",
            "Embedding requests wait long for the model.",
            "95% of the requests to {{ $labels.instance }} waited up to {{ $value | humanizeDuration }} in the queue "
            "before the model started on them (bound 5s), over 10 minutes.",
            for_="10m",
        ),
        alert(
            "EmbeddingMemoryBudgetExhausted",
            'sum without (reason) (increase(embedding_rejected_total{reason="budget"}[5m])) >= 1',
            "The embedding service refuses requests for want of memory budget.",
            "For 10 minutes {{ $labels.instance }} has refused requests because the memory its work in flight "
            "holds was at its budget of "
            + quoted('embedding_memory_budget_bytes{instance="%[1]s",job="%[2]s"}')
            + " ({{ $value | humanize }} refusals in the last 5 minutes): clients get 429 and retry.",
            for_="10m",
        ),
        alert(
            "EmbeddingRequestsRejected",
            'rate(embedding_rejected_total{reason!="budget"}[5m]) * 60 > 6',
            "The embedding service refuses requests.",
            "{{ $labels.instance }} has refused {{ $value | humanize }} requests a minute for 5 minutes, "
            "with reason {{ $labels.reason }} (bound 6).",
            for_="5m",
        ),
    ]


def with_runbooks(rule_list: list[dict[str, Any]], base: str) -> list[dict[str, Any]]:
    for rule in rule_list:
        rule["annotations"]["runbook_url"] = f"{base}#{rule['alert'].lower()}"
    return rule_list


class _Dumper(yaml.SafeDumper):
    """Indents lists under their key and writes multi-line strings (PromQL) as literal blocks."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

HEADER = """\
# Alert rules of the embedding service. GENERATED by alerts/generate.py: edit that, then `make rules`.
# promtool unit tests: alerts/tests/. Runbooks: ops/runbooks.md. Metric names: app/metrics.py.
"""


def render(runbook_base: str = RUNBOOK_BASE) -> str:
    document = {"groups": [{"name": "embedding-service", "rules": with_runbooks(rules(), runbook_base)}]}
    return HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runbook-base", default=RUNBOOK_BASE, help="URL of the published ops/runbooks.md")
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the rules")
    args = parser.parse_args()
    args.out.write_text(render(args.runbook_base))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
