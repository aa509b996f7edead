"""Two replicas behind a real load balancer: one goes over its memory limit, traffic moves, nobody notices.

    make rehearsal                                   # 120 s of load (REHEARSAL_S to change it)
    python -m loadtest.rehearsal --seconds 15        # what make test runs (tests/e2e/test_replicas.py)

What Kubernetes does with deploy/kubernetes, on loopback ports: two services (replicas ``a`` and ``b``)
behind haproxy, which health-checks ``GET /ready`` every 0.5 s (the readiness probe), retries a request
another replica answered 503 (as clients of the Service should, with Retry-After) and a real Prometheus
scrapes both. Replica ``b`` has a hard limit 60 MB above its idle RSS, no per-batch trims and a memory
budget set by hand (so its batches of 16,384 tokens stay: a derived budget would make them fit its small
room), so large batches take it over: it sheds (503 on new requests and on ``/ready``), haproxy takes it
out, its monitor gives the memory back, ``/ready`` turns 200 once memory is under the limit by its margin
and shedding has lasted its minimum, and haproxy puts it back, again and again. After the load, ``b`` must
be ready again within that minimum and 2 s more (memory given back by the monitor's purges, not after the
limit cleanup's 60 s cooldown).

It prints, and writes to ``reports/rehearsal/summary.json``: requests sent and their statuses, the
requests haproxy retried elsewhere (``b`` answered 503 before a health check took it out), how often and
how long ``b`` was out, when it was ready and back after the load, what each replica served, and what
Prometheus scraped (``b``'s rejections and its peak RSS against its limit).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from app.shedding import SHED_MIN_S
from loadtest.clients import Clients, errors
from loadtest.corpus import build_corpus, sample
from loadtest.service import ROOT, ServiceProcess, free_port

MB = 1_000_000
CHECK_INTERVAL_MS = 500
READY_AGAIN_S = SHED_MIN_S + 2.0
"""Shedding lasts at least SHED_MIN_S; then the monitor's purges (every 0.5 s) end it."""
HAPROXY_CONFIG = """\
global
    log stdout format raw local0
    maxconn 256
    stats socket {admin_socket} level admin
    # A request is retried only when the balancer still holds it whole: room for 32 long texts.
    tune.bufsize 524288

defaults
    mode http
    log global
    timeout connect 2s
    timeout client 180s
    timeout server 180s
    # 503 is what a replica that sheds load answers (with Retry-After): embedding is idempotent, so the
    # balancer sends the request to another replica instead of failing it.
    retries 3
    retry-on conn-failure empty-response 503
    option redispatch 1
    option http-buffer-request

frontend embeddings
    bind 127.0.0.1:{port}
    log-format "%b/%s %ST %rc %Tt %HP"
    default_backend replicas

backend replicas
    balance leastconn
    option httpchk GET /ready
    http-check expect status 200
    default-server inter {check_ms}ms fall 1 rise 2
    server a 127.0.0.1:{port_a} check
    server b 127.0.0.1:{port_b} check

listen stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""

SERVICE_PROXY_CONFIG = """\
global
    log stdout format raw local0
    maxconn 256
    stats socket {admin_socket} level admin

# As a Kubernetes Service through kube-proxy: each connection goes to one endpoint and stays there (kept-alive
# requests follow it), nothing is retried, and a removed endpoint keeps the connections it has. With a
# readiness path, an endpoint is in only while GET path answers 200, as the endpoints controller follows the
# readiness probe; with none in, a connection is closed unanswered (kube-proxy rejects it).
defaults
    mode tcp
    log global
    timeout connect 2s
    timeout client 180s
    timeout server 180s
    retries 0

frontend embeddings
    bind 127.0.0.1:{port}
    log-format "%b/%s %Tt"
    default_backend replicas

backend replicas
    balance roundrobin{readiness}
    server a 127.0.0.1:{port_a}{check}
    server b 127.0.0.1:{port_b}{check}

listen stats
    mode http
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""


@dataclass
class Summary:
    """What the rehearsal measured."""

    seconds: float
    limit_bytes: int
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    retried_elsewhere: int = 0
    served: dict[str, int] = field(default_factory=dict)
    b_taken_out: int = 0
    b_out_s: int = 0
    b_ready_after_load_s: float | None = None
    b_back_after_load_s: float | None = None
    b_rejected_by_prometheus: float = 0.0
    b_peak_rss_bytes: float = 0.0
    a_peak_rss_bytes: float = 0.0
    failed: list[str] = field(default_factory=list)


