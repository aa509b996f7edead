"""Run the real service (gunicorn, real model) on a free loopback port: for tests, benchmarks and load tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = "all-minilm-l6-v2"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


SERVICE = "app.asgi:app"
"""The service's own application, which ``embedding-service serve`` runs."""


class ServiceProcess:
    """gunicorn serving ``app.asgi:app`` exactly as ``make run`` does, logs captured to a file (``target``:
    another ASGI app built with :func:`app.server.serve`, such as the tests' leaky one)."""

    def __init__(
        self,
        log_path: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
        target: str = SERVICE,
        host: str = "127.0.0.1",
    ) -> None:
        self.target = target
        self.host = host
        """The address gunicorn binds: loopback, or ``[::]`` (every address, IPv4 clients as ``::ffff:a.b.c.d``)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "EMBEDDING_MODEL": BUNDLED_MODEL,
            "EMBEDDING_LOG_LEVEL": "info",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        """Start gunicorn; returns at once (see :meth:`wait_ready`)."""
        gunicorn = Path(sys.executable).with_name("gunicorn")
        bind = ["--bind", f"{self.host}:{self.port}"]
        if self.target == SERVICE:  # the command line users run: `embedding-service serve`
            command = [sys.executable, "-m", "app", "serve", *bind]
        else:  # another app behind the same front and gunicorn configuration
            command = [str(gunicorn), "-c", "python:app.gunicorn_conf", *bind, self.target]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def wait_ready(self, timeout_s: float = 120.0, path: str = "/ready") -> list[int]:
        """Poll ``path`` (``/ready``, or a manifest's probe) until 200; return the status codes seen on the way."""
        seen: list[int] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                status = requests.get(f"{self.url}{path}", timeout=2).status_code
            except requests.RequestException:  # not listening yet, or too busy loading to answer in 2 s
                status = 0
            seen.append(status)
            if status == 200:
                return seen
            time.sleep(0.1)
        raise TimeoutError(f"service not ready after {timeout_s}s:\n{self.log_text()[-3000:]}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, wait for exit, return the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self._stop()
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def _stop(self) -> None:
        """Ask the service to stop, as its supervisor would."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout_s: float) -> int:
        """Wait for the process to exit by itself; return the exit code."""
        assert self.proc is not None
        code = self.proc.wait(timeout_s)
        self._log.close()
        return code

    def worker_pid(self, timeout_s: float = 30.0) -> int:
        """The gunicorn worker's pid: the process that holds the model."""
        import psutil

        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            children = psutil.Process(self.proc.pid).children()
            if children:
                return int(children[0].pid)
            time.sleep(0.1)
        raise TimeoutError("no gunicorn worker")

    def worker_rss(self, key: str = "VmRSS") -> int:
        """A memory line of the worker's ``/proc/PID/status`` in bytes: ``VmRSS`` now, ``VmHWM`` its peak."""
        for line in Path(f"/proc/{self.worker_pid()}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def reset_peak_rss(self) -> None:
        """Start the worker's RSS high-water mark (``VmHWM``) again from its current RSS."""
        Path(f"/proc/{self.worker_pid()}/clear_refs").write_text("5")

    def log_text(self) -> str:
        """Everything the service wrote so far."""
        return self.log_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (optionally only those whose ``event`` is ``name``)."""
        found = []
        for line in self.log_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and (name is None or record.get("event") == name):
                found.append(record)
        return found

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample from ``/metrics`` (None when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(f"{self.url}/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return None


@contextmanager
def running_service(
    log_path: Path,
    env: dict[str, str] | None = None,
    port: int | None = None,
    target: str = "app.asgi:app",
    host: str = "127.0.0.1",
) -> Iterator[ServiceProcess]:
    """A ready service for the ``with`` block (on ``port``, default a free one), stopped with SIGTERM after it."""
    service = ServiceProcess(log_path, env, port, target, host).start()
    try:
        service.wait_ready()
        yield service
    finally:
        service.terminate()
