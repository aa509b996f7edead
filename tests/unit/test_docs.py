"""docs/architecture.md names every metric and every log event the code has: the design cannot rot silently."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.metrics_core import Metric

from app.config import markdown_table
from app.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()
README = (ROOT / "README.md").read_text()


def exposed_name(family: Metric) -> str:
    return f"{family.name}_total" if family.type == "counter" else family.name


def test_every_metric_of_the_service_is_in_the_catalogue() -> None:
    ours = {exposed_name(f) for f in Metrics().registry.collect() if f.name.startswith("embedding_")}
    catalogued = set(re.findall(r"^\| `(embedding_\w+)` \|", ARCHITECTURE, re.MULTILINE))
    assert ours == catalogued


LOG_CALL = r'\b(?:log\.(?:info|warning|error|critical|debug|exception)|emit)\(\s*"([a-z_]+\.[a-z_]+)"'
"""A log call of the service's and its event's name (every level: `engine.crashed` is critical)."""


def test_every_log_event_of_the_code_is_documented() -> None:
    emitted = {match for path in (ROOT / "app").glob("*.py") for match in re.findall(LOG_CALL, path.read_text())}
    assert len(emitted) > 15  # the pattern still finds the calls
    undocumented = {event for event in emitted if f"`{event}`" not in ARCHITECTURE}
    assert not undocumented


def test_the_readmes_configuration_table_is_the_codes() -> None:
    """Generated from app/config.py (`make readme`): a setting added, renamed or given another default without
    the README following fails here."""
    found = re.search(r"<!-- settings: generated[^\n]*\n(.*?)<!-- settings: end -->", README, re.S)
    assert found is not None, "the README lost its configuration table's markers"
    assert found.group(1) == markdown_table(), "run `make readme`"
