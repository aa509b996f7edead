"""The real clients of the two protocols against the real service, as they are really used: Hugging Face's
``InferenceClient`` (text-embeddings-inference's API) on both of TEI's URLs, the official ``openai`` client
with and without ``/v1``, and the embedders of LangChain, LlamaIndex and Haystack, each sending an indexing
pipeline's 32-chunk batch with a blank chunk and a 100,000-character one; the same text gets the same vector
through every one of them. A second service, locked down (an API key, one CORS origin, served model names
only) and serving a model with prompts, checks what those settings change."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from huggingface_hub import InferenceClient
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError
from openai import OpenAI

from loadtest.service import ServiceProcess, running_service

TEXTS = ["The cat sits on the mat.", "Quarterly revenue grew by 8% on strong demand."]
KEY = "test-key-0123456789abcdef"
"""The locked-down service's EMBEDDING_API_KEY."""
ORIGIN = "https://search.example.com"
"""Its one EMBEDDING_CORS_ORIGINS."""


def pipeline_batch() -> list[str]:
    """32 chunks as a document splitter makes them, with the two odd ones a real corpus holds: a blank chunk (a
    page of white space) and a 100,000-character one (a table or a log pasted whole: more than the service's
    EMBEDDING_MAX_INPUT_CHARS, 20,000 here)."""
    chunks = [f"Chunk {i} of the annual report: revenue, costs and the outlook for region {i % 7}." for i in range(30)]
    huge = " ".join(f"row {i}: {i * 37 % 1000} units" for i in range(7000))[:100_000]
    assert len(huge) == 100_000
    return [*chunks[:10], "   \n  ", *chunks[10:20], huge, *chunks[20:]]


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
    assert refused.value.response.json()["error_type"] == "Validation"
    assert "more than the model's maximum of 256" in refused.value.response.json()["error"]


def test_errors_reach_the_client_in_teis_shape(tei: InferenceClient) -> None:
    with pytest.raises(HfHubHTTPError) as empty:
        tei.feature_extraction([])
    assert empty.value.response.status_code == 400
    assert empty.value.response.json() == {"error": "'inputs' is empty; send at least one text", "error_type": "Empty"}
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
def reference(service: ServiceProcess) -> np.ndarray:
    """The pipeline batch's vectors as /embed answers them, and what each odd chunk must come out as: the
    blank chunk embedded as it is, the huge one as its first 20,000 characters (then the model's 256 tokens)."""
    batch = pipeline_batch()
    answer = requests.post(f"{service.url}/embed", json={"inputs": batch}, timeout=120)
    assert answer.status_code == 200
    assert answer.headers["x-truncated-inputs"] == "1"  # the huge chunk: nothing else is cut
    vectors = np.asarray(answer.json(), dtype=np.float32)
    alone = requests.post(f"{service.url}/embed", json={"inputs": ["   \n  ", batch[21][:20_000]]}, timeout=60)
    assert np.all(cosine(vectors[[10, 21]], np.asarray(alone.json())) > SAME)
    return vectors


SAME = 0.999
"""Cosine of the same text's vectors from two batches: equal in float32; in bfloat16 (``auto`` on a CPU with
AVX-512 BF16) a batch's padding changes the rounding (the service's own fidelity bound)."""


def assert_same_vectors(got: Any, reference: np.ndarray) -> None:
    vectors = np.asarray(got, dtype=np.float32)
    assert vectors.shape == reference.shape == (32, 384)
    assert np.all(cosine(vectors, reference) > SAME)


def test_huggingface_inference_client_embeds_the_whole_pipeline_batch(
    service: ServiceProcess, reference: np.ndarray
) -> None:
    client = InferenceClient(model=service.url, timeout=120)
    assert_same_vectors(client.feature_extraction(pipeline_batch(), truncate=True), reference)
    assert_same_vectors(client.feature_extraction(pipeline_batch()), reference)  # truncation is the default


@pytest.mark.parametrize("suffix", ["/v1", ""], ids=["v1", "no-v1"])
def test_the_openai_client_with_or_without_v1_embeds_the_whole_pipeline_batch(
    service: ServiceProcess, reference: np.ndarray, suffix: str
) -> None:
    client = OpenAI(base_url=f"{service.url}{suffix}", api_key="unused", max_retries=0, timeout=120)
    # A name the service does not serve (what gateways and LangChain's default send) is answered by the model
    # it serves, and the answer says which.
    answer = client.embeddings.create(model="text-embedding-ada-002", input=pipeline_batch())
    assert answer.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert_same_vectors([d.embedding for d in answer.data], reference)
    metrics = requests.get(f"{service.url}/metrics", timeout=10).text
    assert re.search(r"^embedding_model_name_mismatches_total [1-9]", metrics, re.MULTILINE)
    assert re.search(r'^embedding_inputs_truncated_total\{at="characters"\} [1-9]', metrics, re.MULTILINE)


