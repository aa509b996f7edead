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
import tomllib
from pathlib import Path
from typing import Any

import yaml

from app.routes import EMBED_LABELS, prometheus_regex

OUT = Path(__file__).with_name("embedding-service.rules.yml")
RUNBOOK_BASE = "https://runbooks.example.com/embedding-service/runbooks.md"
"""Where the runbooks are published; the committed rules use this placeholder (see the README)."""

SELECTOR = 'job="embedding-service"'
"""How every rule selects the service's series; ``--selector`` adds a namespace (or replaces the job)."""
EMBED_ROUTES = f'route=~"{prometheus_regex(EMBED_LABELS)}"'
"""The routes that run the model (app/routes.py): text-embeddings-inference's and OpenAI's."""
SERVER_ERRORS = 'code=~"5..|424"'
"""Failed answers: 5xx, and the 424 text-embeddings-inference's routes answer for a failed inference."""
ANSWERED = 'code!="499"'
"""Requests that count for the objectives: all but those whose client left first (alerts/slos.toml)."""
MIN_TRAFFIC_RPS = 0.05
"""Ratios of fewer requests than this (3 a minute) are noise: ratio alerts need at least this much traffic."""
SERVICE = "namespace, job"
"""The labels of one service (all its replicas): the objectives and the page when none is up."""
SLOS = tomllib.loads(Path(__file__).with_name("slos.toml").read_text())
"""The service level objectives (alerts/slos.toml)."""
SECONDS = {"m": 60, "h": 3600, "d": 86400}
PERIOD_DAYS = int(SLOS["period"].removesuffix("d"))
SLO_WINDOWS = sorted(
    {w for rate in SLOS["burn_rates"] for w in (rate["long"], rate["short"])},
    key=lambda w: int(w[:-1]) * SECONDS[w[-1]],
)
"""The windows the recording rules compute, for the burn-rate alerts and the dashboard."""
IN_NAMESPACE = "{{ with $labels.namespace }} in {{ . }}{{ end }}"
"""Where a service-wide alert is: nothing without Kubernetes' namespace label."""
UNCLEAN_EXIT_WINDOW_S = 900
"""How long after an unclean exit its alert stays: the new run's first 15 minutes."""
AGE_GUARD_S = 2 * 3600
"""The trend alert's window: a process younger than this (a new pod warming up) has no trend yet."""


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


def error_budget(slo: str) -> float:
    return round(1 - float(SLOS[slo]["objective"]), 6)


def recorded(slo: str, window: str) -> str:
    """The name of the recorded ratio of bad events of objective ``slo`` over ``window``."""
    return {"availability": "embedding:request_errors", "latency": "embedding:queue_wait_slow"}[
        slo
    ] + f":ratio_rate{window}"


