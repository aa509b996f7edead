"""The OpenAPI 3.1 document served at ``/openapi.json``, built from the models in :mod:`app.schemas`.

The models give every field, type and fixed constraint; this module adds what the settings and the loaded
model decide (the number and length of texts, ``dimensions`` up to the model's, the served model's
names and prompts) and the routes. One rule the document cannot state: with ``truncate: false``, a text
longer than the model's maximum sequence length (counted in tokens) is a 422.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from app.backend import ModelInfo
from app.heaptrace import MAX_SECONDS, MAX_TOP
from app.memory import CleanupRecord
from app.schemas import (
    ActivityResponse,
    EmbedRequest,
    EmbedResponse,
    ErrorResponse,
    HealthResponse,
    HeapGrowthResponse,
    InfoResponse,
    Limits,
    MemoryResponse,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    ReadyResponse,
    TeiErrorResponse,
    TokenizeRequest,
    TokenizeResponse,
    model_names,
)

_REQUESTS: tuple[type[EmbedRequest] | type[OpenAIEmbeddingRequest] | type[TokenizeRequest], ...] = (
    EmbedRequest,
    OpenAIEmbeddingRequest,
    TokenizeRequest,
)
_ANSWERS: tuple[type[Any], ...] = (
    EmbedResponse,
    TokenizeResponse,
    TeiErrorResponse,
    OpenAIEmbeddingResponse,
    ErrorResponse,
    HealthResponse,
    ReadyResponse,
    ActivityResponse,
    InfoResponse,
    CleanupRecord,
    MemoryResponse,
    HeapGrowthResponse,
)
_ERRORS = {
    "400": "Malformed JSON, a field of the wrong type, or text that is not valid Unicode.",
    "404": "A model other than the served one was asked for.",
    "413": "Request body over the size limit.",
    "422": "Empty input, too many inputs, a text too long, or dimensions out of range.",
    "429": "Inference queue full; retry after Retry-After seconds.",
    "503": "Not ready, shutting down, over the memory limit, or timed out in the queue.",
}
_TEI_ERRORS = {
    "400": "Empty input or an empty text (error_type empty), or a body that is not a JSON object.",
    "413": "More texts than the limit, or a body over the size limit (error_type validation).",
    "422": "A field of the wrong type, a text too long, token ids, an unknown prompt_name (validation), or a text "
    "the tokenizer cannot take (tokenizer).",
    "424": "The model failed on an input (error_type backend).",
    "429": "Inference queue full; retry after Retry-After seconds (error_type overloaded).",
    "503": "Not ready, shutting down, over the memory limit, or timed out in the queue (error_type unhealthy).",
}


@functools.cache
def _component_schemas() -> dict[str, Any]:
    """Every model's JSON Schema, referring to the others as ``#/components/schemas/<name>``."""
    models: list[tuple[type[Any], JsonSchemaMode]] = [(m, "validation") for m in _REQUESTS]
    models += [(m, "serialization") for m in _ANSWERS]
    _, schemas = models_json_schema(models, ref_template="#/components/schemas/{model}")
    found: dict[str, Any] = schemas["$defs"]
    return found


def _ref(model: type[BaseModel] | type[CleanupRecord]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel] | type[CleanupRecord] | None, description: str = "OK") -> dict[str, Any]:
    schema = {"type": "object"} if model is None else _ref(model)
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _with_limits(schemas: dict[str, Any], limits: Limits, info: ModelInfo | None) -> None:
    """Write the settings' and the model's limits into the request schemas (the models state fixed ones only)."""
    for model in _REQUESTS:
        properties = schemas[model.__name__]["properties"]
        one_text, many = properties[model.texts_field]["anyOf"]
        one_text["maxLength"] = many["items"]["maxLength"] = limits.max_input_chars
        many["maxItems"] = limits.max_inputs
        if info is not None and "dimensions" in properties:
            properties["dimensions"]["maximum"] = info.dimensions
    if info is not None:
        schemas[OpenAIEmbeddingRequest.__name__]["properties"]["model"]["enum"] = sorted(model_names(info))
        for model in (EmbedRequest, TokenizeRequest):
            properties = schemas[model.__name__]["properties"]
            if info.prompts:
                properties["prompt_name"]["enum"] = sorted(info.prompts)
            else:  # a model without prompts takes no prompt_name
                del properties["prompt_name"]


