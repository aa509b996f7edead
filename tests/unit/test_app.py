from __future__ import annotations

import base64
import re
import time
from typing import Any

import jsonschema_rs
import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import components
from app.backend import INPUT_TYPES
from app.config import Settings
from app.reasons import CleanupRecord
from app.routes import ROUTES
from app.schemas import (
    ActivityResponse,
    DecodeResponse,
    EmbedAllResponse,
    EmbedRequest,
    EmbedResponse,
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    MemoryResponse,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    ReadyResponse,
    SimilarityResponse,
    TeiErrorResponse,
    TokenizeResponse,
)
from app.service import Service
from tests.doubles import QUIET_HEAP, FakeBackend, serving

SETTINGS = Settings(model="fake", max_inputs=4, queue_size=16, max_body_bytes=2048)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(prompts={"query": "query: ", "passage": "passage: "})


@pytest.fixture
def settings() -> Settings:
    return SETTINGS


def test_input_type_adds_the_model_prefix(client: FlaskClient, backend: FakeBackend) -> None:
    client.post("/embed", json={"inputs": ["find me"], "input_type": "query"})
    client.post("/embed", json={"inputs": ["a document"], "input_type": "passage"})
    client.post("/embed", json={"inputs": ["as is"]})
    assert backend.batches[-3:] == [["query: find me"], ["passage: a document"], ["as is"]]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("get", "/nowhere", {}, 404),
        ("get", "/v1/embeddings", {}, 405),
        (
            "post",
            "/v1/embeddings",
            {"data": b'{"input": "' + b"x" * 3000 + b'"}', "content_type": "application/json"},
            413,
        ),
        ("post", "/v1/embeddings", {"data": b"{bad", "content_type": "application/json"}, 400),
        ("post", "/v1/embeddings", {"json": {"input": []}}, 422),
    ],
)
def test_every_error_is_a_json_error_body(
    client: FlaskClient, method: str, path: str, kwargs: dict[str, bytes], status: int
) -> None:
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status
    error = response.get_json()["error"]
    assert error["code"] == status
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "error_type"),
    [
        ("get", "/embed", {}, 405, "Validation"),
        (
            "post",
            "/embed",
            {"data": b'{"inputs": "' + b"x" * 3000 + b'"}', "content_type": "application/json"},
            413,
            "Validation",
        ),
        ("post", "/embed", {"data": b"{bad", "content_type": "application/json"}, 400, "Validation"),
        ("post", "/", {"json": {"inputs": []}}, 400, "Empty"),
        ("post", "/tokenize", {"json": {"inputs": 3}}, 422, "Validation"),
    ],
)
def test_errors_on_text_embeddings_inference_routes_have_its_body(
    client: FlaskClient, method: str, path: str, kwargs: dict[str, bytes], *, status: int, error_type: str
) -> None:
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status
    body = response.get_json()
    assert set(body) == {"error", "error_type"}
    assert isinstance(body["error"], str) and body["error"]
    assert body["error_type"] == error_type


def test_a_request_id_is_echoed_or_generated(client: FlaskClient) -> None:
    assert client.get("/health", headers={"X-Request-ID": "trace-42"}).headers["X-Request-ID"] == "trace-42"
    generated = client.get("/health").headers["X-Request-ID"]
    assert len(generated) == 32
    assert client.get("/health", headers={"X-Request-ID": "bad id; drop"}).headers["X-Request-ID"] != "bad id; drop"


def test_requests_are_counted_by_route_and_code(client: FlaskClient, app: Flask) -> None:
    client.post("/embed", json={"inputs": "x"})
    client.post("/embed", json={"inputs": []})
    registry = components(app).metrics.registry
    assert registry.get_sample_value("embedding_requests_total", {"route": "/embed", "code": "200"}) == 1
    assert registry.get_sample_value("embedding_requests_total", {"route": "/embed", "code": "400"}) == 1
    assert registry.get_sample_value("embedding_request_duration_seconds_count", {"route": "/embed"}) == 2


def test_not_ready_until_the_model_is_loaded() -> None:
    backend = FakeBackend()
    backend.gate.clear()  # the warm-up batch waits here
    with serving(SETTINGS, backend, wait=False) as app:
        client = app.test_client()
        assert client.get("/live").status_code == 200  # the process serves: not to be restarted for loading
        for health in ("/health", "/", "/ping"):  # TEI's health answers (InferenceClient.health_check reads it)
            unhealthy = client.get(health)
            assert unhealthy.status_code == 503
            assert unhealthy.get_json() == {"error": "unhealthy: loading", "error_type": "Unhealthy"}
        assert client.get("/info").status_code == 503  # no null fields for want of the model: no answer until then
        response = client.get("/ready")
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
        assert client.post("/embed", json={"inputs": "x"}).status_code == 503
        backend.gate.set()
        deadline = time.monotonic() + 5
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert client.post("/embed", json={"inputs": "x"}).status_code == 200
        health = (client.get("/health"), client.get("/ping"), client.get("/"))
        assert [answer.status_code for answer in health] == [200] * 3


