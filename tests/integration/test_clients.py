"""The real clients of the two protocols against the real service: Hugging Face's ``InferenceClient``
(text-embeddings-inference's API, as LangChain's, LlamaIndex's and Haystack's Hugging Face embedders use it)
on both of TEI's URLs, and the official ``openai`` client; the same text gets the same vector through both."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from huggingface_hub import InferenceClient
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError
from openai import OpenAI

from loadtest.service import ServiceProcess, running_service

TEXTS = ["The cat sits on the mat.", "Quarterly revenue grew by 8% on strong demand."]
LONG = " ".join(f"sentence {i} of a long report about the harbour's history." for i in range(60))  # ~900 tokens


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module", autouse=True)
def clients_may_reach_the_service() -> Iterator[None]:
    """The tests run with HF_HUB_OFFLINE=1 (nothing may download a model), which also makes
    ``huggingface_hub``'s client refuse every URL, this loopback service's included. A user's client
    process runs online; here the switch is turned off for this module's clients only (the services
    under test still start with it on)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        yield


@pytest.fixture(scope="module", params=["/", "/embed"], ids=["root", "embed"])
def tei(request: pytest.FixtureRequest, service: ServiceProcess) -> InferenceClient:
    """TEI's client, pointed at the service as a TEI user would: its root URL, or its /embed route."""
    return InferenceClient(model=f"{service.url}{'' if request.param == '/' else request.param}", timeout=60)


def test_feature_extraction_gives_one_unit_vector_per_text(tei: InferenceClient) -> None:
    one = tei.feature_extraction("hello world")
    batch = tei.feature_extraction(TEXTS)
    assert one.shape == (1, 384) and one.dtype == np.float32
    assert batch.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(tei.feature_extraction(TEXTS[1])[0], batch[1], atol=1e-5)


def test_normalize_false_leaves_the_vector_as_the_model_gives_it(tei: InferenceClient) -> None:
    # all-MiniLM-L6-v2 ends in a Normalize module: its whole vectors are unit length either way, so the
    # difference shows in shortened ones, which normalize=true scales back to unit length.
    full = tei.feature_extraction(TEXTS, normalize=False)
    raw = tei.feature_extraction(TEXTS, normalize=False, dimensions=64)
    unit = tei.feature_extraction(TEXTS, dimensions=64)
    np.testing.assert_allclose(raw, full[:, :64], atol=1e-6)
    assert np.all(np.linalg.norm(raw, axis=1) < 0.9)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


def test_an_over_long_text_is_truncated_at_either_end_or_refused(tei: InferenceClient, service: ServiceProcess) -> None:
    right = tei.feature_extraction(LONG, truncate=True)
    left = tei.feature_extraction(LONG, truncate=True, truncation_direction="left")
    # The model's 256 tokens are 2 special ones and 254 of the text's: its first 254, or its last 254.
    tokens = requests.post(f"{service.url}/tokenize", json={"inputs": LONG, "add_special_tokens": False}, timeout=30)
    spans = tokens.json()[0]
    assert len(spans) > 600
    raw = LONG.encode()
    head, tail = raw[: spans[253]["stop"]].decode(), raw[spans[-254]["start"] :].decode()
    np.testing.assert_allclose(cosine(right, tei.feature_extraction(head)), 1, atol=1e-5)
    np.testing.assert_allclose(cosine(left, tei.feature_extraction(tail)), 1, atol=1e-5)
    assert cosine(left, right)[0] < 0.999  # the two ends differ
    with pytest.raises(HfHubHTTPError) as refused:
        tei.feature_extraction(LONG, truncate=False)
    assert refused.value.response.status_code == 422
    assert refused.value.response.json()["error_type"] == "validation"
    assert "more than the model's maximum of 256" in refused.value.response.json()["error"]


def test_errors_reach_the_client_in_teis_shape(tei: InferenceClient) -> None:
    with pytest.raises(HfHubHTTPError) as empty:
        tei.feature_extraction([])
    assert empty.value.response.status_code == 400
    assert empty.value.response.json() == {"error": "'inputs' is empty; send at least one text", "error_type": "empty"}
    with pytest.raises(HfHubHTTPError) as unknown:
        tei.feature_extraction("x", prompt_name="query")  # all-MiniLM-L6-v2 declares no prompts
    assert unknown.value.response.status_code == 422
    assert "declares no prompts" in unknown.value.response.json()["error"]


def test_the_same_text_gets_the_same_vector_through_both_protocols(
    tei: InferenceClient, service: ServiceProcess
) -> None:
    openai = OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    answer = openai.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2", input=TEXTS)
    through_openai = np.array([d.embedding for d in answer.data], dtype=np.float32)
    through_tei = tei.feature_extraction(TEXTS)
    np.testing.assert_allclose(cosine(through_openai, through_tei), 1, atol=1e-6)
    np.testing.assert_allclose(through_openai, through_tei, atol=1e-6)


def test_token_ids_from_an_openai_client_are_refused_with_the_way_out(service: ServiceProcess) -> None:
    """What LangChain's OpenAIEmbeddings sends by default: tiktoken ids, which mean nothing to this model."""
    import openai

    client = OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.embeddings.create(model="all-MiniLM-L6-v2", input=[[9906, 1917]])
    assert "check_embedding_ctx_length=False" in str(caught.value)


@pytest.fixture(scope="module")
def prompted(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[ServiceProcess]:
    """The bundled model as a model with prompts ships it (e5, bge, nomic): its files, and prompts declared in
    its sentence-transformers configuration."""
    copy = tmp_path_factory.mktemp("models") / "all-MiniLM-L6-v2-prompted"
    copy.mkdir()
    for source in model_dir.iterdir():
        (copy / source.name).symlink_to(source)
    config = copy / "config_sentence_transformers.json"
    declared = json.loads(config.read_text())
    config.unlink()
    config.write_text(json.dumps({**declared, "prompts": {"query": "query: ", "passage": ""}}))
    log = tmp_path_factory.mktemp("prompted") / "service.log"
    with running_service(log, {"EMBEDDING_MODEL": str(copy)}) as service:
        yield service


def test_prompt_name_puts_the_models_prompt_before_the_text(prompted: ServiceProcess) -> None:
    client = InferenceClient(model=prompted.url, timeout=60)
    with_prompt = client.feature_extraction(TEXTS, prompt_name="query")
    written_out = client.feature_extraction([f"query: {text}" for text in TEXTS])
    np.testing.assert_allclose(with_prompt, written_out, atol=1e-5)
    assert np.all(cosine(with_prompt, client.feature_extraction(TEXTS)) < 0.999)
    info = requests.get(f"{prompted.url}/info", timeout=10).json()
    assert info["prompts"] == {"query": "query: "}  # an empty prompt is no prompt
    tokens = requests.post(f"{prompted.url}/tokenize", json={"inputs": "x", "prompt_name": "query"}, timeout=10)
    assert [t["text"] for t in tokens.json()[0]] == ["[CLS]", "query", ":", "x", "[SEP]"]
