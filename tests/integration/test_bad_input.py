"""Bad input gets a clear JSON error, and the service keeps serving everyone else."""

from __future__ import annotations

import gzip
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from app.routes import TEI_PATHS
from app.schemas import (
    DecodeRequest,
    EmbedAllRequest,
    EmbedRequest,
    OpenAIEmbeddingRequest,
    SimilarityInput,
    SimilarityParameters,
    TokenizeRequest,
)
from loadtest.service import ServiceProcess

JSON = {"Content-Type": "application/json"}

CASES = [
    # (route, raw body, status, fragment of the message): /embed answers as text-embeddings-inference does
    # (400 for a body that is not a JSON object or an empty input, 422 for a field of the wrong type),
    # /v1/embeddings as OpenAI's API does (400 for a wrong type, 422 for a value it will not embed).
    ("/embed", b"{not json", 400, "not valid JSON"),
    ("/embed", b'{"inputs": 42}', 422, "got number"),
    ("/embed", b'{"inputs": [1, 2]}', 422, "'inputs' holds token ids"),
    ("/embed", b'{"inputs": [["nested"]]}', 422, "got array"),
    ("/embed", b'{"inputs": null}', 422, "got null"),
    ("/embed", b'{"inputs": ["ok", null]}', 422, "inputs[1] must be a string, got null"),
    ("/embed", b'["inputs"]', 400, "must be a JSON object"),
    ("/embed", b'{"inputs": []}', 400, "is empty"),
    ("/embed", b'{"inputs": "x", "normalize": "no"}', 422, "true or false"),
    ("/embed", b'{"inputs": "x", "truncation_direction": "up"}', 422, "'truncation_direction' must be one of"),
    ("/embed", b'{"inputs": "x", "prompt_name": "query"}', 422, "declares no prompts"),
    ("/tokenize", b'{"inputs": []}', 400, "is empty"),
    ("/v1/embeddings", b'{"input": []}', 422, "is empty"),
    ("/v1/embeddings", b'{"input": "x", "encoding_format": "int8"}', 400, "unsupported encoding_format"),
    ("/v1/embeddings", b'{"input": "x", "dimensions": 385}', 422, "from 1 to 384"),
    ("/v1/embeddings", b'{"input": "x", "dimensions": 0}', 422, "from 1 to 384"),
    ("/v1/embeddings", b'{"input": [[101, 2023]]}', 422, "check_embedding_ctx_length=False"),
    # What a fuzzer or a careless client sends: never a 500, never the internals, never the input echoed whole.
    ("/embed", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply"),
    ("/v1/embeddings", b'{"input": "x", "dimensions": 1' + b"0" * 4999 + b"}", 400, "a number is too long"),
    ("/v1/embeddings", b'{"input": "x", "dimensions": 1' + b"0" * 3999 + b"}", 422, "(4000 characters)"),
    ("/embed", b'{"inputs": ["fine", "\\ud800 alone"]}', 422, "inputs[1] is not valid Unicode"),
    ("/v1/embeddings", b'{"input": "x", "user": 7}', 400, "'user' must be a string"),
    ("/v1/embeddings", b'{"input": "x", "encoding_format": "' + b"m" * 1_000_000 + b'"}', 400, "(1000002 characters)"),
    # Values quoted as JSON writes them, the client's own words (Python's were None, True, {'k': None}, ['query']).
    ("/v1/embeddings", b'{"input": "x", "encoding_format": true}', 400, "encoding_format true;"),
    ("/v1/embeddings", b'{"input": "x", "input_type": ["query"]}', 400, 'got ["query"]'),
    ("/embed", b'{"inputs": "x", "truncation_direction": {"k": null}}', 422, 'got {"k": null}'),
    ("/embed", b'{"inputs": "x", "input_type": [null, false, 1.5]}', 422, "got [null, false, 1.5]"),
    ("/embed", b'{"inputs": "x", "input_type": "caf\xc3\xa9 \\ud800"}', 422, r'got "caf\u00e9 \ud800"'),
]
TEI_ROUTES = TEI_PATHS


def message_of(route: str, response: requests.Response) -> str:
    """The error's message, checked to be in the route's shape: TEI's, or OpenAI's (with the status in it)."""
    body = response.json()
    if route in TEI_ROUTES:
        assert set(body) == {"error", "error_type"}
        message: str = body["error"]
    else:
        assert body["error"]["code"] == response.status_code
        message = body["error"]["message"]
    return message


@pytest.mark.parametrize(("route", "body", "status", "fragment"), CASES)
def test_bad_input_gets_a_json_error(
    service: ServiceProcess, route: str, body: bytes, status: int, fragment: str
) -> None:
    response = requests.post(f"{service.url}{route}", data=body, headers=JSON, timeout=30)
    assert response.status_code == status
    message = message_of(route, response)
    assert fragment in message
    assert len(message) < 400


@pytest.mark.parametrize("minutes", ["\u00b2", "1441", "0", "99999999999999", "1.5", "-1"])
def test_a_bad_activity_window_is_a_400(service: ServiceProcess, minutes: str) -> None:
    response = requests.get(f"{service.url}/activity", params={"minutes": minutes}, timeout=10)
    assert response.status_code == 400
    assert "'minutes' must be a whole number from 1 to 1440" in response.json()["error"]["message"]


def test_a_whole_number_written_as_a_float_is_a_whole_number(service: ServiceProcess) -> None:
    response = requests.post(f"{service.url}/v1/embeddings", json={"input": "x", "dimensions": 64.0}, timeout=30)
    assert response.status_code == 200
    assert len(response.json()["data"][0]["embedding"]) == 64


def test_too_many_inputs(service: ServiceProcess) -> None:
    response = requests.post(f"{service.url}/embed", json={"inputs": ["x"] * 257}, timeout=30)
    assert response.status_code == 422  # text-embeddings-inference 1.9's status for too large a batch
    assert "257 texts, more than the limit of 256" in message_of("/embed", response)
    openai = requests.post(f"{service.url}/v1/embeddings", json={"input": ["x"] * 257}, timeout=30)
    assert openai.status_code == 422
    assert "257 texts, more than the limit of 256" in message_of("/v1/embeddings", openai)


def test_a_text_over_the_character_limit_is_cut_unless_truncation_is_off(service: ServiceProcess) -> None:
    words = " ".join(f"w{i}" for i in range(5000))  # 28,889 characters: over the limit of 20,000
    cut = requests.post(f"{service.url}/embed", json={"inputs": ["x", words]}, timeout=30)
    assert cut.status_code == 200
    assert cut.headers["x-truncated-inputs"] == "1"
    head = requests.post(f"{service.url}/embed", json={"inputs": words[:20_000]}, timeout=30).json()
    assert float(np.dot(cut.json()[1], head[0])) > 0.999  # the same text as the model reads it
    refused = requests.post(f"{service.url}/embed", json={"inputs": ["x", words], "truncate": False}, timeout=30)
    assert refused.status_code == 422
    assert "inputs[1] has 28889 characters, more than the limit of 20000" in message_of("/embed", refused)


def test_null_is_the_default_of_an_optional_field(service: ServiceProcess) -> None:
    nulls = {"model": None, "dimensions": None, "user": None, "encoding_format": None, "input_type": None}
    answer = requests.post(f"{service.url}/v1/embeddings", json={"input": "x", **nulls}, timeout=30)
    assert answer.status_code == 200
    assert len(answer.json()["data"][0]["embedding"]) == 384
    tei = {"truncate": None, "normalize": None, "truncation_direction": None, "prompt_name": None, "dimensions": None}
    assert requests.post(f"{service.url}/embed", json={"inputs": "x", **tei}, timeout=30).status_code == 200


def test_a_body_over_the_size_limit(service: ServiceProcess) -> None:
    body = b'{"inputs": ["' + b"z" * (1024 * 1024 + 10) + b'"]}'
    response = requests.post(f"{service.url}/embed", data=body, headers=JSON, timeout=30)
    assert response.status_code == 413
    assert "larger than the limit of 1048576 bytes" in message_of("/embed", response)


def test_unknown_routes_and_methods_are_json_too(service: ServiceProcess) -> None:
    assert requests.get(f"{service.url}/nope", timeout=5).json()["error"]["code"] == 404
    wrong_method = requests.get(f"{service.url}/embed", timeout=5)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error_type"] == "Validation"
    assert wrong_method.headers["Allow"] == "OPTIONS, POST"
    assert requests.put(f"{service.url}/health", timeout=5).headers["Allow"] == "GET, HEAD, OPTIONS"


def test_bad_requests_do_not_disturb_good_ones(service: ServiceProcess) -> None:
    stop = threading.Event()

    def hammer_with_bad_input() -> int:
        sent = 0
        while not stop.is_set():
            for _, body, _, _ in CASES:
                requests.post(f"{service.url}/embed", data=body, headers=JSON, timeout=30)
                sent += 1
        return sent

    with ThreadPoolExecutor(max_workers=6) as pool:
        bad = [pool.submit(hammer_with_bad_input) for _ in range(2)]
        good = [
            pool.submit(requests.post, f"{service.url}/embed", json={"inputs": [f"good {i}", "text"]}, timeout=60)
            for i in range(40)
        ]
        statuses = [f.result().status_code for f in good]
        stop.set()
        assert sum(f.result() for f in bad) > 0
    assert statuses == [200] * 40
    assert requests.get(f"{service.url}/ready", timeout=5).status_code == 200


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/v1/embeddings", '"input": "x"', "encoding_format"),
        ("/embed", '"inputs": "x"', "input_type"),
        ("/embed", '"inputs": "x"', "truncation_direction"),
    ],
)
@pytest.mark.parametrize("kind", ["array", "object"])
def test_a_value_nested_as_deep_as_python_can_render_is_a_client_error(
    service: ServiceProcess, route: str, body: str, field: str, kind: str
) -> None:
    """980 to 982 levels were a 500 (a RecursionError quoting the value in the message): each one a 5xx for the
    error-rate alert. Every depth around Python's recursion limit is now the client's error, in JSON."""
    for depth in range(976, 987):
        value = "[" * depth + "1" + "]" * depth if kind == "array" else '{"k":' * depth + "1" + "}" * depth
        raw = ("{" + body + f', "{field}": {value}' + "}").encode()
        response = requests.post(f"{service.url}{route}", data=raw, headers=JSON, timeout=30)
        assert response.status_code in (400, 422), (depth, response.status_code, response.text[:300])
        assert len(message_of(route, response)) < 400