def test_the_openapi_document_describes_every_route(client: FlaskClient, app: Flask) -> None:
    document = client.get("/openapi.json").get_json()
    assert document["openapi"].startswith("3.1")
    served = {_openapi_path(rule.rule) for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    assert set(document["paths"]) == served


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(\w+)>", r"{\1}", rule)


def test_the_route_registry_is_what_the_app_serves(app: Flask) -> None:
    """app/routes.py is where the error shapes, the probe pool, the API key, the metrics' labels and the alerts'
    route selectors come from: every route served is in it, with its method and handler, and nothing else."""
    served = {
        (method, rule.rule, rule.endpoint)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    registered = {(route.method, route.path, route.endpoint) for route in ROUTES if not route.path.startswith("/debug")}
    assert served == registered


ANSWERS: list[tuple[str, str, dict[str, Any], int, type[Any]]] = [
    ("post", "/embed", {"json": {"inputs": ["a", "b"], "dimensions": 4, "normalize": False}}, 200, EmbedResponse),
    ("post", "/v1/embeddings", {"json": {"input": "a", "model": "fake/model"}}, 200, OpenAIEmbeddingResponse),
    ("post", "/v1/embeddings", {"json": {"input": ["a"], "encoding_format": "base64"}}, 200, OpenAIEmbeddingResponse),
    (
        "post",
        "/v1/embeddings",
        {"json": {"input": "a", "model": "text-embedding-ada-002"}},
        200,
        OpenAIEmbeddingResponse,
    ),
    ("post", "/embeddings", {"json": {"input": ["a", " "], "user": None}}, 200, OpenAIEmbeddingResponse),
    ("post", "/embed_all", {"json": {"inputs": ["a b", "c"]}}, 200, EmbedAllResponse),
    (
        "post",
        "/similarity",
        {"json": {"inputs": {"source_sentence": "a", "sentences": ["b"]}}},
        200,
        SimilarityResponse,
    ),
    ("post", "/", {"json": {"inputs": {"source_sentence": "a", "sentences": ["b", "c"]}}}, 200, SimilarityResponse),
    ("post", "/decode", {"json": {"ids": [[101, 1000, 102]]}}, 200, DecodeResponse),
    ("post", "/decode", {"json": {"ids": []}}, 400, TeiErrorResponse),
    ("post", "/similarity", {"json": {"inputs": {"source_sentence": "a", "sentences": []}}}, 400, TeiErrorResponse),
    (
        "post",
        "/",
        {"json": {"inputs": "a", "prompt_name": "query", "truncation_direction": "left"}},
        200,
        EmbedResponse,
    ),
    ("post", "/embed", {"json": {"inputs": 3}}, 422, TeiErrorResponse),
    ("post", "/embed", {"json": {"inputs": []}}, 400, TeiErrorResponse),
    ("post", "/embed", {"json": {"inputs": ["a"] * 5}}, 422, TeiErrorResponse),
    ("post", "/embed", {"data": b"[1, 2]", "content_type": "application/json"}, 400, TeiErrorResponse),
    ("post", "/v1/embeddings", {"json": {"input": [[1, 2]]}}, 422, ErrorResponse),
    ("post", "/tokenize", {"json": {"inputs": ["é b", "c"], "add_special_tokens": False}}, 200, TokenizeResponse),
    ("post", "/tokenize", {"json": {"inputs": "a", "prompt_name": "nope"}}, 422, TeiErrorResponse),
    ("get", "/info", {}, 200, InfoResponse),
    ("get", "/health", {}, 200, HealthResponse),
    ("get", "/", {}, 200, HealthResponse),
    ("get", "/ping", {}, 200, HealthResponse),
    ("get", "/live", {}, 200, HealthResponse),
    ("get", "/ready", {}, 200, ReadyResponse),
    ("get", "/activity", {}, 200, ActivityResponse),
    ("get", "/activity?minutes=0", {}, 400, ErrorResponse),
    ("get", "/memory", {}, 200, MemoryResponse),
    ("post", "/cleanup", {}, 200, CleanupRecord),
    ("post", "/cleanup", {"headers": {"Origin": "https://example.com"}}, 403, ErrorResponse),
]


@pytest.mark.parametrize("case", ANSWERS, ids=[f"{c[1]}-{c[3]}" for c in ANSWERS])
def test_every_answer_is_what_the_openapi_document_says(
    client: FlaskClient, case: tuple[str, str, dict[str, Any], int, type[Any]]
) -> None:
    """The routes build their answers by hand; the models (which forbid undeclared fields) are the document."""
    method, path, kwargs, status, model = case
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status
    document = client.get("/openapi.json").get_json()
    responses = document["paths"][path.split("?", maxsplit=1)[0]][method]["responses"]
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    assert schema == ref or ref in schema.get("anyOf", [])  # POST / answers vectors or similarities
    jsonschema_rs.Draft202012Validator({**schema, "components": document["components"]}).validate(response.get_json())


def test_an_undocumented_field_in_an_answer_fails_the_check(client: FlaskClient) -> None:
    """What the check above rejects: an answer with a field the document does not list, or one it lacks."""
    components = client.get("/openapi.json").get_json()["components"]
    validator = jsonschema_rs.Draft202012Validator(
        {"$ref": "#/components/schemas/CleanupRecord", "components": components}
    )
    answer = client.post("/cleanup").get_json()
    validator.validate(answer)
    for wrong in ({**answer, "uptime_s": 3}, {k: v for k, v in answer.items() if k != "effective"}):
        with pytest.raises(jsonschema_rs.ValidationError):
            validator.validate(wrong)


def test_the_documented_request_schema_is_the_models_with_this_services_limits(client: FlaskClient) -> None:
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    embed = schemas["EmbedRequest"]["properties"]
    assert set(embed) == set(EmbedRequest.model_fields)
    assert set(schemas["OpenAIEmbeddingRequest"]["properties"]) == set(OpenAIEmbeddingRequest.model_fields)
    one, many = embed["inputs"]["anyOf"]
    assert "maxLength" not in one and "maxLength" not in many["items"]  # a longer text is cut (or, untruncated, 422)
    tokenize_one, tokenize_many = schemas["TokenizeRequest"]["properties"]["inputs"]["anyOf"]
    assert tokenize_one["maxLength"] == tokenize_many["items"]["maxLength"] == SETTINGS.max_input_chars
    assert many["maxItems"] == SETTINGS.max_inputs
    assert embed["input_type"]["anyOf"] == [{"enum": list(INPUT_TYPES), "type": "string"}, {"type": "null"}]
    prompt_names = embed["prompt_name"]["anyOf"][0]["enum"]
    assert prompt_names == schemas["TokenizeRequest"]["properties"]["prompt_name"]["anyOf"][0]["enum"]
    assert prompt_names == ["passage", "query"]  # the model's prompts
    # Every optional field takes null: its default (as TEI and OpenAI's schema have it).
    for name, prop in embed.items():
        assert name == "inputs" or {"type": "null"} in prop["anyOf"], name
    assert "enum" not in str(schemas["OpenAIEmbeddingRequest"]["properties"]["model"])  # any name is answered


@pytest.mark.parametrize("input_type", INPUT_TYPES)
def test_every_documented_input_type_is_accepted(client: FlaskClient, input_type: str) -> None:
    assert client.post("/embed", json={"inputs": "x", "input_type": input_type}).status_code == 200


def test_activity_reports_recent_embedding_requests(client: FlaskClient) -> None:
    assert client.get("/activity").get_json() == {
        "minutes": 5,
        "requests": 0,
        "queue_depth": 0,
        "last_request_at": None,
    }
    client.post("/embed", json={"inputs": "x"})
    client.post("/v1/embeddings", json={"input": "y"})
    client.get("/health")
    body = client.get("/activity?minutes=15").get_json()
    assert body["requests"] == 2
    assert body["last_request_at"] is not None
    assert client.get("/activity?minutes=0").status_code == 400
    assert client.get("/activity?minutes=soon").status_code == 400


def test_metrics_export_no_created_series(client: FlaskClient) -> None:
    client.post("/embed", json={"inputs": ["one"]})
    text = client.get("/metrics").get_data(as_text=True)
    assert "embedding_requests_total{" in text
    assert "_created" not in text


ELSEWHERE = {"REMOTE_ADDR": "192.0.2.7"}  # a documentation address: not loopback


def test_without_a_token_admin_routes_answer_loopback_clients_only(client: FlaskClient) -> None:
    refused = client.post("/cleanup", environ_base=ELSEWHERE)
    assert refused.status_code == 403
    assert "answer only on loopback" in refused.get_json()["error"]["message"]
    assert client.post("/cleanup").status_code == 200  # the test client's address is 127.0.0.1


@pytest.mark.parametrize(
    ("address", "status"),
    [("::ffff:127.0.0.1", 200), ("::1", 200), ("127.0.0.9", 200), ("::ffff:192.0.2.7", 403), ("::ffff:7f00:1", 200)],
)
def test_loopback_counts_as_a_dual_stack_socket_sees_it(backend: FakeBackend, address: str, status: int) -> None:
    """Bound to [::], a client on 127.0.0.1 arrives as ::ffff:127.0.0.1, which Python 3.11 does not call loopback:
    it was refused the admin routes."""
    app = Service(SETTINGS, backend=backend, heap=QUIET_HEAP, record_run=False).app  # not started
    assert app.test_client().post("/cleanup", environ_base={"REMOTE_ADDR": address}).status_code == status


def test_an_admin_token_written_with_a_newline_still_matches(backend: FakeBackend) -> None:
    """The token sent is stripped; the configured one (a Secret's file, an env file) is now too."""
    settings = Settings.from_env({"EMBEDDING_MODEL": "fake", "EMBEDDING_ADMIN_TOKEN": "let-me-in\n"})
    app = Service(settings, backend=backend, heap=QUIET_HEAP, record_run=False).app
    answer = app.test_client().post("/cleanup", environ_base=ELSEWHERE, headers={"Authorization": "Bearer let-me-in"})
    assert answer.status_code == 200


@pytest.mark.parametrize(
    "headers", [{"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}], ids=["origin", "fetch"]
)
def test_admin_routes_refuse_a_browsers_request(client: FlaskClient, headers: dict[str, str]) -> None:
    """A web page cannot drive them, not even a cross-site text/plain form aimed at localhost."""
    response = client.post("/cleanup", headers={**headers, "Content-Type": "text/plain"}, data="x")
    assert response.status_code == 403
    assert "web browser" in response.get_json()["error"]["message"]


def test_manual_cleanups_are_limited_to_one_per_interval(client: FlaskClient, app: Flask) -> None:
    assert client.post("/cleanup").status_code == 200
    again = client.post("/cleanup")
    assert again.status_code == 429
    assert 1 <= int(again.headers["Retry-After"]) <= SETTINGS.manual_cleanup_interval_s
    registry = components(app).metrics.registry
    assert registry.get_sample_value("embedding_cleanups_total", {"reason": "manual"}) == 1


def test_with_a_token_admin_routes_answer_any_host_that_presents_it(backend: FakeBackend) -> None:
    settings = SETTINGS.replace(admin_token="let-me-in")
    app = Service(settings, backend=backend, heap=QUIET_HEAP, record_run=False).app  # not started
    client = app.test_client()
    assert client.post("/cleanup", environ_base=ELSEWHERE).status_code == 401
    assert (
        client.post("/cleanup", environ_base=ELSEWHERE, headers={"Authorization": "Bearer let-me-in"}).status_code
        == 200
    )


def test_float_vectors_are_written_as_float32_and_read_back_exactly(client: FlaskClient) -> None:
    texts = {"input": ["first text", "a second, longer text"]}
    floats = client.post("/v1/embeddings", json=texts)
    packed = client.post("/v1/embeddings", json={**texts, "encoding_format": "base64"}).get_json()
    for as_float, as_base64 in zip(floats.get_json()["data"], packed["data"], strict=True):
        exact = np.frombuffer(base64.b64decode(as_base64["embedding"]), dtype="<f4")
        assert np.array_equal(np.asarray(as_float["embedding"], dtype=np.float32), exact)
    # float32's shortest round-trip form (at most 9 significant digits), not a float64 expansion of it
    numbers = re.findall(rb"-?\d+\.\d+(?:[eE][-+]?\d+)?", floats.get_data())
    assert numbers
    assert max(len(n.lstrip(b"-").replace(b".", b"").split(b"e")[0].lstrip(b"0")) for n in numbers) <= 9


def test_a_model_output_that_is_not_finite_fails_the_request_instead_of_answering_nan() -> None:
    class Overflowing(FakeBackend):  # the text "overflow" comes out as infinity, as in an fp16 overflow
        def finish(self, encoded: Any) -> np.ndarray:
            vectors = super().finish(encoded)
            vectors[[text == "overflow" for text in self.batches[-1]], 0] = np.inf
            return vectors

    with serving(SETTINGS, Overflowing()) as app:
        client = app.test_client()
        response = client.post("/v1/embeddings", json={"input": ["fine", "overflow"]})
        tei = client.post("/embed", json={"inputs": ["overflow"]})
        fine = client.post("/embed", json={"inputs": ["fine"]})
    assert response.status_code == 500
    assert response.get_json()["error"]["message"] == "the model failed on input[1]"
    assert tei.status_code == 424  # text-embeddings-inference's status for a failed inference
    assert tei.get_json() == {"error": "the model failed on input[0]", "error_type": "Backend"}
    assert fine.status_code == 200
