"""The API's routes: text-embeddings-inference's (``POST /``, ``/embed``, ``/embed_all``, ``/similarity``,
``/tokenize``, ``/decode``, ``GET /info``), OpenAI's (``POST /v1/embeddings`` and ``/embeddings``), and the
API's description (``/openapi.json``, ``/api-doc/openapi.json``, ``/docs``). :mod:`app.routes` lists them."""

from __future__ import annotations

import io
import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import Any, get_args

import numpy as np
import orjson
import structlog
from flask import Blueprint, Response, g, jsonify, request, send_from_directory

from app.activity import OPS_CHECK_HEADER
from app.backend import InputType, ModelInfo, Token
from app.budget import (
    ANSWER_COPIES,
    DECODE_BYTES_PER_ID,
    Reservation,
    held_text_bytes,
    parse_bytes,
    token_rows_bytes,
    tokenizing_bytes,
)
from app.components import components
from app.docs import DOCS_ASSETS, DOCS_PAGE, swagger_ui_dir
from app.engine import EmbeddingResult
from app.errors import ClientClosed, NotFound, Unavailable, UnsupportedMediaType
from app.front import BODY, CLIENT_GONE, RESERVATION
from app.openapi import openapi_document
from app.schemas import (
    DecodeRequest,
    EmbedAllRequest,
    EmbeddingRequest,
    EmbedRequest,
    InfoLimits,
    InfoResponse,
    SimilarityRequest,
    TokenizeRequest,
    model_names,
    parse_json_object,
    parse_openai,
    quote,
)
from app.vectors import shape_vectors, to_base64
from app.version import __version__

bp = Blueprint("api", __name__)
log = structlog.get_logger("app.api")

BUILD_SHA_VARIABLE = "EMBEDDING_BUILD_SHA"
"""The commit the image was built from (TEI's ``sha`` in ``/info``), set by the Dockerfile's build argument."""
DOCKER_LABEL_VARIABLE = "EMBEDDING_DOCKER_LABEL"
"""The image's label (TEI's ``docker_label``), set by the Dockerfile's build argument."""

JSON_MEDIA_TYPE = "application/json"
"""The one media type of request bodies."""

MAX_NAMES_LOGGED = 64
"""Model names a request asked for that are logged once each (the rest are only counted)."""
_names_logged: set[str] = set()
_names_lock = threading.Lock()


@bp.post("/")
def embed_root() -> Response:
    """TEI's default route: embeddings (``/embed``'s request), or similarities for a body whose ``inputs`` is an
    object, as ``InferenceClient.sentence_similarity`` posts to the base URL."""
    body = _json_body()
    if isinstance(body.get("inputs"), dict):
        return _similarity(body)
    return _embed(body)


@bp.post("/embed")
def embed() -> Response:
    """Embed one text or a list of texts: text-embeddings-inference's route, answer and errors."""
    return _embed(_json_body())


def _embed(body: dict[str, Any]) -> Response:
    started = time.perf_counter()
    info = _model_info()
    req = EmbedRequest.parse(body, components().limits, info)
    body.clear()  # the request holds the texts now: once they are queued, nothing else does
    result = _run(req, info)
    vectors = shape_vectors(result.embeddings, dimensions=req.dimensions, normalize=req.normalize)
    response = jsonify(vectors)  # float32 rows, written by app.jsonio without Python floats
    response.headers.update(_compute_headers(req, result, info, started))
    return response


@bp.post("/embed_all")
def embed_all() -> Response:
    """Each text's token vectors (the transformer's last hidden state, special tokens included): TEI's route."""
    started = time.perf_counter()
    info = _model_info()
    req = EmbedAllRequest.parse(_json_body(), components().limits, info)
    result = _run(req, info)
    assert result.token_vectors is not None
    response = jsonify(result.token_vectors)
    response.headers.update(_compute_headers(req, result, info, started))
    return response


@bp.post("/similarity")
def similarity() -> Response:
    """The cosine similarity of a source sentence to each of the others: TEI's route."""
    return _similarity(_json_body())


def _similarity(body: dict[str, Any]) -> Response:
    started = time.perf_counter()
    info = _model_info()
    req = SimilarityRequest.parse(body, components().limits, info)
    body.clear()
    result = _run(req, info)
    vectors = shape_vectors(result.embeddings, dimensions=None, normalize=True)
    response = jsonify(np.clip(vectors[1:] @ vectors[0], -1.0, 1.0))
    response.headers.update(_compute_headers(req, result, info, started))
    return response


@bp.post("/v1/embeddings")
@bp.post("/embeddings")
def openai_embeddings() -> Response:
    """OpenAI-compatible embeddings, with and without the ``/v1`` of the client's base URL."""
    started = time.perf_counter()
    info = _model_info()
    limits = components().limits
    req = parse_openai(_json_body(), limits, info)
    if req.model is not None and req.model not in model_names(info, limits.served_names):
        _count_name_mismatch(req.model, info)
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
        model=info.model_id,  # the model that embedded the texts, whatever name the request used
        usage={"prompt_tokens": tokens, "total_tokens": tokens},
    )
    response.headers.update(_compute_headers(req, result, info, started))
    return response


