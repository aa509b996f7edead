"""The drop-in on the fake backend: the routes TEI's and OpenAI's clients call, what a pipeline's odd chunks
get, the API key and CORS. With the real service and the real clients: tests/integration/test_clients.py."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from flask.testing import FlaskClient

from app import components
from app.config import ConfigError, Settings
from app.routes import EMBED_LABELS, PROBE_PATHS, TEI_PATHS, label_for, needs_api_key
from tests.doubles import FakeBackend, serving

KEY = "k" * 24
SETTINGS = Settings(model="fake", max_inputs=8, queue_size=16, max_input_chars=40, max_body_bytes=8192)


@pytest.fixture
def settings() -> Settings:
    return SETTINGS


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


def test_a_pipelines_odd_chunks_are_embedded_and_the_cut_is_counted(client: FlaskClient, backend: FakeBackend) -> None:
    long = " ".join(f"w{i}" for i in range(30))  # 109 characters: over the limit of 40
    answer = client.post("/embed", json={"inputs": ["a b", "   ", "", long], "truncate": None})
    assert answer.status_code == 200
    assert np.asarray(answer.get_json()).shape == (4, 8)
    read = {text for batch in backend.batches for text in batch}
    assert {"a b", "   ", "", long[:40]} <= read  # its first 40 characters: 13 words, within the model's 16 tokens
    assert answer.headers["x-truncated-inputs"] == "1"
    assert answer.headers["x-model-id"] == "fake/model"
    registry = components(client.application).metrics.registry
    assert registry.get_sample_value("embedding_inputs_truncated_total", {"at": "characters"}) == 1
    left = client.post("/embed", json={"inputs": [long], "truncation_direction": "left"})
    assert left.status_code == 200 and backend.batches[-1] == [long[-40:]]
    refused = client.post("/embed", json={"inputs": ["a", long], "truncate": False})
    assert (refused.status_code, refused.get_json()["error_type"]) == (422, "Validation")
    assert refused.get_json()["error"].startswith("inputs[1] has 109 characters, more than the limit of 40")


def test_texts_over_the_models_length_are_counted_as_cut_at_tokens(client: FlaskClient) -> None:
    within = " ".join("abcdefghijklmn")  # 14 words: 16 fake tokens, what the fake model reads
    over = " ".join("abcdefghijklmno")  # 15 words, 29 characters: 17 tokens, one over
    answer = client.post("/embed", json={"inputs": [within, over]})
    assert answer.headers["x-truncated-inputs"] == "1"
    registry = components(client.application).metrics.registry
    assert registry.get_sample_value("embedding_inputs_truncated_total", {"at": "tokens"}) == 1


def test_any_model_name_is_answered_by_the_served_model_and_counted(client: FlaskClient) -> None:
    answer = client.post("/v1/embeddings", json={"input": "x", "model": "text-embedding-ada-002"})
    assert answer.status_code == 200
    assert answer.get_json()["model"] == "fake/model"
    client.post("/embeddings", json={"input": "x", "model": "text-embedding-ada-002"})  # no /v1: the same route
    client.post("/embeddings", json={"input": "x", "model": "model"})  # a served name: not counted
    registry = components(client.application).metrics.registry
    assert registry.get_sample_value("embedding_model_name_mismatches_total") == 2


def test_under_the_served_policy_only_served_names_answer(backend: FakeBackend) -> None:
    settings = SETTINGS.replace(served_model_name=("text-embedding-3-small",), model_name_policy="served")
    with serving(settings, backend) as app:
        client = app.test_client()
        assert client.post("/v1/embeddings", json={"input": "x", "model": "text-embedding-3-small"}).status_code == 200
        refused = client.post("/v1/embeddings", json={"input": "x", "model": "text-embedding-ada-002"})
        assert refused.status_code == 404
        info = client.get("/info").get_json()
        assert (info["served_model_name"], info["model_name_policy"]) == ("text-embedding-3-small", "served")
        assert info["model_names"] == ["fake/model", "model", "text-embedding-3-small"]


def test_similarity_on_its_route_and_on_the_root(client: FlaskClient, backend: FakeBackend) -> None:
    body = {"inputs": {"source_sentence": "a b", "sentences": ["a b", "c", "   "]}}
    scores = client.post("/similarity", json=body).get_json()
    vectors = [backend.vector(text) for text in ("a b", "a b", "c", "   ")]
    units = [v / np.linalg.norm(v) for v in vectors]
    assert scores == pytest.approx([float(units[0] @ u) for u in units[1:]], abs=1e-6)
    assert client.post("/", json=body).get_json() == scores  # InferenceClient.sentence_similarity posts here


def test_token_vectors_and_decode(client: FlaskClient, backend: FakeBackend) -> None:
    rows = client.post("/embed_all", json={"inputs": ["a b", "c"]}).get_json()
    assert [np.asarray(row).shape for row in rows] == [(4, 8), (3, 8)]  # words + 2 special tokens each
    assert np.allclose(rows[1][2], backend.vector("c") * 3)  # the fake's token k: its vector times k + 1
    assert client.post("/decode", json={"ids": [101, 7, 102]}).get_json() == ["w7"]
    both = client.post("/decode", json={"ids": [[101, 7], [8]], "skip_special_tokens": False}).get_json()
    assert both == ["[CLS] w7", "w8"]


def test_docs_are_served_from_the_package(client: FlaskClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "cdn" not in page.get_data(as_text=True).lower()
    with client.get("/docs/swagger-ui-bundle.js") as bundle:  # a file response: closed when read
        assert bundle.status_code == 200 and b"SwaggerUIBundle" in bundle.get_data()
    assert client.get("/docs/LICENSE").status_code == 404  # only the files the page loads
    assert client.get("/api-doc/openapi.json").get_json() == client.get("/openapi.json").get_json()


@pytest.fixture
def locked(backend: FakeBackend) -> Iterator[FlaskClient]:
    settings = SETTINGS.replace(api_key=KEY, cors_origins=("https://app.example.com",))
    with serving(settings, backend) as app:
        yield app.test_client()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/", {"inputs": "x"}),
        ("/embed", {"inputs": "x"}),
        ("/embed_all", {"inputs": "x"}),
        ("/similarity", {"inputs": {"source_sentence": "x", "sentences": ["y"]}}),
        ("/v1/embeddings", {"input": "x"}),
        ("/embeddings", {"input": "x"}),
        ("/tokenize", {"inputs": "x"}),
        ("/decode", {"ids": [1]}),
    ],
)
def test_the_api_key_guards_every_route_that_reads_texts(locked: FlaskClient, path: str, body: object) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"}):
        refused = locked.post(path, json=body, headers=headers)
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert locked.post(path, json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_probes_metrics_info_and_docs_stay_open(locked: FlaskClient) -> None:
    for path in ("/", "/health", "/ping", "/live", "/ready", "/metrics", "/info", "/docs", "/openapi.json"):
        assert locked.get(path).status_code == 200, path


def test_cors_answers_only_the_configured_origins(locked: FlaskClient, client: FlaskClient) -> None:
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    allowed = locked.options("/embed", headers=preflight)
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Authorization" in allowed.headers["Access-Control-Allow-Headers"]
    assert "Origin" in allowed.headers["Vary"]
    other = locked.options("/embed", headers={**preflight, "Origin": "https://other.example.com"})
    assert "Access-Control-Allow-Origin" not in other.headers
    assert "Access-Control-Allow-Origin" not in client.options("/embed", headers=preflight).headers  # off by default


def test_the_settings_refuse_a_weak_key_and_a_malformed_origin() -> None:
    with pytest.raises(ConfigError, match="EMBEDDING_API_KEY"):
        Settings.from_env({"EMBEDDING_API_KEY": "short"})
    with pytest.raises(ConfigError, match="EMBEDDING_CORS_ORIGINS"):
        Settings.from_env({"EMBEDDING_CORS_ORIGINS": "app.example.com"})
    with pytest.raises(ConfigError, match="EMBEDDING_MODEL_NAME_POLICY"):
        Settings.from_env({"EMBEDDING_MODEL_NAME_POLICY": "strict"})
    names = Settings.from_env({"EMBEDDING_SERVED_MODEL_NAME": "a, b"}).served_model_name
    assert names == ("a", "b")


def test_the_route_registry_derives_each_set() -> None:
    assert EMBED_LABELS == ("/", "/embed", "/embed_all", "/similarity", "/v1/embeddings", "/embeddings")
    assert {"/", "/embed", "/tokenize", "/health", "/decode"} <= TEI_PATHS and "/v1/embeddings" not in TEI_PATHS
    assert "/" not in PROBE_PATHS  # POST / is an embedding request: it waits with them
    assert (label_for("GET", "/"), label_for("POST", "/"), label_for("HEAD", "/")) == ("GET /", "/", "GET /")
    assert needs_api_key("POST", "/") and not needs_api_key("GET", "/") and not needs_api_key("OPTIONS", "/embed")


def test_token_vectors_are_held_in_the_budget_by_each_texts_tokens(backend: FakeBackend) -> None:
    """An /embed_all answer is hundreds of times its request: the budget holds it by what the model reads of each
    text (16 tokens at most here), so many long texts are refused at once and as many short ones answered."""
    budget = 4_000_000  # the fake model's width 768: a text of 16 tokens holds 16 x 768 x 72 = 885 KB of answer
    with serving(SETTINGS.replace(memory_budget_bytes=budget), backend) as app:
        client = app.test_client()
        long = " ".join(f"w{i}" for i in range(12))
        refused = client.post("/embed_all", json={"inputs": [long] * 6})
        assert refused.status_code == 413
        assert "more than the service's whole budget" in refused.get_json()["error"]
        assert client.post("/embed_all", json={"inputs": ["a"] * 8}).status_code == 200  # 7 tokens each at most
        assert client.post("/embed_all", json={"inputs": [long] * 2}).status_code == 200
        assert client.post("/embed", json={"inputs": [long] * 8}).status_code == 200  # one vector a text: small