GOOD = {"/embed": {"inputs": "a text"}, "/v1/embeddings": {"input": "a text"}, "/tokenize": {"inputs": "a text"}}
MEDIA_TYPES = [
    # (Content-Type, Content-Encoding, fragment): each was accepted, a cross-site form's text/plain included.
    (None, None, "got none"),
    ("text/plain", None, 'got "text/plain"'),
    ("multipart/form-data; boundary=x", None, "Content-Type: application/json"),
    ("application/xml", None, "Content-Type: application/json"),
    ("application/x-www-form-urlencoded", None, "Content-Type: application/json"),  # curl -d without -H
    ("application/json; charset=utf-16", None, 'got charset "utf-16"'),
    ("application/json", "br", 'Content-Encoding "br" is not accepted'),
    ("application/json", "gzip", 'Content-Encoding "gzip" is not accepted'),
]


@pytest.mark.parametrize("route", sorted(GOOD))
@pytest.mark.parametrize(("content_type", "encoding", "fragment"), MEDIA_TYPES)
def test_a_body_that_is_not_declared_as_json_is_a_415(
    service: ServiceProcess, route: str, content_type: str | None, encoding: str | None, fragment: str
) -> None:
    headers = {"Content-Type": content_type, "Content-Encoding": encoding}
    body = json.dumps(GOOD[route]).encode()
    if encoding == "gzip":
        body = gzip.compress(body)  # a real gzip body, as a client that compresses sends it
    response = requests.post(f"{service.url}{route}", data=body, headers=headers, timeout=30)
    assert response.status_code == 415
    assert fragment in message_of(route, response)
    # The same body declared as JSON (and, for gzip, sent as it is) is embedded: only the declaration was wrong.
    plain = requests.post(f"{service.url}{route}", json=GOOD[route], timeout=30)
    assert plain.status_code == 200
    assert requests.post(
        f"{service.url}{route}", json=GOOD[route], headers={"Content-Type": "application/json; charset=UTF-8"}
    ).ok