def _count_name_mismatch(asked: str, info: ModelInfo) -> None:
    """Count a request that named another model (answered by this one under the ``any`` policy); log each name
    once, up to :data:`MAX_NAMES_LOGGED` names."""
    components().metrics.model_name_mismatches.inc()
    with _names_lock:
        if asked in _names_logged or len(_names_logged) >= MAX_NAMES_LOGGED:
            return
        _names_logged.add(asked)
    log.warning(
        "request.model_name_mismatch",
        asked=quote(asked),
        served=info.model_id,
        message="answered by the served model (EMBEDDING_MODEL_NAME_POLICY=any); logged once per name",
    )


@bp.post("/tokenize")
def tokenize() -> Response:
    """How the model tokenizes each text: text-embeddings-inference's route, answer and errors.

    An answer is about 66 bytes of JSON per token, 15 to 35 times its request, and each token is a few Python
    objects while it is written: the request is admitted and held in the memory budget like an embedding
    request, its texts tokenized one at a time, each text's part of the answer written before the next one
    is read, and its reservation grows with the answer (a 413 or 429 the moment it no longer fits)."""
    info = _model_info()
    parts = components()
    req = TokenizeRequest.validated(_json_body(), parts.limits, info)
    reservation = _admitted()
    prompt = info.prompts[req.prompt_name] if req.prompt_name else ""
    held, answer = held_text_bytes(request.content_length or 0, req.texts), 0
    pieces = [b"["]
    for given in req.texts:
        text = prompt + given
        reservation.resize(held + answer + tokenizing_bytes(len(text)))
        (tokens,) = parts.engine.tokenize([text], add_special_tokens=req.add_special_tokens)
        reservation.resize(held + answer + token_rows_bytes(len(tokens)))
        to_bytes = _byte_offsets(text)
        part = orjson.dumps([_tei_token(token, to_bytes) for token in tokens])
        del tokens  # before the next text is tokenized
        pieces += [part, b","]
        answer += len(part)
    pieces[-1] = b"]"
    reservation.resize(held + ANSWER_COPIES * answer)
    return Response(pieces, mimetype="application/json")


@bp.post("/decode")
def decode() -> Response:
    """Token ids back to text: text-embeddings-inference's route, answer and errors; admitted and held in the
    memory budget like every route that does work."""
    info = _model_info()
    parts = components()
    req = DecodeRequest.validated(_json_body(), parts.limits, info)
    reservation = _admitted()
    ids = sum(len(row) for row in req.rows)
    reservation.resize(2 * (request.content_length or 0) + ids * DECODE_BYTES_PER_ID)
    return jsonify(parts.engine.decode(req.rows, skip_special_tokens=req.skip_special_tokens))


@bp.get("/info")
def info() -> Response:
    """What this service serves and its limits, in TEI's fields and its own; 503 until the model is loaded (TEI
    answers nothing before then), so no field is ever null for want of the model."""
    parts = components()
    settings = parts.settings
    model = parts.engine.info
    if model is None or parts.engine.state in ("created", "loading"):
        raise Unavailable(f"the model is not loaded yet ({parts.engine.state}); see GET /ready", retry_after_s=5)
    served = settings.served_model_name
    answer = InfoResponse(
        version=__version__,
        status=parts.engine.state,
        model=model.model_id,
        dimensions=model.dimensions,
        max_seq_length=model.max_seq_length,
        device=model.device,
        dtype=model.dtype,
        dtype_reason=model.dtype_reason,
        backend=model.backend,  # type: ignore[arg-type]  # ModelInfo names one of the two
        backend_reason=model.backend_reason,
        calibration=model.calibration,  # type: ignore[arg-type]  # ModelInfo names one of the two
        calibrated_at=model.calibrated_at,
        input_types=[kind for kind in get_args(InputType) if kind in model.prompts],
        prompts=dict(model.prompts),
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
        model_names=sorted(model_names(model, served)),
        model_name_policy=settings.model_name_policy,
        model_id=model.model_id,
        model_sha=model.revision,
        model_dtype=model.dtype,
        served_model_name=served[0] if served else model.model_id,
        model_type={"embedding": {"pooling": model.pooling}},
        max_concurrent_requests=settings.http_threads,
        max_input_length=model.max_seq_length,
        max_batch_requests=settings.batch_size,
        max_client_batch_size=settings.max_inputs,
        auto_truncate=True,
        tokenization_workers=settings.http_threads,
        sha=os.environ.get(BUILD_SHA_VARIABLE) or None,
        docker_label=os.environ.get(DOCKER_LABEL_VARIABLE) or None,
    )
    return jsonify(answer.model_dump(mode="json"))


@bp.get("/openapi.json")
@bp.get("/api-doc/openapi.json")
def openapi() -> Response:
    """The OpenAPI document of this API (also where TEI serves its own)."""
    parts = components()
    document = openapi_document(
        __version__,
        parts.limits,
        parts.engine.info,
        debug=parts.heap_tracer is not None,
        api_key=bool(parts.settings.api_key),
    )
    return jsonify(document)


