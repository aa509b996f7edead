"""The shipped dashboard: generated, valid for Grafana's own typed models, drawing what its titles say, and
reading only (and every one of) the series the service exports."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from app.config import Settings
from tests.unit.exported import exported_series, metric_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "embedding-service.json"
RULES = ROOT / "alerts" / "embedding-service.rules.yml"

NOT_SHOWN: dict[str, str] = {}
"""Exported ``embedding_`` metrics on no panel and in no alert, each with the reason (none today)."""


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def panel(title: str) -> dict[str, Any]:
    (found,) = (p for p in panels() if p["title"] == title)
    return found


def generator() -> dict[str, Any]:
    return runpy.run_path(str(ROOT / "dashboards" / "generate.py"))


def lost_in_round_trip(original: Any, parsed: Any, path: str = "$") -> list[str]:
    """Every key or value of ``original`` that did not come back from Grafana's models unchanged."""
    if isinstance(original, dict):
        if not isinstance(parsed, dict):
            return [f"{path}: became {type(parsed).__name__}"]
        lost = [f"{path}.{key}: unknown to the model" for key in original if key not in parsed]
        for key in original.keys() & parsed.keys():
            lost += lost_in_round_trip(original[key], parsed[key], f"{path}.{key}")
        return lost
    if isinstance(original, list):
        if not isinstance(parsed, list) or len(original) != len(parsed):
            return [f"{path}: list changed"]
        return [
            m
            for i, pair in enumerate(zip(original, parsed, strict=True))
            for m in lost_in_round_trip(*pair, f"{path}[{i}]")
        ]
    return [] if original == parsed else [f"{path}: {original!r} became {parsed!r}"]


def round_trip(document: dict[str, Any]) -> dict[str, Any]:
    register_default_plugins()
    parsed: dict[str, Any] = json.loads(json.dumps(Dashboard.from_json(document), cls=JSONEncoder))
    return parsed


def test_the_committed_dashboard_is_what_the_generator_writes() -> None:
    assert DASHBOARD.read_text() == generator()["render"](), "run: make dashboard"


def test_grafanas_typed_models_know_every_key_of_the_dashboard() -> None:
    lost = lost_in_round_trip(dashboard(), round_trip(dashboard()))
    assert not lost, "\n".join(lost)


def test_the_round_trip_rejects_a_key_grafana_does_not_read() -> None:
    """The old bar panels: drawStyle beside the unit, where Grafana never looks, drew lines."""
    broken = dashboard()
    bars = next(p for p in broken["panels"] if p.get("title") == "Cleanups by reason")
    bars["fieldConfig"]["defaults"]["drawStyle"] = bars["fieldConfig"]["defaults"]["custom"].pop("drawStyle")
    assert lost_in_round_trip(broken, round_trip(broken)) == [
        f"$.panels[{broken['panels'].index(bars)}].fieldConfig.defaults.drawStyle: unknown to the model"
    ]


def test_panel_ids_are_unique_and_the_variables_are_the_datasource_and_instances() -> None:
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard()["uid"] == "embedding-service"
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    # "All" must expand to the listed instances: a catch-all regex would pull other jobs' process_* series in.
    assert "allValue" not in variables["instance"]


@pytest.mark.parametrize("panel", panels(), ids=lambda p: p["title"])
def test_every_panel_has_a_title_unit_description_and_the_datasource_variable(panel: dict[str, Any]) -> None:
    assert panel["title"]
    assert panel["description"]
    assert panel["fieldConfig"]["defaults"]["unit"]
    if panel["title"] == "RSS change per batch":  # binary buckets (MiB multiples): IEC units read right
        assert panel["fieldConfig"]["defaults"]["unit"] == panel["options"]["yAxis"]["unit"] == "bytes"
    else:
        assert panel["fieldConfig"]["defaults"]["unit"] not in ("bytes", "binBps"), "bytes are SI (decbytes)"
    assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert panel["targets"]
    for target in panel["targets"]:
        assert target["datasource"]["uid"] == "${datasource}"
        assert 'instance=~"$instance"' in target["expr"]


@pytest.mark.parametrize("panel", panels(), ids=lambda p: p["title"])
def test_counts_per_interval_are_bars_of_non_overlapping_windows(panel: dict[str, Any]) -> None:
    exprs = [t["expr"] for t in panel["targets"]]
    counts = [e for e in exprs if "offset $__interval" in e]
    assert not any("increase(" in e for e in exprs), "increase over $__rate_interval counts events several times"
    if panel["type"] == "timeseries" and counts:
        assert panel["fieldConfig"]["defaults"]["custom"]["drawStyle"] == "bars"
        assert panel["interval"]
    if panel["type"] == "timeseries" and not counts:
        assert panel["fieldConfig"]["defaults"]["custom"]["drawStyle"] == "line"


@pytest.mark.parametrize("panel", [p for p in panels() if p["type"] == "stat"], ids=lambda p: p["title"])
def test_every_stat_has_explicit_thresholds(panel: dict[str, Any]) -> None:
    defaults = panel["fieldConfig"]["defaults"]
    steps = defaults["thresholds"]["steps"]
    assert steps[0]["value"] is None, "the first step is the base colour"
    assert [s["value"] for s in steps[1:]] == sorted(s["value"] for s in steps[1:])
    if panel["options"]["colorMode"] != "none":
        assert defaults["color"] == {"mode": "thresholds"}