NOT_JSON = [
    # (raw body, fragment): bodies Python's decoder took though JSON does not allow them.
    (b'{"input": "kept", "input": "silently taken instead"}', 'the key "input" appears more than once'),
    (b'{"input": "x", "encoding_format": "float", "encoding_format": "base64"}', "appears more than once"),
    (b'{"input": "x", "extra": NaN}', "NaN is not a JSON value"),
    (b'{"input": "x", "extra": [Infinity]}', "Infinity is not a JSON value"),
    (b'{"input": "x", "extra": {"deep": -Infinity}}', "-Infinity is not a JSON value"),
    (json.dumps({"input": "x"}).encode("utf-16"), "looks like UTF-16 or UTF-32"),
    (json.dumps({"input": "x"}).encode("utf-16-le"), "looks like UTF-16 or UTF-32"),
    (json.dumps({"input": "x"}).encode("utf-16-be"), "looks like UTF-16 or UTF-32"),
    (json.dumps({"input": "x"}).encode("utf-32"), "looks like UTF-16 or UTF-32"),
    (b'{"input": "latin-1 \xe9t\xe9"}', "not UTF-8 (byte 19 "),
    (b'{"input": "a surrogate in UTF-8 bytes \xed\xa0\x80"}', "not UTF-8"),
]


