"""Embedding routes: ``POST /embed``, ``POST /v1/embeddings``, ``GET /info``, ``GET /openapi.json``."""

from __future__ import annotations

from flask import Blueprint, Response, g, jsonify, request

from app.activity import OPS_CHECK_HEADER
from app.backend import ModelInfo
from app.components import components
from app.engine import EmbeddingResult
from app.errors import ClientClosed, Unavailable
from app.front import CLIENT_GONE
from app.openapi import openapi_document
from app.schemas import EmbeddingRequest, parse_embed, parse_json_object, parse_openai
from app.vectors import shape_vectors, to_base64
from app.version import __version__

bp = Blueprint("api", __name__)


@bp.post("/embed")
def embed() -> Response:
    """Embed one text or a list of texts."""
    info = _model_info()
    req = parse_embed(parse_json_object(request.get_data()), components().limits, info)
    result = _run(req, info)
    vectors = shape_vectors(result.embeddings, dimensions=req.dimensions, normalize=req.normalize)
    return jsonify(
        embeddings=vectors,  # float32 rows, written by app.jsonio without Python floats
        model=info.model_id,
        dimensions=int(vectors.shape[1]),
        usage={"tokens": result.total_tokens},
    )


@bp.post("/v1/embeddings")
def openai_embeddings() -> Response:
    """OpenAI-compatible embeddings."""
    info = _model_info()
    req = parse_openai(parse_json_object(request.get_data()), components().limits, info)
    result = _run(req, info)
    vectors = shape_vectors(result.embeddings, dimensions=req.dimensions, normalize=True)
    as_base64 = req.encoding_format == "base64"
    # Float rows stay float32 arrays: app.jsonio writes them without Python floats.
    data = [
        {"object": "embedding", "index": i, "embedding": to_base64(v) if as_base64 else v}
        for i, v in enumerate(vectors)
    ]
    tokens = result.total_tokens
    return jsonify(
        object="list",
        data=data,
        model=info.model_id,
        usage={"prompt_tokens": tokens, "total_tokens": tokens},
    )


@bp.get("/info")
def info() -> Response:
    """What this service serves and its limits."""
    parts = components()
    settings = parts.settings
    model = parts.engine.info
    return jsonify(
        version=__version__,
        status=parts.engine.state,
        model=model.model_id if model else settings.model,
        dimensions=model.dimensions if model else None,
        max_seq_length=model.max_seq_length if model else None,
        device=model.device if model else settings.device,
        dtype=model.dtype if model else settings.dtype,
        dtype_reason=model.dtype_reason if model else None,
        input_types=sorted(model.prompts) if model else [],
        batch_size=settings.batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        limits={
            "max_inputs": settings.max_inputs,
            "max_input_chars": settings.max_input_chars,
            "max_body_bytes": settings.max_body_bytes,
            "queue_size": settings.queue_size,
            "request_timeout_s": settings.request_timeout_s,
        },
        memory_policy=settings.memory_policy,
    )


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI document of this API."""
    parts = components()
    return jsonify(openapi_document(__version__, parts.limits, parts.engine.info, debug=parts.heap_tracer is not None))


def _model_info() -> ModelInfo:
    engine = components().engine
    if engine.info is None or not engine.ready:
        # Same answer the engine gives; checked first so validation can use the model's limits.
        raise Unavailable("model is not ready", retry_after_s=5)
    return engine.info


def _run(req: EmbeddingRequest, info: ModelInfo) -> EmbeddingResult:
    parts = components()
    g.inputs = len(req.texts)
    parts.memory.admit()
    if OPS_CHECK_HEADER not in request.headers:  # the ops scripts' own check after a start is not indexing
        parts.activity.record()
    prefix = info.prefix_for(req.input_type)
    texts = [prefix + text for text in req.texts] if prefix else req.texts
    job = parts.engine.submit(texts, truncate=req.truncate, request_id=g.get("request_id"))
    gone = request.environ.get(CLIENT_GONE)
    if gone is not None:  # served by app.server: a client that disconnects takes its texts off the queue
        gone.subscribe(lambda: job.fail(ClientClosed("the client closed the connection before the answer")))
    return job.wait(parts.settings.request_timeout_s)
