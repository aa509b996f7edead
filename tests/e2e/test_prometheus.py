"""A real Prometheus scraping the real service with the repo's rules; the dashboard's queries against it."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from loadtest.corpus import build_corpus, sample
from loadtest.service import ServiceProcess, free_port, running_service

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "alerts" / "embedding-service.rules.yml"
DASHBOARD = ROOT / "dashboards" / "embedding-service.json"
RATE_WINDOW = "20s"

pytestmark = pytest.mark.slow


@dataclass
class Stack:
    service: ServiceProcess
    prometheus: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = requests.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def api(self, path: str) -> Any:
        return requests.get(f"{self.prometheus}/api/v1/{path}", timeout=10).json()["data"]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def prometheus_config(target: str) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "embedding-service", "static_configs": [{"targets": [target]}]}],
    }


def send_load(service: ServiceProcess) -> None:
    texts = [d.text for d in sample(build_corpus(), 200, seed=11)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        jobs = [
            pool.submit(requests.post, f"{service.url}/embed", json={"inputs": texts[i : i + 8]}, timeout=120)
            for i in range(0, 160, 8)
        ]
        jobs += [
            pool.submit(requests.post, f"{service.url}/v1/embeddings", json={"input": t}, timeout=120)
            for t in texts[160:]
        ]
        assert {job.result().status_code for job in jobs} == {200}
    requests.post(f"{service.url}/embed", json={"inputs": []}, timeout=10)  # a 422 for the error panels
    requests.get(f"{service.url}/memory", timeout=10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is not installed: run `make system-deps` (Debian package prometheus)"
    work = tmp_path_factory.mktemp("prometheus")
    env = {  # thresholds below the real RSS, so the high-memory alert has something to say
        "EMBEDDING_MEMORY_ELEVATED_BYTES": "100MB",
        "EMBEDDING_MEMORY_HIGH_BYTES": "200MB",
        "EMBEDDING_MONITOR_INTERVAL_S": "1",
        "EMBEDDING_CLEANUP_EVERY_REQUESTS": "10",
    }
    with running_service(work / "service.log", env) as service:
        (work / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(f"127.0.0.1:{service.port}")))
        port = free_port()
        with (work / "prometheus.log").open("wb") as log:
            proc = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={work / 'prometheus.yml'}",
                    f"--storage.tsdb.path={work / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            stack = Stack(service, f"http://127.0.0.1:{port}")
            wait_until(lambda: _ready(stack.prometheus), 60, "Prometheus to be ready")
            send_load(service)
            time.sleep(12)  # a dozen scrapes after the load, so rates over the window have points
            yield stack
        finally:
            proc.terminate()
            proc.wait(30)


def _ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels if p["type"] != "row" for t in p["targets"]]


def test_the_service_is_a_healthy_target(stack: Stack) -> None:
    targets = stack.api("targets")["activeTargets"]
    assert [(t["labels"]["job"], t["health"]) for t in targets] == [("embedding-service", "up")]


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    instances = {s["instance"] for s in stack.api("series?match[]=embedding_model_info")}
    assert instances == {f"127.0.0.1:{stack.service.port}"}  # what the $instance variable offers
    empty = []
    for title, expr in dashboard_queries():
        concrete = expr.replace("$instance", ".*").replace("$__rate_interval", RATE_WINDOW).replace("$__interval", "5s")
        if not stack.query(concrete):
            empty.append(f"{title}: {concrete}")
    assert not empty, "queries with no series:\n" + "\n".join(empty)


def test_every_rule_is_loaded_and_healthy(stack: Stack) -> None:
    shipped = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    wait_until(
        lambda: all(r.get("lastEvaluation", "").startswith("2") for r in _rules(stack)), 30, "rules to be evaluated"
    )
    loaded = _rules(stack)
    assert {r["name"] for r in loaded} == shipped
    assert {r["name"]: r["health"] for r in loaded} == dict.fromkeys(shipped, "ok")


def test_the_high_memory_alert_goes_pending_when_rss_is_above_the_threshold(stack: Stack) -> None:
    assert stack.query('embedding_memory_status{status="high"} == 1')

    def high_alert() -> bool:
        alerts = stack.api("alerts")["alerts"]
        return any(
            a["labels"]["alertname"] == "EmbeddingMemoryHigh" and a["state"] in ("pending", "firing") for a in alerts
        )

    wait_until(high_alert, 30, "EmbeddingMemoryHigh to be pending")


def _rules(stack: Stack) -> list[dict[str, Any]]:
    return [r for g in stack.api("rules")["groups"] for r in g["rules"]]
