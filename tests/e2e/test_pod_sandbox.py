"""The pod's sandbox rehearsed (loadtest/kubernetes.py PodSandbox): the rendered Deployment's containers run in
bubblewrap as the pod runs them, as uid 10001 with no capability on a read-only root, with only the Deployment's
volumes writable, the image's entrypoint and environment and the manifest's args, settings and env."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests

from app.backend import resolve_model
from app.cli import DOWNLOADED
from loadtest.kubernetes import PodSandbox, empty_dir, render
from loadtest.service import BUNDLED_MODEL

pytestmark = pytest.mark.slow

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
"""The bundled model's hub id: what an overlay would name with the model-download component."""
REFUSED_WRITES = ("Read-only file system", "Permission denied")


def startup_path(objects: list[dict[str, object]]) -> str:
    (deployment,) = (o for o in objects if o["kind"] == "Deployment")
    (main,) = deployment["spec"]["template"]["spec"]["containers"]  # type: ignore[index]
    return str(main["startupProbe"]["httpGet"]["path"])


def embeds(pod: PodSandbox, model: str | None = None) -> int:
    body = {"input": ["a text embedded inside the pod's sandbox"], **({"model": model} if model else {})}
    answer = requests.post(f"{pod.url}/v1/embeddings", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    return len(answer.json()["data"][0]["embedding"])


def test_the_service_runs_in_the_pods_sandbox(tmp_path: Path) -> None:
    objects = render([])
    tmp = empty_dir(tmp_path / "volumes" / "tmp")
    pod = PodSandbox(objects, "embedding-service", {"tmp": tmp}, tmp_path / "pod.log").start()
    try:
        pod.wait_ready(path=startup_path(objects))
        assert embeds(pod) == 384
        processes = pod.processes()
        print(json.dumps(processes, indent=2))
        assert processes and all(p["uid"] == [10001, 10001] and 10001 in p["gids"] for p in processes)
        written = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*"))
        print("written to the tmp emptyDir:", written)
        assert any("unclean" in name or "run" in name for name in written), written  # the run record is there
    finally:
        code = pod.terminate()
    log = pod.log_text()
    assert code == 0, log[-3000:]
    assert not [line for line in log.splitlines() if any(refused in line for refused in REFUSED_WRITES)]


def test_a_model_from_the_download_volume(tmp_path: Path) -> None:
    """With components/model-download: what the init container leaves in the `models` emptyDir (no hub here: the
    bundled model's files and the download's marker, as `embedding-service download` writes them) is served
    from the read-only mount, under the hub id too; the init container, run again, fetches nothing."""
    objects = render(["model-download"], {"EMBEDDING_MODEL": HUB_ID})
    volumes = {"models": empty_dir(tmp_path / "volumes" / "models"), "tmp": empty_dir(tmp_path / "volumes" / "tmp")}
    downloaded = volumes["models"] / HUB_ID
    shutil.copytree(resolve_model(BUNDLED_MODEL).location, downloaded)
    (downloaded / DOWNLOADED).write_text(json.dumps({"model": HUB_ID, "revision": "main", "commit": None}))
    before = sorted((f.relative_to(downloaded), f.stat().st_mtime_ns) for f in downloaded.rglob("*"))

    init = PodSandbox(objects, "model-download", volumes, tmp_path / "init.log")
    assert init.run() == 0, init.log_text()
    assert "already holds" in init.log_text()

    pod = PodSandbox(objects, "embedding-service", volumes, tmp_path / "pod.log").start()
    try:
        pod.wait_ready(path=startup_path(objects))
        assert embeds(pod, model=HUB_ID) == 384
        info = requests.get(f"{pod.url}/info", timeout=10).json()
        print(json.dumps(info, indent=2)[:1500])
    finally:
        code = pod.terminate()
    assert code == 0, pod.log_text()[-3000:]
    assert sorted((f.relative_to(downloaded), f.stat().st_mtime_ns) for f in downloaded.rglob("*")) == before


def test_without_the_component_a_hub_model_stops_the_pod_with_a_clear_message(tmp_path: Path) -> None:
    """What the README used to suggest: another model in the settings, no component. The image is offline, so the
    container exits (Kubernetes restarts it, a crash loop) and says why."""
    objects = render([], {"EMBEDDING_MODEL": HUB_ID})
    pod = PodSandbox(objects, "embedding-service", {"tmp": empty_dir(tmp_path / "tmp")}, tmp_path / "pod.log")
    code = pod.start().wait_exit(120)
    log = pod.log_text()
    print(log[-1500:])
    assert code != 0
    assert f"cannot load model '{HUB_ID}'" in log
    assert "components/model-download" in log  # what to do about it
