"""Upgrades that fail: a version that does not become ready, a copy, install or switch that fails, a wheel from
elsewhere or with another hash, and a version of the service's old distribution name; the running version keeps
serving and a rollback never goes to what failed."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import requests

from loadtest.service import free_port
from tests.e2e.installs import (
    NEW,
    NEWER,
    OLD,
    Install,
    build_source,
    build_wheel,
    fingerprint,
    first_layout,
    strangers_wheel,
)

pytestmark = pytest.mark.slow


def test_a_broken_version_is_switched_back_and_rollback_never_goes_to_it(install: Install) -> None:
    old = install.current()
    good_config = (old / "service.env").read_text()
    result = install.ops(
        "upgrade.sh",
        "--source",
        str(install.sources[NEWER]),
        "--config",
        str(install.config(EMBEDDING_MODEL="/nonexistent/model")),
    )
    assert result.returncode == 1, result.stderr
    assert "did not become ready" in result.stderr
    assert f"switched back, versions/{old.name} serves again" in result.stderr
    assert "does not exist" in (install.home / "logs" / "service.log").read_text()
    assert install.version() == OLD
    assert install.embeds()
    assert install.current() == old
    assert (install.home / "current" / "service.env").read_text() == good_config
    (broken, _, health), (kept, _, kept_health) = install.versions()
    assert broken.endswith(f"-{NEWER}") and health == "failed"
    assert kept == old.name and kept_health == "good current running"
    nothing_older = install.ops("rollback.sh")
    assert nothing_older.returncode == 2
    assert f"no good version older than {old.name}" in nothing_older.stderr

    # The new version asks clients for an API key: the scripts check it with the key of its settings.
    keyed = install.config(EMBEDDING_API_KEY="upgrade-test-key")
    upgraded = install.ops("upgrade.sh", "--source", str(install.sources[NEW]), "--config", str(keyed))
    assert upgraded.returncode == 0, upgraded.stderr
    new = install.current()
    assert requests.post(f"{install.url}/embed", json={"inputs": "x"}, timeout=60).status_code == 401
    key = {"Authorization": "Bearer upgrade-test-key"}
    assert requests.post(f"{install.url}/embed", json={"inputs": "x"}, headers=key, timeout=60).status_code == 200
    result = install.ops("rollback.sh")  # past the failed 1.2.0 build, to the 1.0.0 that served
    assert result.returncode == 0, result.stderr
    assert install.version() == OLD and install.current() == old
    assert install.embeds()
    assert [health for *_, health in install.versions()] == ["good", "failed", "good current running"]
    undo = install.ops("rollback.sh", new.name)  # a rollback is undone by naming what it left
    assert undo.returncode == 0, undo.stderr
    assert install.version() == NEW
    assert install.ops("rollback.sh", "no-such-version").returncode == 2
    assert install.ops("rollback.sh", new.name).returncode == 2  # already current


def test_a_failed_copy_install_or_switch_stops_the_upgrade_and_leaves_the_running_version_untouched(
    install: Install, tmp_path: Path
) -> None:
    """Each step failing in turn. A full disk at the copy and at the switch comes from a stand-in for `cp` and
    `ln` that fails on those arguments and passes others on (root ignores permissions); pip fails for real."""
    old = install.current()
    before = fingerprint(old)
    path = os.environ["PATH"]
    full_disk = {}
    for tool, fails_on in (("cp", "-al"), ("ln", "current.new")):
        shim = tmp_path / f"full-disk-{tool}" / tool
        shim.parent.mkdir()
        shim.write_text(
            f'#!/bin/sh\ncase "$*" in *{fails_on}*) echo "{tool}: No space left on device" >&2; exit 1 ;; esac\n'
            f'exec {shutil.which(tool)} "$@"\n'
        )
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
        full_disk[tool] = f"{shim.parent}:{path}"
    broken = build_source(tmp_path, "9.9.9")
    (broken / "pyproject.toml").write_text("[project]\nname = 'plateau-embeddings'\nversion = \n")
    attempts = [
        ("the copy failed", install.sources[NEW], full_disk["cp"]),
        ("pip failed", broken, path),
        ("could not switch", install.sources[NEW], full_disk["ln"]),
    ]
    for message, source, search_path in attempts:
        result = install.ops("upgrade.sh", "--force", "--source", str(source), PATH=search_path)  # we embed
        assert result.returncode == 1, result.stderr
        assert message in result.stderr
        assert search_path == path or "No space left on device" in result.stderr
        assert install.current() == old and fingerprint(old) == before
        assert install.version() == OLD and install.embeds()
        assert not list((install.home / "versions").glob(".building-*"))
    assert "stopping pid" not in install.log()  # never restarted


def test_a_wheel_is_installed_only_from_where_the_command_says_and_with_its_hash(
    install: Install, tmp_path: Path
) -> None:
    """The package index holds someone else's ``embedding-service``; a same-named package can sit on any index a
    machine's pip is configured with. Here a second index (PIP_FIND_LINKS, as a pip.conf would give it) holds a
    stranger's ``plateau-embeddings`` of the very version asked for: the upgrade takes the operator's wheel and
    never the stranger's, and refuses a wheel whose hash is not the one given."""
    ours, digest = build_wheel(install.sources[NEW], tmp_path / "ours")
    elsewhere = tmp_path / "elsewhere"
    strangers_wheel(elsewhere, NEW)
    strangers_wheel(elsewhere, "9.9.9")
    configured = {"PIP_FIND_LINKS": str(elsewhere), "PIP_INDEX_URL": elsewhere.as_uri()}
    old = install.current()

    usage = install.ops("upgrade.sh", "--version", NEW, "--sha256", digest, **configured)
    assert usage.returncode == 2 and "--find-links DIR or --index-url URL" in usage.stderr
    assert install.ops("upgrade.sh", "--wheel", str(ours), **configured).returncode == 2  # no hash, no install
    for args, message in (
        (["--version", "9.9.9", "--find-links", str(ours.parent), "--sha256", digest], "cannot download"),
        (["--wheel", str(ours), "--sha256", "0" * 64], f"has SHA-256 {digest}, not the {'0' * 64} given"),
        (["--wheel", str(elsewhere / f"plateau_embeddings-{NEW}-py3-none-any.whl"), "--sha256", digest], "not the"),
    ):
        refused = install.ops("upgrade.sh", *args, **configured)
        assert refused.returncode == 1, refused.stderr
        assert message in refused.stderr
        assert install.current() == old and install.version() == OLD
    assert "stopping pid" not in install.log()  # nothing was ever switched

    upgraded = install.ops(
        "upgrade.sh", "--version", NEW, "--find-links", str(ours.parent), "--sha256", digest, **configured
    )
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"installing {ours.name} (SHA-256 verified)" in upgraded.stderr
    assert install.version() == NEW and install.embeds()  # the stranger's app would not even import


