"""EMBEDDING_BACKEND on the real service: OpenVINO runs the same model converted at start and keeps its vectors,
a restart reads the converted copy instead of converting again, auto decides from what it measured, and the
default allocator (jemalloc, which OpenVINO cannot run beside) keeps auto on torch and says why. torch's forward
runs as a recorded graph only where it gives the eager forward's vectors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from sentence_transformers import SentenceTransformer

from app.backend import TRACE_TOLERANCE, Prepared, SentenceTransformerBackend, TracedForward, cosines, resolve_model
from loadtest.corpus import build_corpus, sample
from loadtest.fidelity import MIN_COSINE, MIN_KNN_OVERLAP, knn_overlap
from loadtest.service import BUNDLED_MODEL, ServiceProcess, running_service
from tests.integration.conftest import BUNDLED_WEIGHT_BYTES, held_linear_parameters

pytestmark = [pytest.mark.slow, pytest.mark.alone]  # start-up measures: calibration, graph, weights


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("converted")


@pytest.fixture(scope="module")
def openvino(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Iterator[ServiceProcess]:
    env = {"EMBEDDING_BACKEND": "openvino", "EMBEDDING_CACHE_DIR": str(cache)}
    with running_service(tmp_path_factory.mktemp("openvino") / "service.log", env) as service:
        yield service


def info(service: ServiceProcess) -> dict[str, str]:
    answer: dict[str, str] = requests.get(f"{service.url}/info", timeout=10).json()
    return answer


def test_openvino_serves_the_models_vectors(openvino: ServiceProcess) -> None:
    """The whole path through the service on OpenVINO against sentence-transformers' own float32 encode()."""
    texts = [d.text for d in sample(build_corpus(), 64, seed=2)]
    answer = requests.post(f"{openvino.url}/embed", json={"inputs": texts}, timeout=120)
    assert answer.status_code == 200, answer.text
    served = np.asarray(answer.json(), dtype=np.float32)
    library = SentenceTransformer(resolve_model(BUNDLED_MODEL).location, device="cpu")
    reference = library.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    cos = cosines(reference, served)
    described = info(openvino)
    print(f"\nopenvino at {described['dtype']}: min cosine {cos.min():.5f}; {described['backend_reason']}")
    assert described["backend"] == "openvino"
    assert cos.min() >= MIN_COSINE
    assert knn_overlap(reference, served) >= MIN_KNN_OVERLAP
    assert openvino.metric("embedding_model_info", backend="openvino") == 1
    (allocator,) = openvino.events("memory.allocator")
    assert allocator["allocator"] == "glibc" and "jemalloc" in allocator["hint"]
    # GET /memory adds up with the runtime's own allocations, which are glibc's: the pages its arenas hold in RAM
    # cover what is in use (a few MB allocated and not yet written aside) and lie within the anonymous RSS.
    breakdown = requests.get(f"{openvino.url}/memory", timeout=10).json()["breakdown"]
    accounts, kept = breakdown["allocator"]["accounts"], breakdown["allocator"]["free_but_kept_bytes"]
    print(f"glibc accounts on openvino: {accounts}, anon {breakdown['rss_by_kind']['anon']}")
    assert accounts["in_use"] - 16e6 <= accounts["resident"] <= breakdown["rss_by_kind"]["anon"]
    assert kept == max(accounts["resident"] - accounts["in_use"], 0)


def test_torchs_weights_are_let_go_when_openvino_runs(openvino: ServiceProcess, service: ServiceProcess) -> None:
    """OpenVINO holds its own copy of the weights: torch's checkpoint is no longer mapped into the worker, as it
    is on torch (and its weights still counted for GET /memory)."""
    mapped = {
        each: Path(f"/proc/{each.worker_pid()}/maps").read_text().count("model.safetensors")
        for each in (openvino, service)
    }
    print(
        f"\nworker RSS: {openvino.worker_rss() / 1e6:.0f} MB on openvino, {service.worker_rss() / 1e6:.0f} MB on torch"
    )
    assert mapped[service] >= 1
    assert mapped[openvino] == 0
    weights = [requests.get(f"{each.url}/memory", timeout=10).json()["breakdown"]["weight_bytes"] for each in mapped]
    # OpenVINO's copy holds the float32 weights; torch holds its linear layers' at a reduced dtype.
    assert weights == [BUNDLED_WEIGHT_BYTES, BUNDLED_WEIGHT_BYTES - 2 * held_linear_parameters(service)]


