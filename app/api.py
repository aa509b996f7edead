"""Embedding routes: ``POST /embed`` and ``POST /`` (text-embeddings-inference's), ``POST /v1/embeddings``
(OpenAI's), ``POST /tokenize``, ``GET /info``, ``GET /openapi.json``."""

from __future__ import annotations

import io
import itertools
import time
from collections.abc import Callable
from typing import Any, get_args

from flask import Blueprint, Response, g, jsonify, request

from app.activity import OPS_CHECK_HEADER
from app.backend import InputType, ModelInfo, Token
from app.budget import Reservation
from app.components import components
from app.engine import EmbeddingResult
from app.errors import ClientClosed, Unavailable
from app.front import BODY, CLIENT_GONE, RESERVATION
from app.openapi import openapi_document
from app.schemas import (
    EmbeddingRequest,
    InfoLimits,
    InfoResponse,
    TokenizeRequest,
    parse_embed,
    parse_json_object,
    parse_openai,
)
from app.vectors import shape_vectors, to_base64
from app.version import __version__

bp = Blueprint("api", __name__)


@bp.post("/")
@bp.post("/embed")
def embed() -> Response:
    """Embed one text or a list of texts: text-embeddings-inference's route, answer and errors."""
    started = time.perf_counter()
    info = _model_info()
    req = parse_embed(parse_json_object(_body()), components().limits, info)
    result = _run(req, info)
    vectors = shape_vectors(result.embeddings, dimensions=req.dimensions, normalize=req.normalize)
    response = jsonify(vectors)  # float32 rows, written by app.jsonio without Python floats
    response.headers.update(_compute_headers(req, result, info, started))
    return response


@bp.post("/v1/embeddings")
def openai_embeddings() -> Response:
    """OpenAI-compatible embeddings."""
    started = time.perf_counter()
    info = _model_info()
    req = parse_openai(parse_json_object(_body()), components().limits, info)
    result = _run(req, info)
    vectors = shape_vectors(result.embeddings, dimensions=req.dimensions, normalize=True)
    as_base64 = req.encoding_format == "base64"
    # Float rows stay float32 arrays: app.jsonio writes them without Python floats.
    data = [
        {"object": "embedding", "index": i, "embedding": to_base64(v) if as_base64 else v}
        for i, v in enumerate(vectors)
    ]
    tokens = result.total_tokens
    response = jsonify(
        object="list",
        data=data,
        model=info.model_id,
        usage={"prompt_tokens": tokens, "total_tokens": tokens},
    )
    response.headers.update(_compute_headers(req, result, info, started))
    return response


@bp.post("/tokenize")
def tokenize() -> Response:
    """How the model tokenizes each text: text-embeddings-inference's route, answer and errors."""
    info = _model_info()
    req = TokenizeRequest.validated(parse_json_object(_body()), components().limits, info)
    prompt = info.prompts[req.prompt_name] if req.prompt_name else ""
    texts = [prompt + text for text in req.texts]
    tokenized = components().engine.tokenize(texts, add_special_tokens=req.add_special_tokens)
    answer = []
    for tokens, text in zip(tokenized, texts, strict=True):
        to_bytes = _byte_offsets(text)
        answer.append([_tei_token(token, to_bytes) for token in tokens])
    return jsonify(answer)