def test_a_version_of_the_old_distribution_name_upgrades_to_the_new_one(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    """Installs from before the service had a distribution name of its own carry ``embedding-service``: the
    upgrade removes it from the new version's copy (both would own ``app/``) and the old version keeps its own."""
    legacy = build_source(tmp_path / "legacy", OLD)
    pyproject = legacy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('name = "plateau-embeddings"', 'name = "embedding-service"', 1))
    version_py = legacy / "app" / "version.py"  # its code knew itself by that name too
    version_py.write_text(
        version_py.read_text().replace('DISTRIBUTION = "plateau-embeddings"', 'DISTRIBUTION = "embedding-service"')
    )
    install = first_layout(tmp_path / "embedding-service", free_port(), {**sources, OLD: legacy})
    try:
        assert install.ops("service.sh", "start").returncode == 0
        assert install.versions()[0][1] == f"version {OLD}"  # read from the old name
        old = install.current()
        upgraded = install.ops("upgrade.sh", "--source", str(sources[NEW]))
        assert upgraded.returncode == 0, upgraded.stderr
        assert install.version() == NEW and install.embeds()
        new = install.current()
        names = [p.name.split("-")[0] for p in (new / "venv").glob("lib/python*/site-packages/*.dist-info")]
        assert "plateau_embeddings" in names and "embedding_service" not in names
        assert list(old.glob("venv/lib/python*/site-packages/embedding_service-*.dist-info"))  # untouched
        assert install.ops("rollback.sh").returncode == 0  # back to the old name's version, which still starts
        assert install.version() == OLD and install.embeds()
    finally:
        install.ops("service.sh", "stop")