def test_a_restart_reads_the_converted_model_instead_of_converting_again(
    openvino: ServiceProcess, cache: Path, tmp_path: Path
) -> None:
    first = info(openvino)["backend_reason"]
    assert "converted in" in first and "cached in" in first  # a fresh cache directory: converted, then kept
    (converted,) = cache.glob("openvino/*/model.xml")
    env = {"EMBEDDING_BACKEND": "openvino", "EMBEDDING_CACHE_DIR": str(cache)}
    with running_service(tmp_path / "again.log", env) as again:
        reason = info(again)["backend_reason"]
    print(f"\nfirst start: {first}\nsecond start: {reason}")
    assert f"read the converted model cached in {converted.parent}" in reason


def test_auto_picks_by_what_it_measured_and_jemalloc_keeps_torch(tmp_path: Path) -> None:
    with running_service(tmp_path / "glibc.log", {"EMBEDDING_ALLOCATOR": "glibc"}) as glibc:
        measured = info(glibc)
    print(f"\nauto on glibc: {measured['backend']}: {measured['backend_reason']}")
    speed = re.search(r"openvino ran at ([\d.]+)x torch's speed", measured["backend_reason"])
    assert speed is not None
    assert measured["backend"] == ("openvino" if float(speed.group(1)) >= 1.05 else "torch")
    with running_service(tmp_path / "jemalloc.log") as default:
        kept = info(default)
    assert kept["backend"] == "torch"
    assert "cannot run beside jemalloc" in kept["backend_reason"]


def torch_backend(dtype: str, cache: Path) -> tuple[SentenceTransformerBackend, str]:
    """The bundled model on torch at ``dtype``, measured at its start (``cache``: an empty directory)."""
    backend = SentenceTransformerBackend(BUNDLED_MODEL, "cpu", dtype=dtype, backend="torch", cache_dir=str(cache))
    return backend, backend.load().backend_reason


