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
from app.docs import DOCS_ASSETS
from app.heaptrace import MAX_SECONDS, MAX_TOP
from app.reasons import CleanupRecord
from app.schemas import (
    ActivityResponse,
    DecodeRequest,
    DecodeResponse,
    EmbedAllRequest,
    EmbedAllResponse,
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
    SimilarityRequest,
    SimilarityResponse,
    TeiErrorResponse,
    TokenizeRequest,
    TokenizeResponse,
    model_names,
)

_REQUESTS: tuple[type[Any], ...] = (
    EmbedRequest,
    EmbedAllRequest,
    SimilarityRequest,
    OpenAIEmbeddingRequest,
    TokenizeRequest,
    DecodeRequest,
)
_TEXT_REQUESTS = (EmbedRequest, EmbedAllRequest, OpenAIEmbeddingRequest, TokenizeRequest)
"""The requests whose texts field is a string or a list of strings."""
_ANSWERS: tuple[type[Any], ...] = (
    EmbedResponse,
    EmbedAllResponse,
    SimilarityResponse,
    DecodeResponse,
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
_NOT_JSON = "A body not declared as Content-Type: application/json (in UTF-8), or sent compressed (Content-Encoding)."
_ERRORS = {
    "400": "Malformed JSON (not UTF-8, a key repeated in an object, NaN or Infinity), a field of the wrong type, or "
    "text that is not valid Unicode.",
    "401": "EMBEDDING_API_KEY is set and the request does not carry it (Authorization: Bearer <key>).",
    "404": "A model other than the served ones was asked for, under EMBEDDING_MODEL_NAME_POLICY=served.",
    "413": "Request body over the size limit.",
    "415": _NOT_JSON,
    "422": "Empty input, too many inputs, or dimensions out of range.",
    "429": "Inference queue full; retry after Retry-After seconds.",
    "503": "Not ready, shutting down, over the memory limit, or timed out in the queue.",
}
_TEI_ERRORS = {
    "400": "No input at all (error_type Empty), or a body that is not a JSON object: not UTF-8, a key repeated in "
    "an object, NaN or Infinity.",
    "401": "EMBEDDING_API_KEY is set and the request does not carry it (Authorization: Bearer <key>).",
    "413": "A body over the size limit (error_type Validation).",
    "415": _NOT_JSON + " (error_type Validation)",
    "422": "A field of the wrong type, more texts than the limit, a text too long with truncate false, token ids, "
    "an unknown prompt_name (Validation), or a text the tokenizer cannot take (Tokenizer).",
    "424": "The model failed on an input (error_type Backend).",
    "429": "Inference queue full; retry after Retry-After seconds (error_type Overloaded).",
    "503": "Not ready, shutting down, over the memory limit, or timed out in the queue (error_type Unhealthy).",
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
    for model in _TEXT_REQUESTS:
        properties = schemas[model.__name__]["properties"]
        one_text, many = properties[model.texts_field]["anyOf"]
        many["maxItems"] = limits.max_inputs
        if model is TokenizeRequest:  # the others cut a longer text (truncate true) or refuse it (false)
            one_text["maxLength"] = many["items"]["maxLength"] = limits.max_input_chars
        if info is not None and "dimensions" in properties:
            _option(properties["dimensions"])["maximum"] = info.dimensions
    schemas[DecodeRequest.__name__]["properties"]["ids"]["anyOf"][1]["maxItems"] = limits.max_inputs
    schemas["SimilarityInput"]["properties"]["sentences"]["maxItems"] = limits.max_inputs - 1
    if info is not None and limits.refuse_unknown_models:
        names = sorted(model_names(info, limits.served_names))
        _option(schemas[OpenAIEmbeddingRequest.__name__]["properties"]["model"])["enum"] = names
    if info is not None:
        for name in (EmbedRequest.__name__, EmbedAllRequest.__name__, TokenizeRequest.__name__, "SimilarityParameters"):
            properties = schemas[name]["properties"]
            if info.prompts:
                _option(properties["prompt_name"])["enum"] = sorted(info.prompts)
            else:  # a model without prompts takes no prompt_name: null (its default) only, as validation has it
                properties["prompt_name"] = {
                    "type": "null",
                    "description": f"Model {info.model_id} declares no prompts: leave prompt_name out (or null).",
                }


def _option(prop: dict[str, Any]) -> dict[str, Any]:
    """The non-null alternative of a nullable property's schema."""
    options: list[dict[str, Any]] = prop.get("anyOf", [prop])
    return next(option for option in options if option != {"type": "null"})


def openapi_document(
    version: str, limits: Limits, info: ModelInfo | None, *, debug: bool = False, api_key: bool = False
) -> dict[str, Any]:
    """The API description, with the service version, its limits and (once loaded) the model's; the debug
    route only where it is enabled; the API key's scheme on the routes that need it where one is set."""
    schemas = copy.deepcopy(_component_schemas())
    _with_limits(schemas, limits, info)
    errors = {code: _json(ErrorResponse, text) for code, text in _ERRORS.items()}
    tei_errors = {code: _json(TeiErrorResponse, text) for code, text in _TEI_ERRORS.items()}

    security: list[dict[str, list[str]]] | None = [{"apiKey": []}] if api_key else None

    def embedding_route(summary: str, request: Any, answer: type[BaseModel]) -> dict[str, Any]:
        schema = _ref(request) if isinstance(request, type) else request
        body = {"required": True, "content": {"application/json": {"schema": schema}}}
        failed = tei_errors if request is not OpenAIEmbeddingRequest else errors
        operation = {"summary": summary, "requestBody": body, "responses": {"200": _json(answer), **failed}}
        return {"post": operation | ({"security": security} if security else {})}

    headers_note = (
        "tokens, characters and times in the x-compute-* and x-*-time headers, cut texts in x-truncated-inputs"
    )
    tei_embed = embedding_route(
        f"Embed one text or a list of texts (text-embeddings-inference's API): an array of vectors; {headers_note}.",
        EmbedRequest,
        EmbedResponse,
    )
    openai_embed = embedding_route(
        "OpenAI-compatible embeddings (also at /embeddings, for clients whose base URL has no /v1).",
        OpenAIEmbeddingRequest,
        OpenAIEmbeddingResponse,
    )
    health = {
        "get": {
            "summary": "Health, as text-embeddings-inference answers it: 200 once the model is loaded and serves, "
            "503 while it loads (GET / and /ping answer the same).",
            "responses": {"200": _json(HealthResponse), "503": _json(TeiErrorResponse, "Loading, or failed.")},
        }
    }
    root = {
        **health,
        "post": embedding_route(
            "Embeddings (/embed's request), or similarities when inputs is an object (/similarity's request): "
            "text-embeddings-inference's default route.",
            {"anyOf": [_ref(EmbedRequest), _ref(SimilarityRequest)]},
            EmbedResponse,
        )["post"],
    }
    root["post"]["responses"]["200"] = {
        "description": "Vectors, or similarities",
        "content": {"application/json": {"schema": {"anyOf": [_ref(EmbedResponse), _ref(SimilarityResponse)]}}},
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "Embedding service", "version": version},
        "paths": {
            "/": root,
            "/embed": tei_embed,
            "/embed_all": embedding_route(
                "Each text's token vectors, special tokens included (text-embeddings-inference's API); "
                f"{headers_note}.",
                EmbedAllRequest,
                EmbedAllResponse,
            ),
            "/similarity": embedding_route(
                "The cosine similarity of source_sentence to each of sentences (text-embeddings-inference's API).",
                SimilarityRequest,
                SimilarityResponse,
            ),
            "/v1/embeddings": openai_embed,
            "/embeddings": openai_embed,
            "/tokenize": embedding_route(
                "Each text's tokens, as the model's tokenizer splits it (text-embeddings-inference's API).",
                TokenizeRequest,
                TokenizeResponse,
            ),
            "/decode": embedding_route(
                "Token ids back to text (text-embeddings-inference's API).", DecodeRequest, DecodeResponse
            ),
            "/info": {
                "get": {
                    "summary": "Model, limits and version; 503 until the model is loaded.",
                    "responses": {"200": _json(InfoResponse), "503": _json(TeiErrorResponse, "Loading.")},
                }
            },
            "/health": health,
            "/ping": health,
            "/live": {
                "get": {
                    "summary": "Liveness: 200 while the process serves HTTP, loading or not (the Kubernetes liveness "
                    "probe's route).",
                    "responses": {"200": _json(HealthResponse)},
                }
            },
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
            "/api-doc/openapi.json": {
                "get": {"summary": "This document, where TEI serves its own.", "responses": {"200": _json(None)}}
            },
            "/docs": {
                "get": {
                    "summary": "This document, rendered by Swagger UI (served by the service itself, offline).",
                    "responses": {
                        "200": {"description": "OK", "content": {"text/html": {"schema": {"type": "string"}}}}
                    },
                }
            },
            "/docs/{name}": {
                "get": {
                    "summary": "The Swagger UI files /docs loads.",
                    "parameters": [
                        {"name": "name", "in": "path", "required": True, "schema": {"enum": sorted(DOCS_ASSETS)}}
                    ],
                    "responses": {"200": {"description": "OK"}, "404": _json(ErrorResponse, "No such file.")},
                }
            },
            **(_DEBUG_PATHS if debug else {}),
        },
        "components": {"schemas": schemas},
    }
    if security:
        document["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    return document


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
