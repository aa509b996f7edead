"""The command line (app/cli.py): its settings list is the reader's, its exit codes say what is wrong, and it
never prints a secret. The real model through ``check``: tests/integration/test_cli.py."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import DOWNLOADED, EXIT_CONFIG, EXIT_MODEL, main
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


# --- download --------------------------------------------------------------------------------------------


def run_download(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "app", "download", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )


def test_download_says_why_it_cannot_fetch(tmp_path: Path) -> None:
    """The real huggingface_hub: offline, and a hub that does not answer. Nothing is left that looks complete."""
    offline = run_download("--model", "intfloat/multilingual-e5-small", "--to", str(tmp_path), HF_HUB_OFFLINE="1")
    assert offline.returncode == EXIT_MODEL
    assert "HF_HUB_OFFLINE is set" in offline.stderr
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    unreachable = run_download(
        "--model", "intfloat/multilingual-e5-small", "--to", str(tmp_path), HF_HUB_OFFLINE="0", HF_ENDPOINT=endpoint
    )
    assert unreachable.returncode == EXIT_MODEL
    assert "cannot fetch intfloat/multilingual-e5-small at main (without HF_TOKEN)" in unreachable.stderr
    assert not (tmp_path / DOWNLOADED).exists()
    directory = run_download("--model", str(tmp_path), "--to", str(tmp_path / "x"))
    assert directory.returncode == EXIT_CONFIG
    assert "needs a hub model id" in directory.stderr


def test_download_fetches_once_per_model_and_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The logic around huggingface_hub's download (stubbed: no hub here): the marker is written only after a
    complete download, and a directory that holds the same model and revision is left as it is."""
    import huggingface_hub
    import huggingface_hub.constants

    fetched: list[tuple[str, str]] = []

    def snapshot_download(model: str, *, revision: str, local_dir: Path, ignore_patterns: list[str]) -> str:
        if model == "org/broken":
            (Path(local_dir) / "model.safetensors").write_bytes(b"half")
            raise OSError("connection reset in the middle")
        fetched.append((model, revision))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "config.json").write_text("{}")
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("EMBEDDING_MODEL", "org/model")
    target = tmp_path / "models" / "org" / "model"
    assert main(["download", "--to", str(target)]) == 0
    assert main(["download", "--to", str(target)]) == 0  # held: nothing fetched
    assert fetched == [("org/model", "main")]
    assert json.loads((target / DOWNLOADED).read_text())["model"] == "org/model"
    assert main(["download", "--to", str(target), "--revision", "v2"]) == 0  # another revision: fetched
    assert fetched == [("org/model", "main"), ("org/model", "v2")]
    broken = tmp_path / "models" / "org" / "broken"
    assert main(["download", "--model", "org/broken", "--to", str(broken)]) == EXIT_MODEL
    assert not (broken / DOWNLOADED).exists()  # the partial download is never taken for a complete one