class Rules:
    """The rules for one selector of the service's series."""

    def __init__(self, selector: str = SELECTOR) -> None:
        self.selector = selector

    def sel(self, *extra: str) -> str:
        return "{" + ", ".join([self.selector, *extra]) + "}"

    def threshold(self, level: str) -> str:
        return "embedding_memory_threshold_bytes" + self.sel(f'level="{level}"')

    @property
    def rss(self) -> str:
        return f"embedding_memory_rss_bytes{self.sel()}"

    def median_rss(self, window: str) -> str:
        """RSS as the window judges it: a cleanup's dip or a missed scrape in it changes nothing."""
        return f"quantile_over_time(0.5, {self.rss}[{window}])"

    @property
    def ceiling(self) -> str:
        """The level memory must stay under: the hard (load-shedding) limit where one is set, else high."""
        return f"({self.threshold('limit')} or ignoring(level) {self.threshold('high')})"

    def requests_rate(self, window: str, extra: str = "") -> str:
        selector = self.sel(*filter(None, [EMBED_ROUTES, extra]))
        return f"sum without (route, code) (rate(embedding_requests_total{selector}[{window}]))"

    def recording_rules(self) -> list[dict[str, Any]]:
        """The bad-event ratios of each objective over each window, per service (all its replicas)."""
        latency_le = float(SLOS["latency"]["threshold_seconds"])
        le = f'le=~"{latency_le:g}|{latency_le:.1f}"'  # the client writes 2.0, Prometheus 3 normalises to 2
        rules: list[dict[str, Any]] = []
        for window in SLO_WINDOWS:
            answered = f"embedding_requests_total{self.sel(EMBED_ROUTES, ANSWERED)}"
            errors = f"embedding_requests_total{self.sel(EMBED_ROUTES, SERVER_ERRORS)}"
            rules.append(
                {
                    "record": recorded("availability", window),
                    # 0, not nothing, while no request failed: the dashboard draws the ratio at all times.
                    "expr": f"(\n  sum by ({SERVICE}) (rate({errors}[{window}]))\n"
                    f"  or 0 * sum by ({SERVICE}) (rate({answered}[{window}]))\n)\n"
                    f"/ sum by ({SERVICE}) (rate({answered}[{window}]))\n",
                }
            )
            rules.append(
                {
                    "record": recorded("latency", window),
                    "expr": "1 - (\n"
                    f"  sum by ({SERVICE}) (rate(embedding_queue_wait_seconds_bucket{self.sel(le)}[{window}]))\n"
                    f"  / sum by ({SERVICE}) (rate(embedding_queue_wait_seconds_count{self.sel()}[{window}]))\n)\n",
                }
            )
        return rules

    def burn_rate_alerts(self, slo: str, name: str, summary: str, means: str) -> list[dict[str, Any]]:
        budget = error_budget(slo)
        alerts = []
        for rate in SLOS["burn_rates"]:
            bound = round(rate["factor"] * budget, 6)
            long_, short = recorded(slo, rate["long"]), recorded(slo, rate["short"])
            alerts.append(
                alert(
                    name,
                    f"{long_}{self.sel()} > {bound:g}\nand {short}{self.sel()} > {bound:g}",
                    summary,
                    "{{ $labels.job }}" + IN_NAMESPACE + f" burns its {slo} error budget "
                    f"({budget:.2%} of the {means}) {rate['factor']:g} times too fast: "
                    f"{{{{ $value | humanizePercentage }}}} over {rate['long']}, and still over {rate['short']}. "
                    f"At this rate the {PERIOD_DAYS}-day budget lasts {PERIOD_DAYS / float(rate['factor']):.1f} days.",
                    severity=rate["severity"],
                    for_=rate["for"],
                    labels={"long": rate["long"], "short": rate["short"]},
                )
            )
        return alerts

    def rules(self) -> list[dict[str, Any]]:
        """Every alert, in the order of ops/runbooks.md."""
        up = f"up{self.sel()}"
        return [
            alert(
                "EmbeddingServiceWatchdog",
                "vector(1)",
                "The alerting pipeline of the embedding service works.",
                "Always firing, on purpose: it proves that Prometheus evaluates these rules and Alertmanager "
                "delivers them. Route it to a dead man's switch, which pages when the notifications stop.",
                severity="none",
            ),
            alert(
                "EmbeddingServiceDown",
                f"{up} == 0",
                "An embedding service instance cannot be scraped.",
                "Prometheus has failed to scrape {{ $labels.instance }} for 2 minutes: the process is gone, hung "
                "or unreachable. The other replicas serve; EmbeddingServiceAbsent pages when none is up.",
                for_="2m",
            ),
            alert(
                "EmbeddingServiceAbsent",
                f"count by ({SERVICE}) (max_over_time({up}[1d]))\n"
                f"unless count by ({SERVICE}) ({up} == 1)\n"
                f"or absent({up})",
                "No embedding service instance is up.",
                "For 2 minutes no instance of {{ $labels.job }}" + IN_NAMESPACE + " has been up: every "
                "instance is down, or none is discovered any more.",
                severity="critical",
                for_="2m",
            ),
            alert(
                "EmbeddingServiceNotReady",
                f"embedding_ready{self.sel()} == 0",
                "An embedding service instance has not become ready.",
                "{{ $labels.instance }} serves HTTP but has answered 503 on /ready for 5 minutes: "
                "its model has not finished loading and warming up.",
                for_="5m",
            ),
            alert(
                "EmbeddingServiceRestarting",
                # During a handover (ops/upgrade.sh) two processes serve one port for seconds and a scrape may
                # reach either: the start time can go back and forth. Its 2-minute maximum only moves forward.
                f"changes(max_over_time(process_start_time_seconds{self.sel()}[2m])[30m:1m]) >= 3",
                "An embedding service instance keeps restarting.",
                "{{ $labels.instance }} has restarted {{ $value }} times in the last 30 minutes.",
                for_="5m",
            ),
            alert(
                "EmbeddingServiceExitedUncleanly",
                f"embedding_previous_exit_unclean{self.sel()} == 1\n"
                f"and time() - process_start_time_seconds{self.sel()} < {UNCLEAN_EXIT_WINDOW_S}",
                "An embedding service instance was killed or crashed.",
                "{{ $labels.instance }} restarted after a run that ended without a clean shutdown: crashed, "
                "killed by the kernel's OOM killer, or SIGKILLed (unclean exits so far: "
                + quoted('embedding_unclean_exits_total{instance="%[1]s",job="%[2]s"}', "{{ . | first | value }}")
                + "). An upgrade's or a rollout's restart is clean and not counted.",
                for_="1m",
            ),
            alert(
                "EmbeddingInferenceStalled",
                f"embedding_inference_stalled_seconds{self.sel()} > 60",
                "The embedding service's model makes no progress.",
                "Texts have waited on {{ $labels.instance }} for {{ $value | humanizeDuration }} without a batch "
                "finishing: the inference thread is wedged. Clients time out or give up (499).",
                severity="critical",
                for_="1m",
            ),
            alert(
                "EmbeddingMemoryHigh",
                f"{self.median_rss('5m')} > ignoring(level) {self.threshold('high')}",
                "Embedding service memory is above its high threshold.",
                "RSS of {{ $labels.instance }} has been {{ $value | humanize }}B (the median of 5 minutes), above "
                "its high threshold of "
                + configured("high")
                + " (EMBEDDING_MEMORY_HIGH_BYTES): cleanups have not brought it back under.",
                for_="3m",
            ),
            alert(
                "EmbeddingMemoryNearContainerLimit",
                f"{self.median_rss('2m')} / ignoring(level) {self.threshold('container')} > 0.95",
                "Embedding service memory is close to its container's limit.",
                "RSS of {{ $labels.instance }} has been {{ $value | humanizePercentage }} of its container's memory "
                "limit of " + configured("container") + " (the median of 2 minutes). The kernel kills the process "
                "at 100%.",
                severity="critical",
                for_="1m",
            ),
            alert(
                "EmbeddingMemoryGrowthPredicted",
                f"""
predict_linear({self.rss}[2h], 4 * 3600) > ignoring(level) {self.ceiling}
and {self.rss} < ignoring(level) {self.ceiling}
and {self.rss} > ignoring(level) {self.threshold("elevated")}
and deriv({self.rss}[30m]) > 0
and time() - process_start_time_seconds{self.sel()} > {AGE_GUARD_S}
""",
                "Embedding service memory keeps growing towards its limit.",
                "RSS of {{ $labels.instance }} is "
                + CURRENT_RSS
                + ", above its elevated threshold and still rising: at the rate of the last 2 hours it reaches "
                "{{ $value | humanize }}B within 4 hours, past its " + CONFIGURED_CEILING + ".",
                for_="30m",
            ),
            alert(
                "EmbeddingCleanupStorm",
                f"""
sum without (reason) (rate(embedding_cleanups_total{self.sel()}[10m]))
  / {self.requests_rate("10m")} > 0.5
and {self.requests_rate("10m")} > {MIN_TRAFFIC_RPS}
""",
                "The embedding service cleans up memory on nearly every request.",
                "{{ $labels.instance }} ran a memory cleanup for {{ $value | humanizePercentage }} of its embedding "
                "requests over the last 10 minutes (bound 50%).",
                for_="10m",
            ),
            alert(
                "EmbeddingCleanupIneffective",
                "sum without (reason) "
                "(increase(embedding_cleanups_ineffective_total"
                + self.sel('reason=~"threshold|limit"')
                + "[30m])) >= 3",
                "Memory cleanups of the embedding service free nothing.",
                '{{ printf "%.0f" $value }} cleanups of {{ $labels.instance }} triggered by high memory in the last '
                "30 minutes each gave back less than 1 MiB: the memory above the threshold is in use, not garbage.",
                for_="10m",
            ),
            *self.burn_rate_alerts(
                "availability",
                "EmbeddingAvailabilityBudgetBurn",
                "The embedding service fails too many requests for its availability objective.",
                "requests that may fail",
            ),
            *self.burn_rate_alerts(
                "latency",
                "EmbeddingLatencyBudgetBurn",
                "Embedding requests wait too long for the model for the latency objective.",
                f"requests that may wait {SLOS['latency']['threshold_seconds']} s or more",
            ),
            alert(
                "EmbeddingMemoryBudgetExhausted",
                "sum without (reason) (increase(embedding_rejected_total" + self.sel('reason="budget"') + "[5m])) >= 1",
                "The embedding service refuses requests for want of memory budget.",
                "For 10 minutes {{ $labels.instance }} has refused requests because the memory its work in flight "
                "holds was at its budget of "
                + quoted('embedding_memory_budget_bytes{instance="%[1]s",job="%[2]s"}')
                + " ({{ $value | humanize }} refusals in the last 5 minutes): clients get 429 and retry.",
                for_="10m",
            ),
            alert(
                "EmbeddingRequestsRejected",
                "rate(embedding_rejected_total" + self.sel('reason!="budget"') + "[5m]) * 60 > 6",
                "The embedding service refuses requests.",
                "{{ $labels.instance }} has refused {{ $value | humanize }} requests a minute for 5 minutes, "
                "with reason {{ $labels.reason }} (bound 6).",
                for_="5m",
            ),
        ]


