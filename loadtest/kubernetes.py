"""What a Kubernetes Service does with deploy/kubernetes, rehearsed with real processes on loopback ports.

There is no cluster here: kube-proxy is played by haproxy in TCP mode (each connection to one endpoint, kept-alive
requests follow it, nothing retried), the endpoints controller by haproxy's health check on the manifest's
readiness path, and the pods by the real service started with the manifest's settings.

- :func:`rehearse_rebalancing`: an indexer on one kept-alive connection while the autoscaler adds a replica.
  The service retires connections (``EMBEDDING_CONNECTION_MAX_AGE_S``, ``EMBEDDING_CONNECTION_MAX_REQUESTS``),
  so the indexer's next connection may reach the new replica; without that it stays on the first one forever.
- :func:`rehearse_all_shedding`: every replica over its memory limit at once. With the manifest's readiness
  path clients get 503 with ``Retry-After``; with ``/ready`` (503 while shedding) every endpoint leaves the
  Service and they get a closed connection and no answer.

tests/e2e/test_kubernetes_rehearsal.py runs both; tests/e2e/test_pod_sandbox.py runs the pod's sandbox.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests
import yaml

from loadtest.rehearsal import SERVICE_PROXY_CONFIG, Balancer
from loadtest.service import ROOT, ServiceProcess

BASE = ROOT / "deploy" / "kubernetes" / "base"


def main_container() -> dict[str, Any]:
    """The service's container as deploy/kubernetes/base/deployment.yaml declares it."""
    manifest = yaml.safe_load((BASE / "deployment.yaml").read_text())
    (container,) = (c for c in manifest["spec"]["template"]["spec"]["containers"] if c["name"] == "embedding-service")
    return container  # type: ignore[no-any-return]


def readiness_path() -> str:
    """The path of the manifest's readiness probe: what decides whether a pod is among the Service's endpoints."""
    path: str = main_container()["readinessProbe"]["httpGet"]["path"]
    return path


def manifest_settings() -> dict[str, str]:
    """deploy/kubernetes/base/settings.env: the EMBEDDING_* variables every pod gets."""
    pairs = (line.split("=", 1) for line in (BASE / "settings.env").read_text().splitlines())
    return {key.strip(): value.strip() for key, value in (p for p in pairs if len(p) == 2) if not key.startswith("#")}


def _replica_of(balancer: Balancer) -> Counter[str]:
    """Connections per replica, from haproxy's log (one line each, written when the connection closes)."""
    return Counter(row[0].split("/")[1] for row in balancer.requests_log())


def _embedded(service: ServiceProcess) -> float:
    """``POST /embed`` requests the replica answered with 200."""
    return service.metric("embedding_requests_total", route="/embed", code="200") or 0.0


def rehearse_rebalancing(work: Path, env: dict[str, str], before: int = 20, seconds: float = 12.0) -> dict[str, Any]:
    """One indexer on one ``requests.Session`` (kept alive) sends ``before`` requests while replica ``a`` is the
    Service's only endpoint; then replica ``b`` joins (the autoscaler's new pod, ready) and the indexer goes on
    for ``seconds``. What each replica answered before and after, and the connections the indexer opened."""
    work.mkdir(parents=True, exist_ok=True)
    a, b = ServiceProcess(work / "pod-a.log", env).start(), ServiceProcess(work / "pod-b.log", env).start()
    started: list[ServiceProcess | Balancer] = [a, b]
    try:
        a.wait_ready()
        b.wait_ready()
        balancer = Balancer(work, a.port, b.port, SERVICE_PROXY_CONFIG, readiness=readiness_path())
        started.append(balancer)
        balancer.remove("b")  # not scaled out yet
        if balancer.wait_up("a", 10) is None:
            raise RuntimeError("haproxy never saw replica a ready")
        texts = [f"passage {i} of a document an indexer sends" for i in range(8)]
        statuses: Counter[int] = Counter()
        with requests.Session() as indexer:

            def send() -> None:
                answer = indexer.post(f"{balancer.url}/embed", json={"inputs": texts}, timeout=60)
                statuses[answer.status_code] += 1

            for _ in range(before):
                send()
            answered_before = {"a": _embedded(a), "b": _embedded(b)}
            balancer.add("b")
            if balancer.wait_up("b", 10) is None:
                raise RuntimeError("haproxy never saw replica b ready")
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                send()
        time.sleep(0.5)  # haproxy logs a connection when it closes
        answered_after = {"a": _embedded(a) - answered_before["a"], "b": _embedded(b) - answered_before["b"]}
        return {
            "env": env,
            "statuses": dict(statuses),
            "answered_before": answered_before,
            "answered_after": answered_after,
            "connections": dict(_replica_of(balancer)),
        }
    finally:
        for part in reversed(started):
            part.terminate()


def rehearse_all_shedding(work: Path, readiness: list[str]) -> dict[str, Any]:
    """One replica (the only one: all replicas) whose memory is above its limit from the start, behind a Service
    whose endpoints follow each of ``readiness`` in turn: what a client sending ``POST /embed`` gets."""
    work.mkdir(parents=True, exist_ok=True)
    # A limit far below any RSS: the replica sheds from its first monitor pass on, and stays shedding.
    env = {"EMBEDDING_MEMORY_LIMIT_BYTES": "50MB", "EMBEDDING_MONITOR_INTERVAL_S": "1"}
    pod = ServiceProcess(work / "pod.log", env).start()
    seen: dict[str, Any] = {}
    try:
        _wait(lambda: _status(f"{pod.url}/health") == 200, "the replica to load its model")
        _wait(lambda: _status(f"{pod.url}/ready") == 503, "the replica to shed")
        for i, path in enumerate(readiness):
            (work / f"service-{i}").mkdir()
            balancer = Balancer(work / f"service-{i}", pod.port, pod.port, SERVICE_PROXY_CONFIG, readiness=path)
            try:
                balancer.remove("b")  # one endpoint
                time.sleep(2.0)  # several health checks: the endpoint is in or out by now
                try:
                    answer = requests.post(f"{balancer.url}/embed", json={"inputs": ["a query"]}, timeout=30)
                    seen[path] = {
                        "status": answer.status_code,
                        "retry_after": answer.headers.get("Retry-After"),
                        "connection": answer.headers.get("Connection"),
                        "error": answer.json().get("error"),
                    }
                except requests.ConnectionError as error:
                    seen[path] = {"status": None, "error": f"{type(error).__name__}: {error}"}
                seen[path]["endpoint"] = balancer.server("a")["status"]
            finally:
                balancer.terminate()
        return seen
    finally:
        pod.terminate()


def _status(url: str) -> int:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return 0


def _wait(condition: Any, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s} s for {what}")
        time.sleep(0.2)
