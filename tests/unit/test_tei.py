"""text-embeddings-inference's API on the fake backend: answers, headers, truncation, prompts, errors, /tokenize."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from flask.testing import FlaskClient

from app import components
from app.config import Settings
from tests.doubles import FakeBackend, serving

SETTINGS = Settings(model="fake", max_inputs=4, queue_size=6, max_body_bytes=4096)
LONG = " ".join(f"w{i}" for i in range(30))  # 32 fake tokens; the fake model takes 16


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(prompts={"query": "query: ", "classification": "Classify: "})


@pytest.fixture
def settings() -> Settings:
    return SETTINGS


@pytest.mark.parametrize("path", ["/embed", "/"])
def test_the_answer_is_an_array_of_vectors_also_for_one_string(
    client: FlaskClient, backend: FakeBackend, path: str
) -> None:
    one = client.post(path, json={"inputs": "alpha"}).get_json()
    many = client.post(path, json={"inputs": ["alpha", "beta gamma"], "normalize": False}).get_json()
    assert np.asarray(one).shape == (1, 8)
    assert np.linalg.norm(one[0]) == pytest.approx(1, abs=1e-6)
    assert np.allclose(many, [backend.vector("alpha"), backend.vector("beta gamma")], atol=1e-6)
    assert client.post(path, json={"inputs": "alpha", "dimensions": 3}).get_json()[0] == pytest.approx(
        (backend.vector("alpha")[:3] / np.linalg.norm(backend.vector("alpha")[:3])).tolist(), abs=1e-6
    )


def test_tokens_characters_and_times_are_in_the_headers(client: FlaskClient) -> None:
    response = client.post("/embed", json={"inputs": ["one two", "thrée"]})
    headers = response.headers
    assert headers["x-compute-tokens"] == str((2 + 2) + (1 + 2))  # the fake tokenizer: words + 2
    assert headers["x-compute-characters"] == str(len("one two") + len("thrée"))
    assert headers["x-compute-type"] == "cpu"
    times = {
        name: int(headers[name]) for name in ("x-compute-time", "x-total-time", "x-queue-time", "x-inference-time")
    }
    assert all(value >= 0 for value in times.values())
    assert times["x-queue-time"] + times["x-inference-time"] <= times["x-total-time"] + 1
    openai = client.post("/v1/embeddings", json={"input": "one two"})
    assert openai.headers["x-compute-tokens"] == str(openai.get_json()["usage"]["total_tokens"]) == "4"


def test_prompt_name_puts_the_models_prompt_before_each_text(client: FlaskClient, backend: FakeBackend) -> None:
    client.post("/embed", json={"inputs": ["a text", "another"], "prompt_name": "classification"})
    assert backend.batches[-1] == ["Classify: a text", "Classify: another"]
    unknown = client.post("/embed", json={"inputs": "x", "prompt_name": "passage"})
    assert unknown.status_code == 422
    assert unknown.get_json()["error"] == (
        'prompt_name "passage" is not one of model "fake/model"\'s prompts (classification, query)'
    )


def test_left_truncation_keeps_the_end_of_the_text_and_the_prompt(client: FlaskClient, backend: FakeBackend) -> None:
    client.post("/embed", json={"inputs": LONG, "truncation_direction": "left"})
    assert backend.batches[-1] == [" ".join(f"w{i}" for i in range(16, 30))]  # 14 words + 2 special tokens
    client.post("/embed", json={"inputs": LONG, "truncation_direction": "left", "prompt_name": "query"})
    assert backend.batches[-1] == ["query: " + " ".join(f"w{i}" for i in range(17, 30))]
    client.post("/embed", json={"inputs": [LONG, "short one"], "truncation_direction": "right"})
    cut, short = backend.batches[-1]
    assert short == "short one"
    assert cut.split()[:14] == LONG.split()[:14]  # what the model reads: its first 14 words, cut before the tokenizer
    assert len(cut) < len(LONG)
    client.post("/embed", json={"inputs": "short one", "truncation_direction": "left"})
    assert backend.batches[-1] == ["short one"]
    refused = client.post("/embed", json={"inputs": LONG, "truncate": False, "truncation_direction": "left"})
    assert (refused.status_code, refused.get_json()["error_type"]) == (422, "Validation")
    assert "32 tokens, more than the model's maximum of 16" in refused.get_json()["error"]


def test_token_ids_are_refused_with_how_to_avoid_it(client: FlaskClient) -> None:
    tei = client.post("/embed", json={"inputs": [[101, 2023, 102]]})
    assert (tei.status_code, tei.get_json()["error_type"]) == (422, "Validation")
    assert "token ids" in tei.get_json()["error"]
    openai = client.post("/v1/embeddings", json={"input": [2028, 374]})
    assert openai.status_code == 422
    assert "check_embedding_ctx_length=False" in openai.get_json()["error"]["message"]


def test_errors_take_text_embeddings_inference_statuses(client: FlaskClient, backend: FakeBackend) -> None:
    too_many = client.post("/embed", json={"inputs": ["a"] * 5})
    assert (too_many.status_code, too_many.get_json()["error_type"]) == (422, "Validation")  # TEI 1.9's status
    assert client.post("/v1/embeddings", json={"input": ["a"] * 5}).status_code == 422
    backend.gate.clear()  # the model holds its batch: the queue fills
    engine = components(client.application).engine

    def send(texts: list[str]) -> threading.Thread:
        thread = threading.Thread(
            target=client.application.test_client().post, args=("/embed",), kwargs={"json": {"inputs": texts}}
        )
        thread.start()
        return thread

    def wait_for(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 5
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.005)

    waiting = [send(["blocker"])]
    try:
        wait_for(lambda: engine.queue_depth == 0 and not engine.is_idle())  # in the held batch
        waiting.append(send(["q"] * 3))
        wait_for(lambda: engine.queue_depth == 3)  # waiting behind it: 3 of the queue's 6
        full = client.post("/embed", json={"inputs": ["x"] * 4})
        assert (full.status_code, full.get_json()["error_type"]) == (429, "Overloaded")
        assert full.headers["Retry-After"] == "1"
    finally:
        backend.gate.set()
        for thread in waiting:
            thread.join(5)


def test_a_service_that_is_not_ready_is_unhealthy_to_tei_clients() -> None:
    backend = FakeBackend()
    backend.gate.clear()  # the warm-up batch waits here
    with serving(SETTINGS, backend, wait=False) as app:
        try:
            response = app.test_client().post("/embed", json={"inputs": "x"})
            assert (response.status_code, response.get_json()["error_type"]) == (503, "Unhealthy")
            tokenize = app.test_client().post("/tokenize", json={"inputs": "x"})
            assert (tokenize.status_code, tokenize.get_json()["error_type"]) == (503, "Unhealthy")
        finally:
            backend.gate.set()


def test_tokenize_answers_each_texts_tokens_with_byte_offsets(client: FlaskClient, backend: FakeBackend) -> None:
    answer = client.post("/tokenize", json={"inputs": "héllo wörld"}).get_json()
    assert answer == [
        [
            {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None},
            {"id": backend.word_id("héllo"), "text": "héllo", "special": False, "start": 0, "stop": 6},
            {"id": backend.word_id("wörld"), "text": "wörld", "special": False, "start": 7, "stop": 13},
            {"id": 102, "text": "[SEP]", "special": True, "start": None, "stop": None},
        ]
    ]
    plain = client.post("/tokenize", json={"inputs": ["a", "b c"], "add_special_tokens": False}).get_json()
    assert [[t["text"] for t in tokens] for tokens in plain] == [["a"], ["b", "c"]]
    prompted = client.post("/tokenize", json={"inputs": "x", "prompt_name": "query", "add_special_tokens": False})
    assert [t["text"] for t in prompted.get_json()[0]] == ["query:", "x"]


def test_info_carries_text_embeddings_inference_fields(client: FlaskClient) -> None:
    info = client.get("/info").get_json()
    assert info["model_id"] == info["model"] == "fake/model"
    assert info["model_dtype"] == info["dtype"] == "float32"
    assert info["max_input_length"] == info["max_seq_length"] == 16
    assert info["max_client_batch_size"] == SETTINGS.max_inputs
    assert info["max_batch_tokens"] == SETTINGS.max_batch_tokens
    assert info["max_concurrent_requests"] == SETTINGS.http_threads
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["auto_truncate"] is True
    assert info["prompts"] == {"query": "query: ", "classification": "Classify: "}
    assert info["input_types"] == ["query"]
