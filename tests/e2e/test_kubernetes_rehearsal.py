"""What a Kubernetes Service does with the manifests, rehearsed (loadtest/kubernetes.py): haproxy balancing
connections as kube-proxy does, its health check following the manifest's readiness probe, real replicas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.kubernetes import readiness_path, rehearse_all_shedding, rehearse_rebalancing, render

pytestmark = pytest.mark.slow

AGE_S = "1"
"""The rehearsal's connection age limit: the manifest's mechanism (EMBEDDING_CONNECTION_MAX_AGE_S), shorter."""


def test_the_manifest_retires_kept_alive_connections() -> None:
    (settings,) = (o["data"] for o in render([]) if o["kind"] == "ConfigMap")  # as kustomize builds it
    assert float(settings["EMBEDDING_CONNECTION_MAX_AGE_S"]) > 0


@pytest.mark.parametrize(("age_s", "spreads"), [(AGE_S, True), ("0", False)], ids=["retired", "never-retired"])
def test_a_kept_alive_indexer_spreads_over_a_replica_added_after_it_connected(
    tmp_path: Path, age_s: str, spreads: bool
) -> None:
    """One indexer on one kept-alive session; a second replica joins. With connections retired by age, the
    new replica takes a share of the indexer's requests; without (the broken copy), it gets none."""
    seen = rehearse_rebalancing(tmp_path, {"EMBEDDING_CONNECTION_MAX_AGE_S": age_s}, seconds=10)
    print(json.dumps(seen, indent=2))
    assert set(seen["statuses"]) == {200}  # every request answered: retiring a connection loses nothing
    assert seen["answered_before"]["b"] == 0
    after = seen["answered_after"]
    if spreads:
        assert after["b"] >= 0.2 * (after["a"] + after["b"]), after
    else:
        assert after["b"] == 0 and seen["connections"] == {"a": 1}


def test_when_every_replica_sheds_clients_get_503_with_retry_after(tmp_path: Path) -> None:
    """The manifest's readiness probe keeps a shedding pod among the endpoints: a client gets the service's
    503 with Retry-After and Connection: close. With /ready as the readiness probe (503 while shedding), the
    only endpoint leaves and the client's connection is closed unanswered."""
    path = readiness_path()
    seen = rehearse_all_shedding(tmp_path, [path, "/ready"])
    print(json.dumps(seen, indent=2))
    assert seen[path]["endpoint"] == "UP"
    assert seen[path]["status"] == 503
    assert seen[path]["retry_after"] is not None and int(seen[path]["retry_after"]) > 0
    assert seen[path]["connection"] == "close"
    assert "above the service's limit" in seen[path]["error"]
    assert seen["/ready"]["endpoint"] == "DOWN"
    assert seen["/ready"]["status"] is None  # no answer at all: what clients got before