def test_langchain_openai_embeddings_embed_the_whole_pipeline_batch(
    service: ServiceProcess, reference: np.ndarray
) -> None:
    from langchain_openai import OpenAIEmbeddings

    # As the README says to build it: its default model name, and no tiktoken ids (check_embedding_ctx_length).
    embedder = OpenAIEmbeddings(
        base_url=f"{service.url}/v1", api_key="unused", check_embedding_ctx_length=False, max_retries=0
    )
    assert_same_vectors(embedder.embed_documents(pipeline_batch()), reference)
    np.testing.assert_allclose(embedder.embed_query(TEXTS[0]), embedder.embed_documents([TEXTS[0]])[0], atol=1e-6)


def test_llamaindex_text_embeddings_inference_embeds_the_whole_pipeline_batch(
    service: ServiceProcess, reference: np.ndarray
) -> None:
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    embedder = TextEmbeddingsInference(
        model_name="all-MiniLM-L6-v2", base_url=service.url, embed_batch_size=32, timeout=120
    )
    assert_same_vectors(embedder.get_text_embedding_batch(pipeline_batch()), reference)


def test_haystack_huggingface_api_document_embedder_embeds_the_whole_pipeline_batch(
    service: ServiceProcess, reference: np.ndarray
) -> None:
    from haystack import Document
    from haystack_integrations.components.embedders.huggingface_api import HuggingFaceAPIDocumentEmbedder

    embedder = HuggingFaceAPIDocumentEmbedder(
        api_type="text_embeddings_inference", api_params={"url": service.url}, token=None, normalize=True
    )
    documents = embedder.run(documents=[Document(content=chunk) for chunk in pipeline_batch()])["documents"]
    assert_same_vectors([d.embedding for d in documents], reference)


