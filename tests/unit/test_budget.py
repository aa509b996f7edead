"""The memory budget: what a request and a batch cost, the capacity derived from the thresholds, reservations
that refuse at once, and a route that holds its request's cost (the app with a fake backend)."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
import tracemalloc

import pytest

from app.backend import ModelInfo, ModelShape
from app.budget import (
    HEADROOM_SHARE,
    MIN_CAPACITY_BYTES,
    BudgetExhausted,
    CostModel,
    MemoryBudget,
    TooCostly,
    body_estimate,
    derive,
    parse_bytes,
)
from app.config import Settings
from app.metrics import Metrics
from tests.doubles import FakeBackend, serving

MB = 1_000_000
MINILM = CostModel(dimensions=384, max_tokens=256, hidden=384, intermediate=1536, heads=12)
BERT_BASE = CostModel(dimensions=768, max_tokens=384, hidden=768, intermediate=3072, heads=12)


def test_a_batch_costs_its_padded_tokens_times_the_models_width() -> None:
    # Measured peaks (VmHWM around one batch, float32, jemalloc): 21.5 KB per padded token for all-MiniLM-L6-v2,
    # 43 KB for a BERT of 768 x 12 layers. The estimate covers both, without doubling them.
    assert 21_500 <= MINILM.activation_bytes_per_token <= 1.25 * 21_500
    assert 43_000 <= BERT_BASE.activation_bytes_per_token <= 1.25 * 43_000
    assert MINILM.batch_bytes(2048) == 2048 * MINILM.activation_bytes_per_token
    eager = CostModel(dimensions=384, max_tokens=512, hidden=384, intermediate=1536, heads=12, eager_attention=True)
    assert eager.activation_bytes_per_token == MINILM.activation_bytes_per_token + 2 * 12 * 512 * 4
    assert MINILM.tokens_within(MINILM.batch_bytes(1000)) == 1000


def test_the_cost_model_reads_the_models_shape() -> None:
    info = ModelInfo("m", 768, 384, "cpu", shape=ModelShape(hidden=768, intermediate=3072, layers=12, heads=12))
    assert CostModel.for_model(info) == BERT_BASE


def test_a_request_costs_what_it_carries() -> None:
    texts = ["x" * 32_760] * 512
    body = len(json.dumps({"inputs": texts}))
    cost = MINILM.request_bytes(body_bytes=body, texts=texts)
    held = 512 * sys.getsizeof(texts[0])
    assert 2 * body + held < cost < 2 * body + held + 10 * MB  # the pieces, vectors and answer: a few MB
    wide = ["€" * 32_760] * 512  # two bytes a character as Python holds them
    assert MINILM.request_bytes(body_bytes=body, texts=wide) - cost >= 512 * 32_760
    short = MINILM.request_bytes(body_bytes=40, texts=["a short query"])
    assert short < 40_000
    assert BERT_BASE.request_bytes(body_bytes=40, texts=["q"], dimensions=64) < BERT_BASE.request_bytes(
        body_bytes=40, texts=["q"]
    )


def test_the_budget_is_the_room_above_the_baseline_less_one_batch() -> None:
    derived = derive(MINILM, baseline=600 * MB, ceiling=2000 * MB, max_batch_tokens=2048)
    reserve = MINILM.batch_bytes(2048)
    assert derived.batch_reserve_bytes == reserve
    assert derived.capacity_bytes == int((1400 * MB - reserve) * (1 - HEADROOM_SHARE))
    assert derived.max_batch_tokens == 2048
    configured = derive(MINILM, baseline=600 * MB, ceiling=650 * MB, max_batch_tokens=2048, configured=5 * MB)
    assert configured.capacity_bytes == 5 * MB
    assert configured.max_batch_tokens == 2048  # set by hand: the configured batches stay, however little room


def test_little_room_makes_batches_smaller_and_never_leaves_no_budget() -> None:
    tight = derive(MINILM, baseline=600 * MB, ceiling=650 * MB, max_batch_tokens=2048)
    assert tight.max_batch_tokens < 2048  # one batch fits in half the room
    assert MINILM.batch_bytes(tight.max_batch_tokens) <= 25 * MB
    none = derive(MINILM, baseline=700 * MB, ceiling=650 * MB, max_batch_tokens=2048)
    assert none.max_batch_tokens == MINILM.max_tokens  # one text of the longest still runs
    assert none.capacity_bytes == MIN_CAPACITY_BYTES


def test_reservations_refuse_at_once_when_there_is_no_room() -> None:
    metrics = Metrics()
    budget = MemoryBudget(100, metrics)
    first, second = budget.reservation(), budget.reservation()
    first.resize(60)
    with pytest.raises(BudgetExhausted) as caught:
        second.resize(50)
    assert (caught.value.status, caught.value.headers()) == (429, {"Retry-After": "2"})
    assert second.bytes == 0 and budget.used == 60  # a refusal holds nothing
    with pytest.raises(TooCostly) as never:
        second.resize(101)
    assert never.value.status == 413
    assert "more than the service's whole budget" in never.value.message
    first.resize(10)  # shrinking never refuses
    second.resize(90)
    assert budget.used == 100 and budget.peak == 100
    first.release()
    first.release()  # twice: nothing more
    second.release()
    assert budget.used == 0
    assert metrics.registry.get_sample_value("embedding_rejected_total", {"reason": "budget"}) == 1
    assert metrics.registry.get_sample_value("embedding_rejected_total", {"reason": "too_costly"}) == 1
    assert metrics.registry.get_sample_value("embedding_memory_budget_bytes") == 100


def test_reservations_from_many_threads_never_pass_the_capacity() -> None:
    budget = MemoryBudget(1000, Metrics())
    seen: list[int] = []

    def churn() -> None:
        reservation = budget.reservation()
        for size in range(0, 600, 7):
            with contextlib.suppress(BudgetExhausted):
                reservation.resize(size)
            seen.append(budget.used)
        reservation.release()

    threads = [threading.Thread(target=churn) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(seen) <= 1000 and budget.used == 0


def test_a_route_holds_its_requests_cost_and_refuses_what_does_not_fit() -> None:
    backend = FakeBackend(dimensions=1024)  # answers of 1024 floats a text: what a queued request holds
    settings = Settings(model="fake", max_inputs=64, memory_budget_bytes=3_000_000, request_timeout_s=10)
    with serving(settings, backend) as app:
        client = app.test_client()
        budget = app.extensions["embedding"].budget
        cost = budget.cost
        assert budget.capacity == 3_000_000 and cost is not None
        held, asked = ["a short text"] * 64, ["another short text"] * 64
        asked_cost = cost.request_bytes(body_bytes=len(json.dumps({"input": asked})), texts=asked)
        assert asked_cost <= budget.capacity < cost.queued_bytes(held) + asked_cost  # each alone fits, not both
        assert client.post("/embed", json={"inputs": held}).status_code == 200 and budget.used == 0
        too_big = client.post("/embed", json={"inputs": ["word " * 4000] * 64})  # 2.6 MB of body: never fits
        assert (too_big.status_code, too_big.get_json()["error_type"]) == (413, "Validation")
        backend.gate.clear()  # hold the first request in the model
        holder = threading.Thread(target=client.post, args=("/embed",), kwargs={"json": {"inputs": held}})
        holder.start()
        deadline = time.monotonic() + 5
        while budget.used != cost.queued_bytes(held):  # queued: its body and texts let go, its answer still to come
            assert time.monotonic() < deadline, budget.used
            time.sleep(0.01)
        busy = client.post("/v1/embeddings", json={"input": asked})
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "2"
        assert "memory budget for work in flight is in use" in busy.get_json()["error"]["message"]
        backend.gate.set()
        holder.join(5)
        assert budget.used == 0
        assert client.post("/v1/embeddings", json={"input": asked}).status_code == 200


def test_the_front_reserves_three_times_a_body_before_parsing_it() -> None:
    assert body_estimate(1000) == 3000


def test_a_queued_request_lets_its_texts_go() -> None:
    backend = FakeBackend()
    with serving(Settings(model="fake", max_inputs=64), backend) as app:
        client = app.test_client()
        texts = [f"{i} " + "word " * 4000 for i in range(64)]  # 1.28 MB of text, 1.28 MB of body
        body = json.dumps({"inputs": texts}).encode()
        del texts
        backend.gate.clear()
        blocker = threading.Thread(target=client.post, args=("/embed",), kwargs={"json": {"inputs": ["blocker"]}})
        blocker.start()
        deadline = time.monotonic() + 5
        engine = app.extensions["embedding"].engine
        while engine.is_idle() or engine.queue_depth:  # until the blocker is in the model, held there
            assert time.monotonic() < deadline
            time.sleep(0.01)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            sender = threading.Thread(
                target=client.post, args=("/embed",), kwargs={"data": body, "content_type": "application/json"}
            )
            sender.start()
            while app.extensions["embedding"].engine.queue_depth < 64:
                assert time.monotonic() < deadline + 10
                time.sleep(0.01)
            time.sleep(0.1)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            backend.gate.set()
            blocker.join(5)
            sender.join(5)
        # Queued, it holds what the model reads (64 short pieces) and the body the test client keeps; its parsed
        # texts (1.28 MB more) are let go.
        assert held < len(body) + 400_000, held


def test_a_body_of_numbers_costs_its_parsed_values_not_three_times_its_bytes() -> None:
    """Measured with tracemalloc: 2.1 million ids of a 12.6 MB body held about 100 MB while parsed and validated."""
    import json
    import tracemalloc

    from app.schemas import parse_json_object

    ids = json.dumps({"ids": [[2023] * 4096] * 64}).encode()
    tracemalloc.start()
    parse_json_object(ids)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert body_estimate(len(ids)) < peak <= parse_bytes(ids)
    from loadtest.largest import documents

    texts = json.dumps({"inputs": documents(16, 32_760)}).encode()
    assert parse_bytes(texts) == body_estimate(len(texts))  # whole documents: the body's estimate holds