@bp.get("/docs")
def docs() -> Response:
    """The API's documentation page (Swagger UI, served from this package: no CDN)."""
    return Response(DOCS_PAGE, mimetype="text/html")


@bp.get("/docs/<name>")
def docs_asset(name: str) -> Response:
    """The Swagger UI files the docs page loads."""
    if name not in DOCS_ASSETS:
        raise NotFound(f"no such file: {quote(name)}")
    return send_from_directory(swagger_ui_dir(), name, max_age=86400)


def _body() -> bytes:
    """The request body, once: as the front read it (no copy), let go from the request once parsed; or from the
    stream for a request that did not come through the front. Only JSON in UTF-8, uncompressed, is read: a
    415 otherwise, so that no cross-site form (``text/plain``) reaches a route that does work."""
    _require_json()
    body: bytes | None = request.environ.pop(BODY, None)
    if body is None:
        return request.get_data()
    request.environ["wsgi.input"] = io.BytesIO()
    return body


def _json_body() -> dict[str, Any]:
    """The request's JSON object, parsed once the request's reservation holds what parsing it costs (a 429 or
    413 before it is parsed otherwise: an array of numbers is many times its body once parsed)."""
    raw = _body()
    _reservation().resize(parse_bytes(raw))
    return parse_json_object(raw)


def _require_json() -> None:
    """415 unless the body is declared ``application/json`` (in UTF-8) and sent as it is."""
    declared = request.headers.get("Content-Type")
    if request.mimetype != JSON_MEDIA_TYPE:
        got = "none" if declared is None else quote(declared)
        raise UnsupportedMediaType(f"send the body as JSON with Content-Type: {JSON_MEDIA_TYPE}; got {got}")
    charset = request.mimetype_params.get("charset", "utf-8")
    if charset.lower() not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"send JSON in UTF-8 (RFC 8259); got charset {quote(charset)}")
    encoding = request.headers.get("Content-Encoding", "").strip()
    if encoding.lower() not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding {quote(encoding)} is not accepted: send the body uncompressed (the body limit is on "
            "what the service reads)"
        )


def _model_info() -> ModelInfo:
    engine = components().engine
    if engine.info is None or not engine.ready:
        # The engine's own reason (loading, failed, shutting down); checked first so validation can use the model's
        # limits.
        raise Unavailable(engine.unavailable_reason(), retry_after_s=5)
    return engine.info


def _run(req: EmbeddingRequest, info: ModelInfo) -> EmbeddingResult:
    parts = components()
    g.inputs, g.characters = len(req.texts), sum(len(text) for text in req.texts)
    reservation = _admitted()
    cost = parts.budget.cost
    assert cost is not None  # derived once the model is loaded, which _model_info has checked
    body_bytes = request.content_length or 0
    prefix = info.prompts[req.prompt_name] if req.prompt_name else info.prefix_for(req.input_type)
    # Token vectors (/embed_all) make an answer hundreds of times its request: held by each text's tokens.
    tokens = 0
    if req.token_vectors:
        tokens = cost.token_answer_bytes(cost.token_bound(len(prefix) + len(text)) for text in req.texts)
    reservation.resize(cost.request_bytes(body_bytes=body_bytes, texts=req.texts, dimensions=req.dimensions) + tokens)
    if OPS_CHECK_HEADER not in request.headers:  # the ops scripts' own check after a start is not indexing
        parts.activity.record()
    if req.cut:
        parts.metrics.inputs_truncated.labels(at="characters").inc(len(req.cut))
    job = parts.engine.submit(
        req.texts,
        truncate=req.truncate,
        keep_end=req.truncation_direction == "left",
        prefix=prefix,
        request_id=g.get("request_id"),
        token_vectors=req.token_vectors,
    )
    req.let_texts_go()  # queued: the engine holds what the model reads of them
    tokens = cost.token_answer_bytes(job.lengths) if req.token_vectors else 0  # counted now: exact
    reservation.resize(cost.queued_bytes(job.texts, req.dimensions) + tokens)
    gone = request.environ.get(CLIENT_GONE)
    if gone is not None:  # served by app.server: a client that disconnects takes its texts off the queue
        gone.subscribe(lambda: job.fail(ClientClosed("the client closed the connection before the answer")))
    return job.wait(parts.settings.request_timeout_s, waited_s=time.perf_counter() - g.started)


def _admitted() -> Reservation:
    """Admit a request that does work (shedding above the memory limit, counting it for the cleanups) and give
    its place in the memory budget, for the route to size."""
    components().memory.admit()
    return _reservation()


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
        "x-tokenization-time": str(round(result.tokenization_s * 1000)),
        "x-queue-time": str(round(result.queue_s * 1000)),
        "x-inference-time": str(round(result.inference_s * 1000)),
        # Texts the model did not read whole: cut to EMBEDDING_MAX_INPUT_CHARS, or at its maximum sequence length.
        "x-truncated-inputs": str(len(req.cut | result.truncated)),
        "x-model-id": info.model_id,
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