CONTAINER = 'container="embedding-service"'
"""How kube-state-metrics and cAdvisor name the service's container (deploy/kubernetes/base/deployment.yaml)."""


def kubernetes_rules() -> list[dict[str, Any]]:
    """Optional alerts from kube-state-metrics and the kubelet's cAdvisor, for clusters that run them (as
    kube-prometheus-stack does): they see what the service cannot, the kernel's verdict and the working set
    the kubelet evicts by."""
    pod = "namespace, pod, container"
    return [
        alert(
            "EmbeddingContainerOOMKilled",
            f"increase(kube_pod_container_status_restarts_total{{{CONTAINER}}}[10m]) > 0\n"
            f"and on ({pod})\n"
            f'kube_pod_container_status_last_terminated_reason{{{CONTAINER}, reason="OOMKilled"}} == 1',
            "The embedding service's container was killed for memory.",
            "The container of {{ $labels.namespace }}/{{ $labels.pod }} was restarted in the last 10 minutes after "
            "the kernel's OOM killer ended it (OOMKilled): it reached its memory limit.",
            for_="0m",
        ),
        alert(
            "EmbeddingContainerMemoryNearLimit",
            f"max by ({pod}) (quantile_over_time(0.5, container_memory_working_set_bytes{{{CONTAINER}}}[2m]))\n"
            f"/ on ({pod})\n"
            f'max by ({pod}) (kube_pod_container_resource_limits{{{CONTAINER}, resource="memory"}}) > 0.95',
            "The embedding service's container is close to its memory limit.",
            "The working set of {{ $labels.namespace }}/{{ $labels.pod }} has been {{ $value | humanizePercentage }} "
            "of its memory limit (the median of 2 minutes): the kernel kills the container at 100%.",
            severity="critical",
            for_="1m",
        ),
    ]


