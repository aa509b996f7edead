"""One incident, one notification: ops/alertmanager.yml's grouping and inhibitions in a real Alertmanager.

The alerts are posted as Prometheus would send them (Alertmanager's API v2), with the labels the shipped
rules give them; the receiver (ops/alert_receiver.py) records what reaches the pager and the tickets.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from loadtest.service import free_port
from tests.e2e.test_monitoring import ROOT, _healthy, alertmanager_config, start, wait_until

pytestmark = pytest.mark.slow

SETTLE_S = 4.0
"""Longer than the test configuration's group wait and interval (1 s each): what was not sent is held back."""


@dataclass
class Pager:
    alertmanager: str
    notifications: Path

    def fire(self, *alerts: dict[str, str]) -> None:
        now = datetime.now(UTC)
        body = [
            {"labels": labels, "startsAt": now.isoformat(), "endsAt": (now + timedelta(hours=1)).isoformat()}
            for labels in alerts
        ]
        requests.post(f"{self.alertmanager}/api/v2/alerts", json=body, timeout=10).raise_for_status()

    def received(self, path: str) -> list[list[dict[str, str]]]:
        """The alerts (their labels) of each notification posted to ``path`` (/page, /ticket)."""
        if not self.notifications.exists():
            return []
        notes = [json.loads(line) for line in self.notifications.read_text().splitlines() if line.strip()]
        return [[a["labels"] for a in n["payload"]["alerts"]] for n in notes if n["path"] == path]


@pytest.fixture
def pager(tmp_path: Path) -> Iterator[Pager]:
    alertmanager = shutil.which("prometheus-alertmanager")
    assert alertmanager, "run `make system-deps` (Debian prometheus-alertmanager)"
    receiver_port, alertmanager_port = free_port(), free_port()
    notifications = tmp_path / "notifications.jsonl"
    receiver = start(
        [sys.executable, str(ROOT / "ops" / "alert_receiver.py"), "--host", "127.0.0.1",
         "--port", str(receiver_port), "--out", str(notifications)],
        tmp_path / "receiver.log",
    )  # fmt: skip
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager_config(receiver_port)))
    manager = start(
        [alertmanager, f"--config.file={tmp_path / 'alertmanager.yml'}", f"--storage.path={tmp_path / 'am'}",
         f"--web.listen-address=127.0.0.1:{alertmanager_port}", "--cluster.listen-address="],
        tmp_path / "alertmanager.log",
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{alertmanager_port}"
        wait_until(lambda: _healthy(f"{url}/-/ready"), 60, "Alertmanager")
        yield Pager(url, notifications)
    finally:
        for process in (manager, receiver):
            process.terminate()
            process.wait(30)


def labels(alertname: str, severity: str, **extra: str) -> dict[str, str]:
    return {"alertname": alertname, "severity": severity, "job": "embedding-service", **extra}


def settle() -> None:
    time.sleep(SETTLE_S)


def test_a_full_outage_is_one_page(pager: Pager) -> None:
    prod = {"namespace": "prod"}
    pager.fire(
        labels("EmbeddingServiceAbsent", "critical", **prod),
        *(labels("EmbeddingServiceDown", "warning", instance=f"{pod}:5000", **prod) for pod in ("a", "b", "c")),
        *(labels("EmbeddingServiceNotReady", "warning", instance=f"{pod}:5000", **prod) for pod in ("a", "b", "c")),
    )
    wait_until(lambda: pager.received("/page"), 30, "the page")
    settle()
    pages = pager.received("/page")
    assert [[a["alertname"] for a in note] for note in pages] == [["EmbeddingServiceAbsent"]]
    assert pager.received("/ticket") == []  # its instances being down are part of it


def test_one_replica_down_is_one_ticket_and_pages_nobody(pager: Pager) -> None:
    prod = {"namespace": "prod"}
    pager.fire(
        labels("EmbeddingServiceDown", "warning", instance="a:5000", **prod),
        labels("EmbeddingServiceNotReady", "warning", instance="a:5000", **prod),  # the same instance: silenced
        labels("EmbeddingServiceNotReady", "warning", instance="b:5000", **prod),  # another one: its own ticket
    )
    wait_until(lambda: len(pager.received("/ticket")) >= 2, 30, "the tickets")
    settle()
    tickets = sorted([(a["alertname"], a["instance"]) for a in note] for note in pager.received("/ticket"))
    assert tickets == [[("EmbeddingServiceDown", "a:5000")], [("EmbeddingServiceNotReady", "b:5000")]]
    assert pager.received("/page") == []


def test_a_failed_rollout_is_one_notification_not_one_per_pod(pager: Pager) -> None:
    pods = [f"embedding-service-7d9f-{i}:5000" for i in range(5)]
    pager.fire(*(labels("EmbeddingServiceNotReady", "warning", instance=pod, namespace="staging") for pod in pods))
    wait_until(lambda: pager.received("/ticket"), 30, "the ticket")
    settle()
    (note,) = pager.received("/ticket")
    assert sorted(a["instance"] for a in note) == pods


def test_near_the_container_limit_silences_the_memory_symptoms_of_that_instance_only(pager: Pager) -> None:
    prod: dict[str, Any] = {"namespace": "prod"}
    pager.fire(
        labels("EmbeddingMemoryNearContainerLimit", "critical", instance="a:5000", **prod),
        labels("EmbeddingMemoryHigh", "warning", instance="a:5000", **prod),
        labels("EmbeddingMemoryGrowthPredicted", "warning", instance="a:5000", **prod),
        labels("EmbeddingMemoryHigh", "warning", instance="b:5000", **prod),
    )
    wait_until(lambda: pager.received("/page") and pager.received("/ticket"), 30, "the page and the ticket")
    settle()
    assert [[a["instance"] for a in note] for note in pager.received("/page")] == [["a:5000"]]
    assert [[(a["alertname"], a["instance"]) for a in note] for note in pager.received("/ticket")] == [
        [("EmbeddingMemoryHigh", "b:5000")]
    ]