def readiness_checks(path: str | None) -> str:
    """haproxy's lines that keep a replica in only while ``GET path`` answers 200 (none for no path)."""
    if path is None:
        return ""
    return f"\n    option httpchk GET {path}\n    default-server inter {CHECK_INTERVAL_MS} fall 1 rise 1"


class Balancer:
    """haproxy in the foreground, its request log captured; its stats page read as CSV."""

    def __init__(
        self, work: Path, port_a: int, port_b: int, template: str = HAPROXY_CONFIG, readiness: str | None = None
    ) -> None:
        work = work.resolve()  # haproxy reads a relative socket path as host:port (make rehearsal's reports/...)
        self.port, self.stats_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = work / "haproxy.cfg"
        config.write_text(
            template.format(
                port=self.port,
                port_a=port_a,
                port_b=port_b,
                stats_port=self.stats_port,
                check_ms=CHECK_INTERVAL_MS,
                admin_socket=work / "haproxy.sock",
                readiness=readiness_checks(readiness),
                check=" check" if readiness else "",
            )
        )
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            raise RuntimeError("haproxy not found: make system-deps installs it (Debian haproxy)")
        self.admin_socket = work / "haproxy.sock"
        self.log_path = work / "haproxy.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=self._log, stderr=subprocess.STDOUT)

    def server(self, name: str) -> dict[str, str]:
        text = requests.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text.lstrip("# ")
        rows = [
            dict(zip(text.splitlines()[0].split(","), line.split(","), strict=False)) for line in text.splitlines()[1:]
        ]
        (row,) = (r for r in rows if r.get("pxname") == "replicas" and r.get("svname") == name)
        return row

    def wait_up(self, name: str, timeout_s: float) -> float | None:
        """Seconds until ``name`` is UP, or None if it is not within ``timeout_s``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            try:
                if self.server(name)["status"] in ("UP", "no check"):  # "no check": kube-proxy's way
                    return time.monotonic() - start
            except requests.ConnectionError:  # haproxy is still starting
                pass
            time.sleep(0.1)
        return None

    def remove(self, name: str) -> None:
        """Take ``name`` out as the endpoints controller takes a terminating pod out of a Service."""
        self._admin(f"set server replicas/{name} state maint")

    def add(self, name: str) -> None:
        """Put ``name`` (back) in, as a new pod joins the Service's endpoints."""
        self._admin(f"set server replicas/{name} state ready")

    def _admin(self, command: str) -> None:
        deadline = time.monotonic() + 10
        while not self.admin_socket.exists() and time.monotonic() < deadline:  # haproxy is still starting
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as admin:
            admin.connect(str(self.admin_socket))
            admin.sendall(f"{command}\n".encode())
            admin.recv(4096)

    def requests_log(self) -> list[list[str]]:
        """Each logged request as [backend/server, status, retries, total ms, path]."""
        return [line.split() for line in self.log_path.read_text().splitlines() if re.match(r"^replicas/", line)]

    def terminate(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()


class Prometheus:
    """A real Prometheus scraping both replicas every second."""

    def __init__(self, work: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = work / "prometheus.yml"
        scrape = {"job_name": "embedding-service", "static_configs": [{"targets": targets}]}
        config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": [scrape]}))
        prometheus = shutil.which("prometheus")
        if prometheus is None:
            raise RuntimeError("prometheus not found: make system-deps installs it (Debian prometheus)")
        self._log = (work / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def value(self, query: str) -> dict[str, float]:
        """Instant query: the value per instance."""
        body = requests.get(f"{self.url}/api/v1/query", params={"query": query}, timeout=10).json()
        return {r["metric"].get("instance", ""): float(r["value"][1]) for r in body["data"]["result"]}

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError("Prometheus did not become ready")

    def terminate(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self._log.close()


def drive(url: str, texts: list[str], seconds: float, clients: int) -> Counter[int]:
    """``clients`` indexers sending 32 long texts a request through the balancer for ``seconds``."""
    end = time.monotonic() + seconds
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def client(offset: int) -> None:
        i = offset
        while time.monotonic() < end:
            batch = [texts[(i + k) % len(texts)] for k in range(32)]
            i += 32
            try:
                code = requests.post(f"{url}/embed", json={"inputs": batch}, timeout=180).status_code
            except requests.RequestException:
                code = 0
            with lock:
                statuses[code] += 1

    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, [c * 7 for c in range(clients)]))
    return statuses


def ready_within(service: ServiceProcess, timeout_s: float, since: float) -> float | None:
    """Seconds from ``since`` until ``service``'s ``/ready`` answers 200 (None if not within ``timeout_s``)."""
    while time.monotonic() - since < timeout_s:
        if requests.get(f"{service.url}/ready", timeout=10).status_code == 200:
            return round(time.monotonic() - since, 2)
        time.sleep(0.05)
    return None


def rehearse(work: Path, seconds: float, clients: int = 4) -> Summary:
    """Run it; the summary says what happened (``failed`` lists what did not go as it should)."""
    work.mkdir(parents=True, exist_ok=True)
    # Long texts (the model cuts them at its maximum length): big batches, big activations.
    texts = [(d.text * 20)[:4000] for d in sample(build_corpus(), 64, seed=3)]
    a = ServiceProcess(work / "a.log").start()
    started: list[ServiceProcess | Balancer | Prometheus] = [a]
    try:
        a.wait_ready()
        idle = int(requests.get(f"{a.url}/memory", timeout=10).json()["rss_bytes"])
        limit = idle + 60 * MB
        env_b = {
            "EMBEDDING_MEMORY_LIMIT_BYTES": str(limit),
            "EMBEDDING_TRIM_AFTER_BATCH": "false",
            "EMBEDDING_MAX_BATCH_TOKENS": "16384",
            "EMBEDDING_CLEANUP_COOLDOWN_S": "60",
            "EMBEDDING_MEMORY_BUDGET_BYTES": "1GB",
        }
        b = ServiceProcess(work / "b.log", env_b).start()
        started.append(b)
        b.wait_ready()
        balancer = Balancer(work, a.port, b.port)
        started.append(balancer)
        prometheus = Prometheus(work, [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"])
        started.append(prometheus)
        prometheus.wait_ready()
        for name in ("a", "b"):
            if balancer.wait_up(name, 10) is None:
                raise RuntimeError(f"haproxy never saw replica {name} ready")
        time.sleep(2)  # scrapes before the load
        began = time.monotonic()
        statuses = drive(balancer.url, texts, seconds, clients)
        load_done = time.monotonic()
        summary = Summary(seconds=round(load_done - began, 1), limit_bytes=limit)
        summary.b_ready_after_load_s = ready_within(b, 30, since=load_done)
        back = balancer.wait_up("b", 30)
        summary.b_back_after_load_s = None if back is None else round(time.monotonic() - load_done, 2)
        time.sleep(2)  # the last scrapes
        summary.requests = sum(statuses.values())
        summary.statuses = {str(code): n for code, n in sorted(statuses.items())}
        logged = [row for row in balancer.requests_log() if row[-1] == "/embed"]
        summary.retried_elsewhere = sum(1 for row in logged if row[2] not in ("0", "+0"))
        summary.served = dict(Counter(row[0].split("/")[1] for row in logged if row[1] == "200"))
        b_row = balancer.server("b")
        summary.b_taken_out, summary.b_out_s = int(b_row["chkdown"]), int(b_row["downtime"] or 0)
        instance_b, instance_a = f"127.0.0.1:{b.port}", f"127.0.0.1:{a.port}"
        window = f"{int(time.monotonic() - began) + 5}s"
        rejected = prometheus.value(f'max_over_time(embedding_rejected_total{{reason="memory"}}[{window}])')
        summary.b_rejected_by_prometheus = rejected.get(instance_b, 0.0)
        peaks = prometheus.value(f"max_over_time(embedding_memory_rss_bytes[{window}])")
        summary.b_peak_rss_bytes, summary.a_peak_rss_bytes = peaks.get(instance_b, 0.0), peaks.get(instance_a, 0.0)
        summary.failed = judge(summary)
        return summary
    finally:
        for part in reversed(started):
            part.terminate()


ENDPOINTS_DELAY_S = 1.0
"""After a pod's deletion, how long until the Service stops sending it new connections (the endpoints controller
and kube-proxy, concurrently with the preStop hook)."""


def main_container() -> dict[str, Any]:
    """The service's container as deploy/kubernetes/base/deployment.yaml declares it."""
    manifest = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "base" / "deployment.yaml").read_text())
    (container,) = (c for c in manifest["spec"]["template"]["spec"]["containers"] if c["name"] == "embedding-service")
    return container  # type: ignore[no-any-return]


def pre_stop_s() -> float:
    """The preStop pause of the Kubernetes manifests: what the rehearsal of a pod's shutdown waits."""
    command = main_container()["lifecycle"]["preStop"]["exec"]["command"]
    if command[0] != "sleep":
        raise ValueError(f"the preStop hook is not a pause: {command}")
    return float(command[1])


def rehearse_pod_shutdown(work: Path, clients: int = 16) -> dict[str, object]:
    """Two replicas behind the balancer and ``clients`` clients sending without pause; replica a is deleted the
    way Kubernetes deletes a pod: taken out of the Service :data:`ENDPOINTS_DELAY_S` after the deletion, SIGTERM
    after the preStop pause; it answers what it accepted and exits. What the clients saw, and how long it took."""
    work.mkdir(parents=True, exist_ok=True)
    a, b = ServiceProcess(work / "pod-a.log").start(), ServiceProcess(work / "pod-b.log").start()
    started: list[ServiceProcess | Balancer] = [a, b]
    try:
        a.wait_ready()
        b.wait_ready()
        balancer = Balancer(work, a.port, b.port, SERVICE_PROXY_CONFIG)
        started.append(balancer)
        for name in ("a", "b"):
            if balancer.wait_up(name, 10) is None:
                raise RuntimeError(f"haproxy never saw replica {name}")
        pause = pre_stop_s()

        def delete_pod() -> tuple[int, float]:
            deleted = time.monotonic()
            time.sleep(ENDPOINTS_DELAY_S)
            balancer.remove("a")
            time.sleep(pause - ENDPOINTS_DELAY_S)
            code = a.terminate(timeout_s=90)
            return code, time.monotonic() - deleted

        with Clients(balancer.url, clients) as sending:
            sending.wait_answers(50)
            before = len(sending.answers)
            (code, took), answers = sending.during(delete_pod, settle_s=3)
        return {
            "answers_before": before,
            "answers_during": len(answers),
            "errors": len(errors(answers)),
            "first_errors": errors(answers)[:5],
            "exit_code": code,
            "deleted_to_exit_s": round(took, 1),
            "pre_stop_s": pause,
            "connections": dict(
                Counter(
                    line.split()[0].split("/")[1]
                    for line in balancer.log_path.read_text().splitlines()
                    if line.startswith("replicas/")
                )
            ),
        }
    finally:
        for part in reversed(started):
            part.terminate()


def judge(summary: Summary) -> list[str]:
    """What did not go as it should."""
    failed = []
    if set(summary.statuses) != {"200"}:
        failed.append(f"requests failed through the balancer: {summary.statuses}")
    if summary.b_taken_out < 1 or summary.b_out_s < 1:
        failed.append("replica b was never taken out of the balancer (for a second or more)")
    if summary.b_ready_after_load_s is None or summary.b_ready_after_load_s > READY_AGAIN_S:
        # Idle above its limit, the monitor gives memory back every 0.5 s: ready again at once, not after
        # the full cleanup's cooldown (60 s here).
        failed.append(f"replica b not ready within {READY_AGAIN_S} s of the load: {summary.b_ready_after_load_s}")
    if summary.b_back_after_load_s is None:
        failed.append("replica b did not come back into the balancer within 30 s of the load")
    if summary.b_peak_rss_bytes <= summary.limit_bytes:
        failed.append("Prometheus did not see replica b above its limit")
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="how long to drive load (default 120)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent indexers (default 4)")
    parser.add_argument("--out", type=Path, default=Path("reports/rehearsal"), help="logs and summary.json")
    args = parser.parse_args()
    summary = rehearse(args.out, args.seconds, args.clients)
    (args.out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    print(json.dumps(asdict(summary), indent=2))
    print("PASS" if not summary.failed else "FAIL: " + "; ".join(summary.failed))
    raise SystemExit(1 if summary.failed else 0)


if __name__ == "__main__":
    main()