def test_inference_client_similarity_health_and_endpoint_info(service: ServiceProcess) -> None:
    client = InferenceClient(model=service.url, timeout=60, provider="hf-inference")  # health_check() needs it
    scores = client.sentence_similarity(TEXTS[0], other_sentences=[TEXTS[0], TEXTS[1], "A cat on a mat."])
    assert scores[0] == pytest.approx(1, abs=1e-5)
    assert scores[2] > scores[1]  # the paraphrase is closer than the unrelated sentence
    through_route = requests.post(
        f"{service.url}/similarity",
        json={"inputs": {"source_sentence": TEXTS[0], "sentences": [TEXTS[0], TEXTS[1], "A cat on a mat."]}},
        timeout=30,
    ).json()
    np.testing.assert_allclose(scores, through_route, atol=1e-6)
    assert client.health_check() is True
    info = client.get_endpoint_info()
    assert info["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert info["max_input_length"] == 256 and info["max_client_batch_size"] == 256
    assert None not in (info["model_dtype"], info["served_model_name"], info["max_batch_requests"])


def test_token_vectors_and_decode(service: ServiceProcess) -> None:
    tokens = requests.post(f"{service.url}/tokenize", json={"inputs": TEXTS}, timeout=30).json()
    token_vectors = requests.post(f"{service.url}/embed_all", json={"inputs": TEXTS}, timeout=30)
    assert token_vectors.status_code == 200
    shapes = [np.asarray(text).shape for text in token_vectors.json()]
    assert shapes == [(len(t), 384) for t in tokens]  # one vector per token, special tokens included
    decoded = requests.post(
        f"{service.url}/decode", json={"ids": [[t["id"] for t in text] for text in tokens]}, timeout=30
    )
    assert decoded.json() == ["the cat sits on the mat.", "quarterly revenue grew by 8 % on strong demand."]


@pytest.fixture(scope="module")
def prompted(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[ServiceProcess]:
    """The bundled model as a model with prompts ships it (e5, bge, nomic): its files, and prompts declared in
    its sentence-transformers configuration. Locked down: an API key, one CORS origin, and only its served
    names answered on the OpenAI routes."""
    copy = tmp_path_factory.mktemp("models") / "all-MiniLM-L6-v2-prompted"
    copy.mkdir()
    for source in model_dir.iterdir():
        (copy / source.name).symlink_to(source)
    config = copy / "config_sentence_transformers.json"
    declared = json.loads(config.read_text())
    config.unlink()
    config.write_text(json.dumps({**declared, "prompts": {"query": "query: ", "passage": ""}}))
    log = tmp_path_factory.mktemp("prompted") / "service.log"
    locked = {
        "EMBEDDING_API_KEY": KEY,
        "EMBEDDING_CORS_ORIGINS": ORIGIN,
        "EMBEDDING_SERVED_MODEL_NAME": "text-embedding-3-small,minilm",
        "EMBEDDING_MODEL_NAME_POLICY": "served",
    }
    with running_service(log, {"EMBEDDING_MODEL": str(copy), **locked}) as service:
        yield service


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_prompt_name_puts_the_models_prompt_before_the_text(prompted: ServiceProcess) -> None:
    with InferenceClient(model=prompted.url, timeout=60, token=KEY) as client:
        with_prompt = client.feature_extraction(TEXTS, prompt_name="query")
        written_out = client.feature_extraction([f"query: {text}" for text in TEXTS])
        np.testing.assert_allclose(with_prompt, written_out, atol=1e-5)
        assert np.all(cosine(with_prompt, client.feature_extraction(TEXTS)) < 0.999)
    info = requests.get(f"{prompted.url}/info", timeout=10).json()
    assert info["prompts"] == {"query": "query: "}  # an empty prompt is no prompt
    tokens = requests.post(
        f"{prompted.url}/tokenize", json={"inputs": "x", "prompt_name": "query"}, headers=AUTH, timeout=10
    )
    assert [t["text"] for t in tokens.json()[0]] == ["[CLS]", "query", ":", "x", "[SEP]"]


EMBEDDING_CALLS = [
    ("/", {"inputs": "x"}),
    ("/embed", {"inputs": "x"}),
    ("/embed_all", {"inputs": "x"}),
    ("/similarity", {"inputs": {"source_sentence": "x", "sentences": ["y"]}}),
    ("/v1/embeddings", {"input": "x", "model": "minilm"}),
    ("/embeddings", {"input": "x", "model": "minilm"}),
    ("/tokenize", {"inputs": "x"}),
    ("/decode", {"ids": [101, 102]}),
]


@pytest.mark.parametrize(("path", "body"), EMBEDDING_CALLS, ids=[path for path, _ in EMBEDDING_CALLS])
def test_with_an_api_key_every_route_that_reads_texts_needs_it(prompted: ServiceProcess, path: str, body: Any) -> None:
    url = f"{prompted.url}{path}"
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": KEY}):
        refused = requests.post(url, json=body, headers=headers, timeout=10)
        assert refused.status_code == 401, headers
        assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert requests.post(url, json=body, headers=AUTH, timeout=30).status_code == 200


def test_with_an_api_key_probes_metrics_and_docs_stay_open_and_the_key_is_never_logged(
    prompted: ServiceProcess,
) -> None:
    for path in ("/", "/health", "/ping", "/live", "/ready", "/metrics", "/info", "/openapi.json", "/docs"):
        assert requests.get(f"{prompted.url}{path}", timeout=10).status_code == 200, path
    # Refused before its body is read: nothing of it is held in the memory budget, and it is counted.
    with requests.Session() as session:
        big = session.post(f"{prompted.url}/embed", json={"inputs": "x" * 500_000}, timeout=30)
        assert big.status_code == 401
    metrics = requests.get(f"{prompted.url}/metrics", timeout=10).text
    assert re.search(r'^embedding_rejected_total\{reason="unauthorized"\} [1-9]', metrics, re.MULTILINE)
    document = requests.get(f"{prompted.url}/openapi.json", timeout=10).json()
    assert document["paths"]["/embed"]["post"]["security"] == [{"apiKey": []}]
    assert KEY not in prompted.log_path.read_text()


def test_the_openai_client_with_the_key_and_a_served_name(prompted: ServiceProcess) -> None:
    import openai

    with OpenAI(base_url=f"{prompted.url}/v1", api_key=KEY, max_retries=0) as client:
        answer = client.embeddings.create(model="text-embedding-3-small", input=TEXTS)
        assert answer.model == "all-MiniLM-L6-v2-prompted"  # the model that embedded them, not the name asked for
        assert len(answer.data) == 2
        with pytest.raises(openai.NotFoundError, match="under the names"):
            client.embeddings.create(model="text-embedding-ada-002", input=TEXTS)  # MODEL_NAME_POLICY=served
    with (
        OpenAI(base_url=f"{prompted.url}/v1", api_key="wrong", max_retries=0) as wrong,
        pytest.raises(openai.AuthenticationError),
    ):
        wrong.embeddings.create(model="minilm", input="x")


def test_cors_answers_only_the_configured_origin(prompted: ServiceProcess, service: ServiceProcess) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    allowed = requests.options(f"{prompted.url}/embed", headers=preflight, timeout=10)
    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Authorization" in allowed.headers["Access-Control-Allow-Headers"]
    answer = requests.post(
        f"{prompted.url}/embed", json={"inputs": "x"}, headers={**AUTH, "Origin": ORIGIN}, timeout=30
    )
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "x-truncated-inputs" in answer.headers["Access-Control-Expose-Headers"]
    other = requests.options(
        f"{prompted.url}/embed", headers={**preflight, "Origin": "https://evil.example"}, timeout=10
    )
    assert "Access-Control-Allow-Origin" not in other.headers
    default = requests.options(f"{service.url}/embed", headers=preflight, timeout=10)  # off by default
    assert "Access-Control-Allow-Origin" not in default.headers