def outputs(backend: SentenceTransformerBackend, batches: list[list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each batch's pooled vectors and its token vectors (the /embed_all path), through the engine's calls."""
    found = []
    for texts in batches:
        prepared = backend.prepare(texts)
        encoded = backend.encode(prepared)
        found.append((backend.finish(encoded), np.concatenate(backend.finish_tokens(encoded, prepared.token_counts))))
    return found


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_serves_a_recorded_graph_that_gives_the_eager_forwards_vectors(dtype: str, tmp_path: Path) -> None:
    """torch's forward pass runs as a recorded graph (no Python between its operations, no GIL): on batches of
    every shape the engine makes (one text to 32, short to the longest), the same vectors as the eager forward,
    to the last bit measured, and the graph is what computed them."""
    backend, reason = torch_backend(dtype, tmp_path)
    assert "recorded forward graph" in reason
    graph = backend._traced
    assert graph is not None
    texts = [d.text for d in sample(build_corpus(), 48, seed=5)]
    batches = [texts[:1], texts[1:3], texts[3:16], texts[16:48], [" ".join(["long"] * 400)]]
    replayed: list[int] = []
    recorded = graph._graph
    graph._graph = lambda *tensors: replayed.append(len(tensors)) or recorded(*tensors)
    traced = outputs(backend, batches)
    assert len(replayed) == len(batches)
    backend._traced = None
    eager = outputs(backend, batches)
    for (vectors, tokens), (eager_vectors, eager_tokens) in zip(traced, eager, strict=True):
        assert vectors.shape == eager_vectors.shape and tokens.shape == eager_tokens.shape
        assert np.abs(vectors - eager_vectors).max() <= TRACE_TOLERANCE
        assert np.abs(tokens - eager_tokens).max() <= TRACE_TOLERANCE


def test_a_graph_that_does_not_hold_for_other_shapes_is_not_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The tracer's hazard: a shape read as a Python number becomes a constant of the graph. Recorded through a
    module that cuts every batch to the recorded batch's length, the graph gives other token vectors on longer
    batches: the start-up comparison finds it and the eager forward serves, with the reason said."""
    import torch

    record = TracedForward.record

    class CutToRecordedLength:
        def __init__(self, model: Any, length: int) -> None:
            self.model, self.length, self.device = model, length, model.device

        def forward(self, features: dict[str, object]) -> dict[str, object]:
            cut = {k: v[:, : self.length] if isinstance(v, torch.Tensor) else v for k, v in features.items()}
            return self.model.forward(cut)  # type: ignore[no-any-return]

    def baked(model: Any, example: Prepared, dtype: str) -> TracedForward:
        return record(CutToRecordedLength(model, int(example.features["input_ids"].shape[1])), example, dtype)

    monkeypatch.setattr(TracedForward, "record", baked)
    backend, reason = torch_backend("float32", tmp_path)
    print(f"\n{reason}")
    assert backend._traced is None
    assert "eager forward (the recorded graph gave " in reason
    long_text = [" ".join(["long"] * 400)]
    ((vectors, _),) = outputs(backend, [long_text])
    library = SentenceTransformer(resolve_model(BUNDLED_MODEL).location, device="cpu")
    reference = library.encode(long_text, convert_to_numpy=True, normalize_embeddings=True)
    assert cosines(reference, vectors).min() >= 0.99999


def linear_weight_dtypes(backend: SentenceTransformerBackend) -> set[str]:
    import torch

    return {str(m.weight.dtype) for m in backend._model.modules() if isinstance(m, torch.nn.Linear)}


def test_linear_weights_are_held_in_bfloat16_where_the_vectors_stay_the_same(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """At bfloat16 the linear layers' weights are cast once at start instead of at every forward pass: the same
    vectors to the bit, on batches of every shape, with less memory for the weights."""
    texts = [d.text for d in sample(build_corpus(), 40, seed=8)]
    batches = [texts[:1], texts[1:8], texts[8:40], [" ".join(["long"] * 400)]]
    held = SentenceTransformerBackend(BUNDLED_MODEL, "cpu", dtype="bfloat16", backend="torch", cache_dir=str(tmp_path))
    said = held.load()
    print(f"\n{said.dtype_reason}")
    monkeypatch.setattr(SentenceTransformerBackend, "_hold_linear_weights", lambda self, check=True: "")
    cast = SentenceTransformerBackend(
        BUNDLED_MODEL, "cpu", dtype="bfloat16", backend="torch", cache_dir=str(tmp_path / "cast")
    )
    cast.load()
    assert linear_weight_dtypes(held) == {"torch.bfloat16"} and linear_weight_dtypes(cast) == {"torch.float32"}
    assert "linear weights held in bfloat16" in said.dtype_reason
    dropped = re.search(r"(\d+) MB of their float32 pages out of RSS", said.dtype_reason)
    assert dropped is not None and int(dropped.group(1)) >= 40  # the checkpoint's pages of 43 MB of linear weights
    # The batch planner's rate of exchange, measured as it serves (bfloat16: AMX makes a slot cheap, a pass not).
    assert re.fullmatch(r"[\d.]+ ms a batch \+ [\d.]+ us a padded token", said.batch_cost), said.batch_cost
    assert 8 <= said.batch_overhead_tokens <= 512
    assert said.weight_bytes is not None and said.weight_bytes < cast.weight_bytes() - 20e6
    for (vectors, tokens), (cast_vectors, cast_tokens) in zip(
        outputs(held, batches), outputs(cast, batches), strict=True
    ):
        assert np.array_equal(vectors, cast_vectors) and np.array_equal(tokens, cast_tokens)


@pytest.mark.parametrize(("upcast", "said"), [(True, "the probe moved"), (False, "the probe failed: RuntimeError")])
def test_linear_weights_stay_float32_where_holding_them_would_move_the_vectors(
    monkeypatch: pytest.MonkeyPatch, upcast: bool, said: str, tmp_path: Path
) -> None:
    """A model with a linear layer that computes in float32 outside autocast (a custom module's head, say):
    holding its weight in bfloat16 would round it (the probe's vectors move) or fail (float32 input, bfloat16
    weight): the weights stay as they were, with the reason said."""
    import torch

    hold = SentenceTransformerBackend._hold_linear_weights

    def with_a_float32_layer(self: SentenceTransformerBackend, check: bool = True) -> str:
        layer = next(m for m in self._model.modules() if isinstance(m, torch.nn.Linear))

        def outside_autocast(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", enabled=False):
                if upcast:
                    return torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
                return torch.nn.functional.linear(x.float(), layer.weight, layer.bias)

        layer.forward = outside_autocast  # type: ignore[method-assign]
        return hold(self, check=check)

    monkeypatch.setattr(SentenceTransformerBackend, "_hold_linear_weights", with_a_float32_layer)
    backend = SentenceTransformerBackend(
        BUNDLED_MODEL, "cpu", dtype="bfloat16", backend="torch", cache_dir=str(tmp_path)
    )
    reason = backend.load().dtype_reason
    print(f"\n{reason}")
    assert f"linear weights cast at every pass (held in bfloat16, {said}" in reason
    assert linear_weight_dtypes(backend) == {"torch.float32"}
