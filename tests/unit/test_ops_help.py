"""The ops scripts explain themselves: --help on stdout with exit 0; a bad option is a one-line usage, exit 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

OPS = Path(__file__).resolve().parents[2] / "ops"
SCRIPTS = {"service.sh": "bogus", "upgrade.sh": "--bogus", "rollback.sh": "--bogus"}


def run(script: str, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "EMBEDDING_HOME": str(home)}
    return subprocess.run(["bash", str(OPS / script), *args], env=env, capture_output=True, text=True, check=False)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_help_lists_usage_exit_codes_and_environment(script: str, tmp_path: Path) -> None:
    result = run(script, "--help", home=tmp_path)
    assert result.returncode == 0
    assert f"ops/{script}" in result.stdout
    assert "Exit codes" in result.stdout or "exit 0" in result.stdout
    for variable in ("EMBEDDING_HOME", "LOCK_WAIT_S", "STOP_TIMEOUT_S", "READY_TIMEOUT_S"):
        assert variable in result.stdout
    assert not result.stdout.startswith("#!") and "set -euo" not in result.stdout
    assert not list(tmp_path.iterdir())  # asking for help changes nothing


@pytest.mark.parametrize(("script", "bad"), list(SCRIPTS.items()))
def test_a_bad_option_is_a_usage_line_and_exit_2(script: str, bad: str, tmp_path: Path) -> None:
    result = run(script, bad, home=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith(f"usage: {OPS / script}")
    assert "--help" in result.stderr