@pytest.mark.parametrize(("body", "fragment"), NOT_JSON)
def test_what_json_does_not_allow_is_a_400(service: ServiceProcess, body: bytes, fragment: str) -> None:
    response = requests.post(f"{service.url}/v1/embeddings", data=body, headers=JSON, timeout=30)
    assert response.status_code == 400
    assert fragment in message_of("/v1/embeddings", response)


def test_a_utf8_byte_order_mark_is_ignored_as_json_allows(service: ServiceProcess) -> None:
    body = json.dumps({"input": "x"}).encode("utf-8-sig")
    assert requests.post(f"{service.url}/v1/embeddings", data=body, headers=JSON, timeout=30).status_code == 200


NO_WORDS = ["", " ", "\t\n", "\u200b", "\ufeff", "\x00", "\u0301", "\x1f", "\x85", "\u3000"]
"""Texts with no token of their own for this tokenizer: white space, zero-width and format characters, NUL,
a lone combining mark, separators."""


def test_a_text_without_tokens_is_embedded_as_no_words_on_every_route(service: ServiceProcess) -> None:
    """One rule for every text the tokenizer finds nothing in, white space or not: it is embedded, as the model
    embeds no words (a pipeline's blank chunk must not fail its batch), on both protocols alike."""
    tokenized = requests.post(f"{service.url}/tokenize", json={"inputs": NO_WORDS}, timeout=30).json()
    assert [[token["special"] for token in tokens] for tokens in tokenized] == [[True, True]] * len(NO_WORDS)
    tei = requests.post(f"{service.url}/embed", json={"inputs": [*NO_WORDS, "words"]}, timeout=30)
    openai = requests.post(f"{service.url}/v1/embeddings", json={"input": [*NO_WORDS, "words"]}, timeout=30)
    assert tei.status_code == openai.status_code == 200
    vectors = np.array(tei.json())
    np.testing.assert_allclose(vectors[:-1], np.repeat(vectors[:1], len(NO_WORDS), axis=0), atol=1e-6)
    assert not np.allclose(vectors[-1], vectors[0], atol=1e-3)
    np.testing.assert_allclose([item["embedding"] for item in openai.json()["data"]], vectors, atol=1e-6)