def openapi_document(version: str, limits: Limits, info: ModelInfo | None, *, debug: bool = False) -> dict[str, Any]:
    """The API description, with the service version, its limits and (once loaded) the model's; the debug
    route only where it is enabled."""
    schemas = copy.deepcopy(_component_schemas())
    _with_limits(schemas, limits, info)
    errors = {code: _json(ErrorResponse, text) for code, text in _ERRORS.items()}
    tei_errors = {code: _json(TeiErrorResponse, text) for code, text in _TEI_ERRORS.items()}

    def embedding_route(summary: str, request: type[BaseModel], answer: type[BaseModel]) -> dict[str, Any]:
        body = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
        failed = tei_errors if request is not OpenAIEmbeddingRequest else errors
        return {"post": {"summary": summary, "requestBody": body, "responses": {"200": _json(answer), **failed}}}

    tei_embed = embedding_route(
        "Embed one text or a list of texts (text-embeddings-inference's API): an array of vectors; tokens, "
        "characters and times in the x-compute-* and x-*-time headers.",
        EmbedRequest,
        EmbedResponse,
    )

    return {
        "openapi": "3.1.0",
        "info": {"title": "Embedding service", "version": version},
        "paths": {
            "/": tei_embed,
            "/embed": tei_embed,
            "/v1/embeddings": embedding_route(
                "OpenAI-compatible embeddings.", OpenAIEmbeddingRequest, OpenAIEmbeddingResponse
            ),
            "/tokenize": embedding_route(
                "Each text's tokens, as the model's tokenizer splits it (text-embeddings-inference's API).",
                TokenizeRequest,
                TokenizeResponse,
            ),
            "/info": {"get": {"summary": "Model, limits and version.", "responses": {"200": _json(InfoResponse)}}},
            "/health": {"get": {"summary": "Liveness.", "responses": {"200": _json(HealthResponse)}}},
            "/ready": {
                "get": {
                    "summary": "Readiness: 200 once the model is loaded and warmed up.",
                    "responses": {"200": _json(ReadyResponse), "503": _json(ReadyResponse, "Not ready.")},
                }
            },
            "/activity": {
                "get": {
                    "summary": "Embedding requests in the last ?minutes=N (default 5, up to 1440), queue depth.",
                    "parameters": [
                        {"name": "minutes", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1440}}
                    ],
                    "responses": {"200": _json(ActivityResponse), "400": _json(ErrorResponse, "Bad minutes value.")},
                }
            },
            "/memory": {
                "get": {
                    "summary": "RSS/USS and where it is, thresholds, status (normal/elevated/high), cleanups.",
                    "responses": {"200": _json(MemoryResponse)},
                }
            },
            "/cleanup": {
                "post": {
                    "summary": (
                        "Run a memory cleanup now (reason manual). Bearer EMBEDDING_ADMIN_TOKEN when one is set, "
                        "else loopback clients only; never from a browser."
                    ),
                    "responses": {
                        "200": _json(CleanupRecord, "The cleanup record."),
                        "401": _json(ErrorResponse, "Missing or wrong admin token."),
                        "403": _json(ErrorResponse, "Not a loopback client (no token set), or a browser's request."),
                        "409": _json(ErrorResponse, "A cleanup is already running."),
                        "429": _json(ErrorResponse, "Within EMBEDDING_MANUAL_CLEANUP_INTERVAL_S of the last one."),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics.",
                    "responses": {
                        "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
                    },
                }
            },
            "/openapi.json": {"get": {"summary": "This document.", "responses": {"200": _json(None)}}},
            **(_DEBUG_PATHS if debug else {}),
        },
        "components": {"schemas": schemas},
    }


_DEBUG_PATHS = {
    "/debug/memory/snapshot": {
        "post": {
            "summary": (
                f"Trace Python allocations for ?seconds=N (default 30, up to {MAX_SECONDS}) and answer the ?top=K "
                f"(default 20, up to {MAX_TOP}) sites whose held memory grew most. Bearer EMBEDDING_ADMIN_TOKEN; "
                "one at a time."
            ),
            "parameters": [
                {"name": "seconds", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_SECONDS}},
                {"name": "top", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_TOP}},
            ],
            "responses": {
                "200": _json(HeapGrowthResponse, "The sites that grew."),
                "400": _json(ErrorResponse, "Bad seconds or top value."),
                "401": _json(ErrorResponse, "Missing or wrong admin token."),
                "403": _json(ErrorResponse, "A browser's request."),
                "409": _json(ErrorResponse, "A snapshot is already being taken."),
            },
        }
    }
}