def colours_by_level(stat_panel: dict[str, Any]) -> dict[float | None, str]:
    return {s["value"]: s["color"] for s in stat_panel["fieldConfig"]["defaults"]["thresholds"]["steps"]}


def test_memory_colours_follow_the_configured_levels_one_colour_per_level() -> None:
    defaults = Settings()
    rss = colours_by_level(panel("RSS"))
    assert set(rss) == {None, defaults.memory_elevated_bytes, defaults.memory_high_bytes}
    lines = {
        o["matcher"]["options"]: {p["id"]: p["value"] for p in o["properties"]}
        for o in panel("RSS and USS against the thresholds")["fieldConfig"]["overrides"]
    }
    assert set(lines) == {"elevated", "high", "limit", "container"}
    colours = [line["color"]["fixedColor"] for line in lines.values()]
    assert len(set(colours)) == 4
    assert all(line["custom.lineStyle"]["fill"] in ("dash", "dot") for line in lines.values())
    assert rss[defaults.memory_elevated_bytes] == lines["elevated"]["color"]["fixedColor"]
    assert rss[defaults.memory_high_bytes] == lines["high"]["color"]["fixedColor"]
    status = panel("Memory status")
    mapping = status["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert {v["text"]: v["color"] for v in mapping.values()} == {
        "normal": "green",
        "elevated": lines["elevated"]["color"]["fixedColor"],
        "high": lines["high"]["color"]["fixedColor"],
    }


def test_a_deployments_own_levels_colour_its_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDDING_MEMORY_ELEVATED_BYTES", "3GB")
    monkeypatch.setenv("EMBEDDING_MEMORY_HIGH_BYTES", "4GB")
    built = generator()["build"](Settings.from_env())
    rss = next(p for p in built["panels"] if p["title"] == "RSS")
    assert set(colours_by_level(rss)) == {None, 3_000_000_000, 4_000_000_000}


def test_panels_read_only_series_the_service_exports() -> None:
    exported = exported_series()
    used = {name for p in panels() for t in p["targets"] for name in metric_names(t["expr"])}
    assert used, "no metric found in the dashboard"
    assert used <= set(exported), f"not exported: {sorted(used - set(exported))}"


def test_the_export_check_knows_what_each_metric_type_exposes() -> None:
    exported = exported_series()
    assert "embedding_cleanups_total" in exported  # a counter's samples
    assert "embedding_cleanups" not in exported
    assert "embedding_queue_depth_total" not in exported  # a gauge has no _total
    assert "embedding_batch_size_bucket" in exported  # a histogram's series
    assert "embedding_memory_rss_bytes_sum" not in exported
    assert not any(name.endswith("_created") for name in exported)


def test_every_exported_metric_is_on_a_panel_or_in_an_alert() -> None:
    exported = {family for name, family in exported_series().items() if name.startswith("embedding_")}
    read = {name for p in panels() for t in p["targets"] for name in metric_names(t["expr"])}
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    read |= {name for r in rules for name in metric_names(r["expr"])}
    shown = {exported_series()[name] for name in read if name in exported_series()}
    assert exported - shown == set(NOT_SHOWN), f"on no panel and in no alert: {sorted(exported - shown)}"


def test_panels_that_name_an_alert_link_to_its_runbook() -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    linked = {link["url"] for p in panels() for link in p.get("links", [])}
    assert linked, "no panel links to a runbook"
    for url in linked:
        name = url.rsplit("#", 1)[1]
        (rule,) = {r["annotations"]["runbook_url"] for r in rules.values() if r["alert"].lower() == name}
        assert url == rule  # the alert exists, and the link is the very runbook_url its notifications carry


def test_per_interval_bars_count_a_restart_and_a_new_instance_exactly(tmp_path: Path) -> None:
    """promtool evaluates the dashboard's own per-interval expression: a restart inside the window and an
    instance that appears in it, every increment counted once, nothing booked twice."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: run `make system-deps` (Debian package prometheus)"
    expr = generator()["per_interval"]("embedding_cleanups_total", "reason")
    concrete = expr.replace("$instance", ".*").replace("$__interval", "1m")
    (tmp_path / "rules.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "bars", "rules": [{"record": "bars", "expr": concrete}]}]})
    )
    series = 'embedding_cleanups_total{{instance="{}", reason="periodic"}}'
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # a restarts between minutes 3 and 4; its new process ran one cleanup by minute 4
                    {"series": series.format("a:5000"), "values": "0 1 2 3 1 2"},
                    # b is first scraped at minute 3, with 5 cleanups from before: not one bar of 5
                    {"series": series.format("b:5000"), "values": "_ _ _ 5 6 7"},
                ],
                "promql_expr_test": [
                    {
                        "expr": "bars",
                        "eval_time": f"{minute}m",
                        "exp_samples": [{"labels": 'bars{reason="periodic"}', "value": value}],
                    }
                    for minute, value in ((1, 1), (2, 1), (3, 1), (4, 2), (5, 2))
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "test.yml")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