# --- no body of any shape or depth is a 5xx ----------------------------------------------------------------
# Every field of every route that reads a body (and the body itself, and a field no schema names) takes a value
# of any JSON type nested 0 to 100,000 deep, around Python's recursion limit (about 980) most of all: each
# answer is 2xx or 4xx, in the route's error shape. A 5xx from client input keeps the error-rate alert firing.

BASES: dict[str, dict[str, Any]] = {
    "/": {"inputs": "x"},
    "/embed": {"inputs": "x"},
    "/embed_all": {"inputs": "x"},
    "/tokenize": {"inputs": "x"},
    "/decode": {"ids": [101]},
    "/similarity": {"inputs": {"source_sentence": "x", "sentences": ["y"]}, "parameters": {}},
    "/v1/embeddings": {"input": "x"},
    "/embeddings": {"input": "x"},
}
FIELDS: dict[str, list[tuple[str, ...]]] = {
    route: [(name,) for name in model.model_fields]
    for route, model in [
        ("/", EmbedRequest),
        ("/embed", EmbedRequest),
        ("/embed_all", EmbedAllRequest),
        ("/tokenize", TokenizeRequest),
        ("/decode", DecodeRequest),
        ("/v1/embeddings", OpenAIEmbeddingRequest),
        ("/embeddings", OpenAIEmbeddingRequest),
    ]
}
FIELDS["/similarity"] = [("inputs",), ("parameters",)]
FIELDS["/similarity"] += [("inputs", name) for name in SimilarityInput.model_fields]
FIELDS["/similarity"] += [("parameters", name) for name in SimilarityParameters.model_fields]
for _paths in FIELDS.values():
    _paths += [(), ("not_a_field",)]  # the body itself, and a field no schema names
HOLE = "\x00hole"

leaves = st.one_of(
    st.sampled_from(["null", "true", "false", "[]", "{}", '""', "0", "-0.0", "1e400", "1" + "0" * 5000, '"\\ud800"']),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(max_size=12).map(json.dumps),
    st.just(json.dumps("x" * 100_000)),
)
depths = st.one_of(st.integers(0, 4), st.integers(975, 990), st.sampled_from([1500, 5000, 100_000]))


@st.composite
def nested(draw: st.DrawFn) -> str:
    """A JSON value as text: a leaf inside ``depth`` arrays, objects or both in turn."""
    leaf, depth = draw(leaves), draw(depths)
    shape = draw(st.sampled_from(["[", '{"k":', '[{"k":']))
    if shape == "[":
        return "[" * depth + leaf + "]" * depth
    if shape == '{"k":':
        return '{"k":' * depth + leaf + "}" * depth
    return '[{"k":' * (depth // 2) + leaf + "}]" * (depth // 2)


def with_value(route: str, path: tuple[str, ...], value: str) -> bytes:
    """The route's valid base body with ``value`` (JSON text) at ``path``: the whole body when ``path`` is empty."""
    if not path:
        return value.encode()
    body = json.loads(json.dumps(BASES[route]))
    target = body
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = HOLE
    return json.dumps(body).replace(json.dumps(HOLE), value).encode()


@pytest.mark.parametrize("route", sorted(BASES))
@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_no_body_of_any_shape_or_depth_is_a_5xx(service: ServiceProcess, route: str, data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(FIELDS[route]), label="field")
    value = data.draw(nested(), label="value")
    body = with_value(route, path, value)
    response = requests.post(f"{service.url}{route}", data=body, headers=JSON, timeout=60)
    assert response.status_code < 500, (path, value[:80], response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert len(message_of(route, response)) < 400
