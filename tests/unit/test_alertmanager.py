"""Alertmanager's shipped configuration routes every alert to the receiver its severity asks for."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "ops" / "alertmanager.yml"
RULES = ROOT / "alerts" / "embedding-service.rules.yml"
EXPECTED_RECEIVER = {"none": "heartbeat", "critical": "page", "warning": "ticket"}


def shipped_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule]


def route(labels: dict[str, str]) -> str:
    amtool = shutil.which("amtool")
    assert amtool, "amtool is not installed: run `make system-deps` (Debian package prometheus-alertmanager)"
    result = subprocess.run(
        [amtool, "config", "routes", "test", f"--config.file={CONFIG}", *(f"{k}={v}" for k, v in labels.items())],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@pytest.mark.parametrize("rule", shipped_rules(), ids=lambda r: r["alert"])
def test_every_alert_reaches_the_receiver_its_severity_asks_for(rule: dict[str, Any]) -> None:
    """Only the heartbeat and the critical alerts page; one replica down is a ticket."""
    labels = {"alertname": rule["alert"], **rule["labels"], "job": "embedding-service", "instance": "a:5000"}
    assert route(labels) == EXPECTED_RECEIVER[rule["labels"]["severity"]]


def test_resolutions_are_sent_except_for_the_heartbeat() -> None:
    receivers = {r["name"]: r["webhook_configs"] for r in yaml.safe_load(CONFIG.read_text())["receivers"]}
    assert set(receivers) == set(EXPECTED_RECEIVER.values())
    for name, webhooks in receivers.items():
        assert [w["send_resolved"] for w in webhooks] == [name != "heartbeat"]


def test_the_compose_stack_wires_prometheus_to_alertmanager_to_the_receiver() -> None:
    compose = yaml.safe_load((ROOT / "ops" / "compose.yaml").read_text())["services"]
    prometheus = yaml.safe_load((ROOT / "ops" / "prometheus.yml").read_text())
    (alertmanagers,) = prometheus["alerting"]["alertmanagers"]
    assert alertmanagers["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert "alertmanager" in compose["prometheus"]["depends_on"]
    assert "./alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro" in compose["alertmanager"]["volumes"]
    receiver_command = compose["alert-receiver"]["command"]
    port = receiver_command[receiver_command.index("--port") + 1]
    urls = [w["url"] for r in yaml.safe_load(CONFIG.read_text())["receivers"] for w in r["webhook_configs"]]
    assert all(url.startswith(f"http://alert-receiver:{port}/") for url in urls)


def test_a_replica_down_is_a_ticket_and_the_service_down_a_page() -> None:
    instance = {"job": "embedding-service", "instance": "a:5000", "namespace": "prod"}
    assert route({"alertname": "EmbeddingServiceDown", "severity": "warning", **instance}) == "ticket"
    assert route({"alertname": "EmbeddingServiceAbsent", "severity": "critical", "job": "embedding-service"}) == "page"


def test_one_incident_is_one_group_and_causes_silence_their_symptoms() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    assert config["route"]["group_by"] == ["alertname", "job", "namespace"]  # not per instance: one page a rollout
    inhibitions = {
        (tuple(rule["source_matchers"]), tuple(rule["target_matchers"])): rule["equal"]
        for rule in config["inhibit_rules"]
    }
    assert inhibitions[
        (('alertname="EmbeddingServiceAbsent"',), ('alertname=~"EmbeddingServiceDown|EmbeddingServiceNotReady"',))
    ] == [
        "namespace",
        "job",
    ]
    assert inhibitions[(('alertname="EmbeddingServiceDown"',), ('alertname="EmbeddingServiceNotReady"',))] == [
        "namespace",
        "job",
        "instance",
    ]
    memory = inhibitions[
        (
            ('alertname="EmbeddingMemoryNearContainerLimit"',),
            ('alertname=~"EmbeddingMemoryHigh|EmbeddingMemoryGrowthPredicted|EmbeddingCleanupIneffective"',),
        )
    ]
    assert memory == ["namespace", "job", "instance"]
