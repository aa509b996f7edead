"""Bad input gets a clear JSON error, and the service keeps serving everyone else."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from app.routes import TEI_PATHS
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
