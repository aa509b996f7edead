"""The command line (app/cli.py): its settings list is the reader's, its exit codes say what is wrong, and it
never prints a secret. The real model through ``check``: tests/integration/test_cli.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from app.cli import EXIT_CONFIG, EXIT_MODEL, main
from app.config import HELP, Settings, reference, setting_variables


def test_settings_lists_every_variable_the_service_reads_with_its_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(HELP) == {field.name for field in dataclasses.fields(Settings)}
    assert main(["settings"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("EMBEDDING_")}
    assert listed == setting_variables()
    docs = {doc.variable: doc for doc in reference()}
    assert (docs["EMBEDDING_MAX_BODY_BYTES"].default, docs["EMBEDDING_MEMORY_HIGH_BYTES"].default) == ("16MiB", "2.5GB")
    assert docs["EMBEDDING_DEVICE"].form == "one of auto, cpu, cuda, mps"


def test_settings_shows_what_is_set_here_but_never_a_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBEDDING_API_KEY", "a-secret-key-0123456789")
    monkeypatch.setenv("EMBEDDING_PORT", "8080")
    assert main(["settings", "--json"]) == 0
    listed = {entry["variable"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert listed["EMBEDDING_PORT"]["set"] == "8080"
    assert listed["EMBEDDING_API_KEY"]["set"] == "(set)"
    assert listed["EMBEDDING_MODEL"]["set"] is None
    main(["settings"])
    assert "a-secret-key" not in capsys.readouterr().out


def test_check_exits_2_for_a_setting_and_3_for_a_model(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBEDDING_MAX_BODY_BYTES", "lots")
    assert main(["check", "--json"]) == EXIT_CONFIG
    report = json.loads(capsys.readouterr().out)
    assert report == {
        "ok": False,
        "error": "configuration error: EMBEDDING_MAX_BODY_BYTES='lots': expected a byte size such as 16MiB",
    }
    monkeypatch.delenv("EMBEDDING_MAX_BODY_BYTES")
    assert main(["check", "--json", "--model", "/no/such/model"]) == EXIT_MODEL
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and "does not exist" in report["error"]
    assert report["limits"]["max_body_bytes"] == "16MiB"  # what would run, as far as it got


def test_serve_refuses_a_bad_setting_before_it_starts_anything(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBEDDING_DTYPE", "int4")
    assert main(["serve", "--bind", "127.0.0.1:1"]) == EXIT_CONFIG
    assert "EMBEDDING_DTYPE: expected one of auto, float32, bfloat16, float16" in capsys.readouterr().err


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], check=False, capture_output=True, text=True, timeout=60)


def test_python_m_app_is_the_same_command_with_help_on_each_command() -> None:
    for args in (["--help"], ["serve", "--help"], ["check", "--help"], ["settings", "--help"]):
        shown = run_module(*args)
        assert shown.returncode == 0 and shown.stdout.startswith("usage: embedding-service"), args
    assert run_module("--version").stdout.startswith("embedding-service ")
    wrong = run_module("settings", "--bind", "x")
    assert wrong.returncode == 2 and "unrecognized arguments: --bind x" in wrong.stderr
