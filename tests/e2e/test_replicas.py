"""Two replicas behind haproxy with a real Prometheus: one goes over its memory limit, the balancer routes
around it while it sheds, no request fails, and it comes back (loadtest/rehearsal.py; `make rehearsal`
runs it longer). Replica b's settings make it shed after a load and give the memory back by itself: it must
be ready again within shedding's minimum and 2 s more of the load's end."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from loadtest.rehearsal import READY_AGAIN_S, rehearse, rehearse_pod_shutdown

pytestmark = pytest.mark.slow


def test_a_replica_over_its_memory_limit_is_routed_around_and_comes_back(tmp_path: Path) -> None:
    summary = rehearse(tmp_path / "rehearsal", seconds=15)
    print(json.dumps(asdict(summary), indent=2))
    assert summary.failed == []
    assert summary.statuses == {"200": summary.requests}
    assert summary.b_taken_out >= 1
    assert summary.b_ready_after_load_s is not None and summary.b_ready_after_load_s <= READY_AGAIN_S
    assert summary.b_back_after_load_s is not None


def test_a_pod_deleted_under_16_clients_loses_no_request(tmp_path: Path) -> None:
    """A rolling update's old pod goes as Kubernetes deletes it: out of the Service within a second, SIGTERM after
    the manifests' preStop pause, then the drain. Behind a balancer that works as kube-proxy does (per connection,
    no retries; kept-alive connections stay on the pod), 16 clients see no error."""
    seen = rehearse_pod_shutdown(tmp_path / "pod")
    print(json.dumps(seen, indent=2))
    assert seen["errors"] == 0, seen["first_errors"]
    assert seen["exit_code"] == 0  # a clean exit: every request it accepted answered
    assert isinstance(seen["answers_during"], int) and seen["answers_during"] > 50
    connections = seen["connections"]  # both replicas had clients, kept-alive ones among them
    assert isinstance(connections, dict) and connections.get("a", 0) > 0 and connections.get("b", 0) > 0
