"""The installs the ops scripts' tests start from (tests/e2e/installs.py): per module, the versions' sources and
an adopted install of 1.0.0 that each test's install hard-links."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.installs import (
    NEW,
    NEWER,
    OLD,
    SLOW_START,
    Install,
    build_source,
    first_layout,
    started_install,
    wait_until,
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sources")
    return {version: build_source(base, version) for version in (OLD, NEW, NEWER)}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Path:
    """An install of the first layout adopted as versions/NAME by a stop (which starts nothing)."""
    inst = first_layout(tmp_path_factory.mktemp("template") / "embedding-service", 0, sources)
    adopted = inst.ops("service.sh", "stop")
    assert adopted.returncode == 0, adopted.stderr
    assert "adopting the install" in adopted.stderr
    return inst.home


@pytest.fixture
def install(tmp_path: Path, template: Path, sources: dict[str, Path]) -> Iterator[Install]:
    """Version 1.0.0, started."""
    inst = started_install(tmp_path / "embedding-service", template, sources)
    yield inst
    wait_until(inst.unlocked, 300, "the ops lock")  # a detached switch may still be finishing
    inst.ops("service.sh", "stop")


@pytest.fixture
def slow_install(tmp_path: Path, template: Path, sources: dict[str, Path]) -> Iterator[Install]:
    """Version 1.0.0, started as usual; then every start of a version it hands over to (an upgrade's, a rollback's, a
    restart's, a respawned worker's) loads a model that takes longer than 30 s: the first start waits for nothing
    the test checks."""
    inst = started_install(tmp_path / "embedding-service", template, sources)
    (inst.current() / "service.env").write_text(inst.config(**SLOW_START).read_text())  # a copy, not a hard link
    yield inst
    wait_until(inst.unlocked, 300, "the ops lock")
    inst.ops("service.sh", "stop")
