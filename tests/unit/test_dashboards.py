"""The shipped dashboard uses only metrics the service exports, and is well formed (alert rules: test_alert_rules)."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from app.engine import Engine
from app.memory import MemoryManager
from app.metrics import Metrics
from app.testing import FakeBackend

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "embedding-service.json"
METRIC = re.compile(r"\b((?:embedding|process|python)_[a-z0-9_]+)\b")


def exported_names() -> set[str]:
    """Every sample name the service's registry exposes, after the memory manager registered its series."""
    metrics = Metrics()
    engine = Engine(FakeBackend(), batch_size=4, queue_size=8, metrics=metrics, rss_sampler=lambda: 0)
    MemoryManager(Settings(model="fake"), metrics=metrics, engine=engine, cgroup_limit=lambda: None)
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    # Histograms and counters expose these even before their first observation.
    names.update(f"{n}{suffix}" for n in list(names) for suffix in ("_bucket", "_sum", "_count", "_total"))
    return names


def panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def test_the_committed_dashboard_is_what_the_generator_writes() -> None:
    generator = runpy.run_path(str(ROOT / "dashboards" / "generate.py"))
    assert DASHBOARD.read_text() == generator["render"](), "run: python dashboards/generate.py"


def test_panel_ids_are_unique_and_the_uid_is_stable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "embedding-service"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("panel", panels(), ids=lambda p: p["title"])
def test_every_panel_has_a_title_unit_description_and_the_datasource_variable(panel: dict[str, Any]) -> None:
    assert panel["title"]
    assert panel["description"]
    assert panel["fieldConfig"]["defaults"]["unit"]
    assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert panel["targets"]
    for target in panel["targets"]:
        assert target["datasource"]["uid"] == "${datasource}"
        assert 'instance=~"$instance"' in target["expr"]


def test_panels_use_only_metrics_the_service_exports() -> None:
    exported = exported_names()
    used = {name for p in panels() for t in p["targets"] for name in METRIC.findall(t["expr"])}
    assert used, "no metric found in the dashboard"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    for needed in (
        "embedding_memory_rss_bytes",
        "embedding_cleanups_total",
        "embedding_batch_memory_delta_bytes_bucket",
    ):
        assert needed in used
