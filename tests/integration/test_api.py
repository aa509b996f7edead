"""The embedding API of the real service (gunicorn + the bundled model)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from app.backend import pick_dtype
from loadtest.service import ServiceProcess
from tests.integration.conftest import BUNDLED_WEIGHT_BYTES, held_linear_parameters

DIMS = 384


def embed(service: ServiceProcess, body: object, **headers: str) -> requests.Response:
    return requests.post(f"{service.url}/embed", json=body, headers=headers, timeout=60)


def test_embed_returns_one_unit_vector_per_text(service: ServiceProcess) -> None:
    response = embed(service, {"inputs": ["The cat sits on the mat.", "Quarterly revenue grew by 8%."]})
    assert response.status_code == 200
    vectors = np.array(response.json())  # text-embeddings-inference's answer: an array of vectors
    assert vectors.shape == (2, DIMS)
    assert int(response.headers["x-compute-tokens"]) > 10
    assert response.headers["x-compute-characters"] == str(len("The cat sits on the mat.Quarterly revenue grew by 8%."))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_a_single_string_gives_a_single_embedding(service: ServiceProcess) -> None:
    assert np.array(embed(service, {"inputs": "just one"}).json()).shape == (1, DIMS)


def test_paraphrases_score_higher_than_unrelated_text(service: ServiceProcess) -> None:
    texts = [
        "How do I reset my password?",
        "What are the steps to change my login password?",
        "The volcano erupted and covered the village in ash.",
    ]
    a, b, c = np.array(embed(service, {"inputs": texts}).json())
    assert a @ b > 0.6
    assert a @ b > a @ c + 0.4


def test_dimensions_shortens_and_renormalises(service: ServiceProcess) -> None:
    full = np.array(embed(service, {"inputs": "matryoshka"}).json()[0])
    vector = np.array(embed(service, {"inputs": "matryoshka", "dimensions": 64}).json()[0])
    assert vector.shape == (64,)
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, atol=1e-5)
    np.testing.assert_allclose(vector, full[:64] / np.linalg.norm(full[:64]), atol=1e-5)


def test_truncation_off_refuses_a_text_over_the_model_limit(service: ServiceProcess) -> None:
    long_text = "word " * 400  # about 400 tokens, the model takes 256
    refused = embed(service, {"inputs": ["fine", long_text], "truncate": False})
    assert refused.status_code == 422
    assert "input[1] has 402 tokens" in refused.json()["error"]
    truncated = embed(service, {"inputs": [long_text]})
    assert truncated.status_code == 200
    assert truncated.headers["x-compute-tokens"] == "256"


def test_openai_client_float_and_base64(service: ServiceProcess) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    texts = ["first document", "second, somewhat longer document about embeddings"]
    as_float = client.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2", input=texts)
    as_b64 = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, encoding_format="base64")
    default = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0])  # the client asks for base64
    assert [d.index for d in as_float.data] == [0, 1]
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens > 0
    floats = np.array([d.embedding for d in as_float.data])
    assert floats.shape == (2, DIMS)
    # With encoding_format="base64" the client hands back the base64 text; decode it as OpenAI documents.
    decoded = np.array([np.frombuffer(__import__("base64").b64decode(d.embedding), "<f4") for d in as_b64.data])
    np.testing.assert_allclose(decoded, floats, atol=1e-6)
    np.testing.assert_allclose(np.array(default.data[0].embedding), floats[0], atol=1e-6)
    shortened = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0], dimensions=128)
    assert len(shortened.data[0].embedding) == 128


def test_openai_client_asking_for_another_model_is_told_which_model_answered(service: ServiceProcess) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    answer = client.embeddings.create(model="text-embedding-3-small", input="x")  # EMBEDDING_MODEL_NAME_POLICY=any
    assert answer.model == "sentence-transformers/all-MiniLM-L6-v2"
    with pytest.raises(openai.BadRequestError, match="'model' must be a string"):
        client.embeddings.create(model=7, input="x")  # type: ignore[arg-type]


def test_concurrent_single_texts_are_batched_and_each_caller_gets_its_own_vector(
    service: ServiceProcess, model_dir: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    texts = [f"Document number {i} talks about topic {i % 7} in {i * 3} words or so." for i in range(64)]
    before = service.metric("embedding_batch_size_sum") or 0.0
    before_count = service.metric("embedding_batch_size_count") or 0.0
    with ThreadPoolExecutor(max_workers=16) as pool:
        vectors = list(pool.map(lambda t: embed(service, {"inputs": t}).json()[0], texts))
    texts_batched = (service.metric("embedding_batch_size_sum") or 0.0) - before
    batches = (service.metric("embedding_batch_size_count") or 0.0) - before_count
    assert texts_batched == 64
    assert batches < 64, "some batches should hold more than one request's text"
    local = SentenceTransformer(str(model_dir), device="cpu").encode(texts, normalize_embeddings=True)
    dtype = requests.get(f"{service.url}/info", timeout=10).json()["dtype"]
    if dtype == "float32":
        np.testing.assert_allclose(np.array(vectors), local, atol=1e-4)
    else:  # bfloat16 where the CPU computes it natively: held to the start-up probe's bound against float32
        assert (np.sum(np.array(vectors) * local, axis=1) >= 0.999).all()


def test_info_reports_model_limits_and_version(service: ServiceProcess) -> None:
    info = requests.get(f"{service.url}/info", timeout=5).json()
    assert info["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert info["dimensions"] == DIMS
    assert info["max_seq_length"] == 256
    assert info["batch_size"] == 32
    assert info["limits"]["max_inputs"] == 256
    assert info["version"] == "0.1.0"
    expected, why = pick_dtype("auto", "cpu")  # what EMBEDDING_DTYPE=auto finds on this machine's CPU
    assert (info["dtype"], info["dtype_reason"].split(";")[0]) == (expected, why)
    assert info["backend"] == "torch" and "; recorded forward graph (" in info["backend_reason"]
    # What was measured, and when: at this start, or read from what an earlier start of the session measured.
    (loaded,) = service.events("model.loaded")
    assert (info["calibration"], info["calibrated_at"]) == (loaded["calibration"], loaded["calibrated_at"])
    assert info["calibration"] in ("measured", "cached") and info["calibrated_at"].endswith("Z")
    labels = {"model": "sentence-transformers/all-MiniLM-L6-v2", "device": "cpu", "dtype": expected}
    assert service.metric("embedding_model_info", **labels) == 1


def test_metrics_show_requests_queue_and_batches(service: ServiceProcess) -> None:
    embed(service, {"inputs": ["counted"]})
    assert (service.metric("embedding_requests_total", route="/embed", code="200") or 0) >= 1
    assert service.metric("embedding_queue_depth") == 0
    assert (service.metric("embedding_inputs_total") or 0) >= 1
    assert (service.metric("embedding_tokens_total") or 0) >= 1
    assert service.metric("embedding_model_info", model="sentence-transformers/all-MiniLM-L6-v2", device="cpu") == 1
    assert (service.metric("process_resident_memory_bytes") or 0) > 100e6
    assert service.metric("python_gc_objects_collected_total", generation="0") is not None


def test_request_ids_are_echoed_and_logged(service: ServiceProcess) -> None:
    response = embed(service, {"inputs": "traced"}, **{"X-Request-ID": "trace-abc-123"})
    assert response.headers["X-Request-ID"] == "trace-abc-123"
    generated = embed(service, {"inputs": "untraced"}).headers["X-Request-ID"]
    completed = {e["request_id"]: e for e in service.events("request.completed")}
    assert completed["trace-abc-123"]["route"] == "/embed"
    assert completed["trace-abc-123"]["status"] == 200
    assert generated in completed


def test_log_lines_are_json_with_the_design_events(service: ServiceProcess) -> None:
    embed(service, {"inputs": ["logged", "twice"]})
    for event in service.events():
        assert {"timestamp", "level", "event"} <= set(event)
    started = service.events("service.started")
    assert started and started[0]["version"] == "0.1.0"
    assert "admin_token" not in started[0]["settings"]
    loaded = service.events("model.loaded")
    assert loaded and loaded[0]["dimensions"] == DIMS
    batch = service.events("batch.completed")[-1]
    assert {"size", "tokens", "duration_ms", "rss_delta_bytes"} <= set(batch)


def test_the_ops_scripts_check_is_not_counted_as_activity(service: ServiceProcess) -> None:
    """ops/upgrade.sh refuses while /activity counts requests: its own check after a start must not count."""

    def counted() -> int:
        answer = requests.get(f"{service.url}/activity", params={"minutes": 1440}, timeout=10)
        return int(answer.json()["requests"])

    before = counted()
    assert embed(service, {"inputs": "upgrade check"}, **{"X-Ops-Check": "1"}).status_code == 200
    assert counted() == before
    assert embed(service, {"inputs": "indexing"}).status_code == 200
    assert counted() == before + 1


def test_memory_breakdown_adds_up_and_orders_the_allocator_accounts(service: ServiceProcess) -> None:
    embed(service, {"inputs": [f"text number {i} " * (i % 40 + 1) for i in range(64)]})
    breakdown = requests.get(f"{service.url}/memory", timeout=10).json()["breakdown"]
    kinds = breakdown["rss_by_kind"]
    assert kinds["anon"] + kinds["file"] + kinds["shmem"] == pytest.approx(kinds["rss"], rel=0.01)
    assert kinds["file"] > 50e6  # the memory-mapped weights (90.9 MB) stay file-backed
    assert breakdown["weight_bytes"] == BUNDLED_WEIGHT_BYTES - 2 * held_linear_parameters(service)
    allocator = breakdown["allocator"]
    assert allocator["name"] == "jemalloc"  # make test installs it; the service re-executes under it
    accounts = allocator["accounts"]
    assert 0 < accounts["allocated"] <= accounts["active"] <= accounts["resident"] <= accounts["mapped"]
    assert allocator["free_but_kept_bytes"] == accounts["resident"] - accounts["allocated"]
    exported = service.metric("embedding_allocator_bytes", allocator="jemalloc", account="allocated")
    assert exported is not None
    assert exported > 0
    assert service.metric("embedding_memory_rss_kind_bytes", kind="anon") > 100e6


def test_a_cleanup_gives_back_what_the_allocator_kept(service: ServiceProcess) -> None:
    def free_but_kept() -> int:
        memory = requests.get(f"{service.url}/memory", timeout=10).json()
        kept: int = memory["breakdown"]["allocator"]["free_but_kept_bytes"]
        return kept

    embed(service, {"inputs": [("a longer passage of text " * (i % 50 + 1)).strip() for i in range(96)]})
    before = free_but_kept()
    assert before > 0
    cleanup = requests.post(f"{service.url}/cleanup", timeout=60)
    if cleanup.status_code == 429:  # another test's manual cleanup within the manual interval
        time.sleep(float(cleanup.headers["Retry-After"]))
        cleanup = requests.post(f"{service.url}/cleanup", timeout=60)
    assert cleanup.status_code == 200
    reduced = cleanup.json()["reduced_bytes"]  # the record names the accounts it reduced
    given_back = reduced["jemalloc.resident"] - reduced.get("jemalloc.allocated", 0)
    after = free_but_kept()
    print(f"\nfree but kept: {before / 1e6:.1f} MB before, {after / 1e6:.1f} MB after; purged {given_back} B")
    # Measured inside the cleanup, around its purge: the requests' own /memory calls allocate between the
    # two readings above, and the trims between batches may already have returned most of it.
    assert given_back > 0