@bp.get("/info")
def info() -> Response:
    """What this service serves and its limits."""
    parts = components()
    settings = parts.settings
    model = parts.engine.info
    model_id = model.model_id if model else settings.model
    dtype = model.dtype if model else settings.dtype
    answer = InfoResponse(
        version=__version__,
        status=parts.engine.state,
        model=model_id,
        dimensions=model.dimensions if model else None,
        max_seq_length=model.max_seq_length if model else None,
        device=model.device if model else settings.device,
        dtype=dtype,
        dtype_reason=model.dtype_reason if model else None,
        input_types=[kind for kind in get_args(InputType) if model and kind in model.prompts],
        prompts=dict(model.prompts) if model else {},
        batch_size=settings.batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        limits=InfoLimits(
            max_inputs=settings.max_inputs,
            max_input_chars=settings.max_input_chars,
            max_body_bytes=settings.max_body_bytes,
            queue_size=settings.queue_size,
            request_timeout_s=settings.request_timeout_s,
        ),
        memory_policy=settings.memory_policy,
        model_id=model_id,
        model_sha=None,
        model_dtype=dtype,
        model_type={"embedding": {"pooling": model.pooling if model else "unknown"}},
        max_concurrent_requests=settings.http_threads,
        max_input_length=model.max_seq_length if model else None,
        max_batch_requests=settings.batch_size,
        max_client_batch_size=settings.max_inputs,
        auto_truncate=True,
        tokenization_workers=settings.http_threads,
    )
    return jsonify(answer.model_dump(mode="json"))


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI document of this API."""
    parts = components()
    return jsonify(openapi_document(__version__, parts.limits, parts.engine.info, debug=parts.heap_tracer is not None))


def _body() -> bytes:
    """The request body, once: as the front read it (no copy), let go from the request once parsed; or from the
    stream for a request that did not come through the front."""
    body: bytes | None = request.environ.pop(BODY, None)
    if body is None:
        return request.get_data()
    request.environ["wsgi.input"] = io.BytesIO()
    return body


def _model_info() -> ModelInfo:
    engine = components().engine
    if engine.info is None or not engine.ready:
        # Same answer the engine gives; checked first so validation can use the model's limits.
        raise Unavailable("model is not ready", retry_after_s=5)
    return engine.info


def _run(req: EmbeddingRequest, info: ModelInfo) -> EmbeddingResult:
    parts = components()
    g.inputs, g.characters = len(req.texts), sum(len(text) for text in req.texts)
    parts.memory.admit()
    cost = parts.budget.cost
    assert cost is not None  # derived once the model is loaded, which _model_info has checked
    reservation = _reservation()
    body_bytes = request.content_length or 0
    reservation.resize(cost.request_bytes(body_bytes=body_bytes, texts=req.texts, dimensions=req.dimensions))
    if OPS_CHECK_HEADER not in request.headers:  # the ops scripts' own check after a start is not indexing
        parts.activity.record()
    prefix = info.prompts[req.prompt_name] if req.prompt_name else info.prefix_for(req.input_type)
    job = parts.engine.submit(
        req.texts,
        truncate=req.truncate,
        keep_end=req.truncation_direction == "left",
        prefix=prefix,
        request_id=g.get("request_id"),
    )
    req.let_texts_go()  # queued: the engine holds what the model reads of them
    reservation.resize(cost.queued_bytes(job.texts, req.dimensions))
    gone = request.environ.get(CLIENT_GONE)
    if gone is not None:  # served by app.server: a client that disconnects takes its texts off the queue
        gone.subscribe(lambda: job.fail(ClientClosed("the client closed the connection before the answer")))
    return job.wait(parts.settings.request_timeout_s, waited_s=time.perf_counter() - g.started)


def _reservation() -> Reservation:
    """This request's place in the memory budget: the front's (held until the answer is written), or, for a
    request that did not come through it (Flask's test client), one of its own, released after it."""
    held: Reservation | None = request.environ.get(RESERVATION)
    if held is None:
        held = g.own_reservation = components().budget.reservation()
        request.environ[RESERVATION] = held
    return held


@bp.teardown_app_request
def _release_own_reservation(_exc: BaseException | None) -> None:
    held: Reservation | None = g.pop("own_reservation", None)
    if held is not None:
        held.release()


def _compute_headers(req: EmbeddingRequest, result: EmbeddingResult, info: ModelInfo, started: float) -> dict[str, str]:
    """What text-embeddings-inference reports of each request in its headers; times in whole milliseconds."""
    total_ms = str(round((time.perf_counter() - started) * 1000))
    return {
        "x-compute-type": info.device,
        "x-compute-tokens": str(result.total_tokens),
        "x-compute-characters": str(g.characters),
        "x-compute-time": total_ms,
        "x-total-time": total_ms,
        "x-queue-time": str(round(result.queue_s * 1000)),
        "x-inference-time": str(round(result.inference_s * 1000)),
    }


def _byte_offsets(text: str) -> Callable[[int], int]:
    """Character offset in ``text`` -> byte offset in its UTF-8 encoding."""
    if text.isascii():
        return int
    return list(itertools.accumulate((len(char.encode()) for char in text), initial=0)).__getitem__


def _tei_token(token: Token, to_bytes: Callable[[int], int]) -> dict[str, Any]:
    """A token as TEI's /tokenize answers it: offsets in bytes of the UTF-8 text, null for special tokens."""
    start = None if token.start is None else to_bytes(token.start)
    stop = None if token.stop is None else to_bytes(token.stop)
    return {"id": token.id, "text": token.text, "special": token.special, "start": start, "stop": stop}
