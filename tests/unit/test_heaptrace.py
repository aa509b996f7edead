"""The heap growth snapshot: what it names, one at a time, tracing only for the window; the route's gates.

With the real service and a real leak: tests/integration/test_leak.py."""

from __future__ import annotations

import re
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.config import ConfigError, Settings
from app.errors import Conflict
from app.heaptrace import HeapTracer, short_path
from tests.doubles import FakeBackend, serving

TOKEN = "s3cret"
DEBUG = Settings(model="fake", debug_endpoints=True, admin_token=TOKEN)


def grow(kept: list[bytes], stop: threading.Event) -> None:
    while not stop.is_set():
        kept.append(bytes(100_000))  # the growth
        time.sleep(0.01)


GROWTH_LINE = next(
    n for n, line in enumerate(Path(__file__).read_text().splitlines(), 1) if line.endswith("# the growth")
)


def test_the_top_site_is_the_line_that_kept_allocating() -> None:
    kept: list[bytes] = []
    stop = threading.Event()
    grower = threading.Thread(target=grow, args=(kept, stop))
    grower.start()
    try:
        answer = HeapTracer().growth(seconds=0.5, top=5)
    finally:
        stop.set()
        grower.join()
    top = answer.sites[0]
    assert (top.file, top.line) == ("tests/unit/test_heaptrace.py", GROWTH_LINE)
    assert top.traceback[0] == f"tests/unit/test_heaptrace.py:{GROWTH_LINE}"
    assert top.size_bytes >= 10 * 100_000
    assert len(answer.sites) <= 5
    assert answer.started_tracing
    assert not tracemalloc.is_tracing()  # stopped after the window


def test_tracing_already_on_is_left_on() -> None:
    tracemalloc.start()
    try:
        answer = HeapTracer().growth(seconds=0.05, top=3)
        assert not answer.started_tracing
        assert tracemalloc.is_tracing()
    finally:
        tracemalloc.stop()


def test_one_snapshot_at_a_time_and_stop_ends_the_window() -> None:
    tracer = HeapTracer()
    answers: list[Any] = []
    first = threading.Thread(target=lambda: answers.append(tracer.growth(seconds=60, top=1)))
    first.start()
    while not tracemalloc.is_tracing():
        time.sleep(0.005)
    with pytest.raises(Conflict, match="one at a time"):
        tracer.growth(seconds=1, top=1)
    tracer.stop()  # what shutdown does: the 60 s window ends now
    first.join(10)
    assert not first.is_alive()
    assert answers[0].seconds < 10


def test_short_path_drops_the_import_path_entry() -> None:
    assert short_path(tracemalloc.__file__) == "tracemalloc.py"
    assert short_path("/nowhere/x.py") == "/nowhere/x.py"


def test_debug_endpoints_need_an_admin_token() -> None:
    with pytest.raises(ConfigError, match="EMBEDDING_DEBUG_ENDPOINTS"):
        Settings(debug_endpoints=True)
    assert Settings.from_env({"EMBEDDING_DEBUG_ENDPOINTS": "true", "EMBEDDING_ADMIN_TOKEN": "t"}).debug_endpoints
    assert not Settings.from_env({}).debug_endpoints


@pytest.fixture
def debug_app() -> Iterator[Flask]:
    with serving(DEBUG, FakeBackend()) as app:
        yield app


@pytest.fixture
def client(debug_app: Flask) -> FlaskClient:
    return debug_app.test_client()


def test_the_snapshot_answers_what_the_openapi_document_says(client: FlaskClient) -> None:
    response = client.post("/debug/memory/snapshot?seconds=1&top=3", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    document = client.get("/openapi.json").get_json()
    schema = document["paths"]["/debug/memory/snapshot"]["post"]["responses"]["200"]["content"]["application/json"]
    jsonschema_rs.Draft202012Validator({**schema["schema"], "components": document["components"]}).validate(
        response.get_json()
    )


@pytest.mark.parametrize(
    ("query", "headers", "status"),
    [
        ("seconds=1", {}, 401),
        ("seconds=1", {"Authorization": "Bearer wrong"}, 401),
        ("seconds=1", {"Authorization": f"Bearer {TOKEN}", "Origin": "https://example.com"}, 403),
        ("seconds=0", {"Authorization": f"Bearer {TOKEN}"}, 400),
        ("seconds=121", {"Authorization": f"Bearer {TOKEN}"}, 400),
        ("seconds=1&top=x", {"Authorization": f"Bearer {TOKEN}"}, 400),
    ],
)
def test_the_snapshot_refuses(client: FlaskClient, query: str, headers: dict[str, str], status: int) -> None:
    response = client.post(f"/debug/memory/snapshot?{query}", headers=headers)
    assert response.status_code == status
    assert response.get_json()["error"]["code"] == status


def test_disabled_the_route_is_404_and_undocumented() -> None:
    with serving(Settings(model="fake", admin_token=TOKEN), FakeBackend()) as app:
        client = app.test_client()
        response = client.post("/debug/memory/snapshot?seconds=1", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 404
        assert "/debug/memory/snapshot" not in client.get("/openapi.json").get_json()["paths"]


def test_enabled_the_document_lists_every_route(client: FlaskClient, debug_app: Flask) -> None:
    served = {
        re.sub(r"<(\w+)>", r"{\1}", rule.rule) for rule in debug_app.url_map.iter_rules() if rule.endpoint != "static"
    }
    assert set(client.get("/openapi.json").get_json()["paths"]) == served