def render_kubernetes(runbook_base: str = RUNBOOK_BASE) -> str:
    document = {
        "groups": [{"name": "embedding-service-kubernetes", "rules": with_runbooks(kubernetes_rules(), runbook_base)}]
    }
    return KUBERNETES_HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


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


KUBERNETES_OUT = Path(__file__).with_name("embedding-service.kubernetes.rules.yml")
KUBERNETES_HEADER = """\
# Optional alert rules of the embedding service on Kubernetes, from kube-state-metrics and cAdvisor.
# GENERATED by alerts/generate.py: edit that, then `make rules`. promtool unit tests: alerts/tests/.
"""


def render(runbook_base: str = RUNBOOK_BASE, selector: str = SELECTOR) -> str:
    rules = Rules(selector)
    # One group: its rules run in order, so each alert reads the ratios recorded in the same evaluation.
    document = {
        "groups": [
            {"name": "embedding-service", "rules": rules.recording_rules() + with_runbooks(rules.rules(), runbook_base)}
        ]
    }
    return HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runbook-base", default=RUNBOOK_BASE, help="URL of the published ops/runbooks.md")
    parser.add_argument(
        "--selector",
        default=SELECTOR,
        help='label matchers every rule selects the service with, e.g. \'job="embedding-service",namespace="prod"\'',
    )
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the rules")
    args = parser.parse_args()
    args.out.write_text(render(args.runbook_base, args.selector))
    print(f"wrote {args.out}")
    if args.out == OUT:
        KUBERNETES_OUT.write_text(render_kubernetes(args.runbook_base))
        print(f"wrote {KUBERNETES_OUT}")


if __name__ == "__main__":
    main()
