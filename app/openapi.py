"""The OpenAPI 3.1 document served at ``/openapi.json``.

It states every limit the validation in :mod:`app.schemas` enforces, with this service's values: the
number and length of texts, ``dimensions`` up to the model's, the served model's names. One rule it
cannot state: with ``truncate: false``, a text longer than the model's maximum sequence length (counted
in tokens) is a 422.
"""

from __future__ import annotations

from typing import Any

from app.backend import ModelInfo
from app.schemas import Limits, model_names

_OBJECT = {"type": "object"}
_STRING = {"type": "string"}
_INPUT_TYPE = {
    "type": "string",
    "enum": ["query", "passage", "document"],
    "description": (
        "Adds the prefix the model was trained with (e5: 'query: ' / 'passage: '); nothing for models without one."
    ),
}
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": "integer"},
                "param": {"type": "string"},
            },
        }
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_CLEANUP = {
    "type": "object",
    "properties": {
        "reason": _STRING,
        "started_at": {"type": "number"},
        "duration_s": {"type": "number"},
        "rss_before_bytes": {"type": "integer"},
        "rss_after_bytes": {"type": "integer"},
        "freed_bytes": {"type": "integer"},
        "freed_objects": {"type": "integer"},
        "trimmed": {"type": "boolean"},
        "effective": {"type": "boolean"},
    },
}
_ERRORS = {
    "400": "Malformed JSON, a field of the wrong type, or text that is not valid Unicode.",
    "404": "A model other than the served one was asked for.",
    "413": "Request body over the size limit.",
    "422": "Empty input, too many inputs, a text too long, or dimensions out of range.",
    "429": "Inference queue full; retry after Retry-After seconds.",
    "503": "Not ready, shutting down, over the memory limit, or timed out in the queue.",
}


def _error_responses() -> dict[str, Any]:
    return {
        code: {"description": text, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for code, text in _ERRORS.items()
    }


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _texts(limits: Limits) -> dict[str, Any]:
    # A text holds at least one character that is not white space ("\\S" anywhere), at most max_input_chars.
    text = {"type": "string", "minLength": 1, "maxLength": limits.max_input_chars, "pattern": "\\S"}
    return {"oneOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": limits.max_inputs}]}


def _dimensions(info: ModelInfo | None) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "integer",
        "minimum": 1,
        "description": "Keep the first N components, re-normalised.",
    }
    if info is not None:
        schema["maximum"] = info.dimensions
    return schema


def openapi_document(version: str, limits: Limits, info: ModelInfo | None) -> dict[str, Any]:
    """The API description, with the service version, its limits and (once loaded) the model's."""
    vector = {"type": "array", "items": {"type": "number"}}
    texts, dimensions = _texts(limits), _dimensions(info)
    model: dict[str, Any] = {"type": "string", "description": "Optional; must name the served model."}
    if info is not None:
        model["enum"] = sorted(model_names(info))
    embed_request = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "inputs": texts,
            "normalize": {"type": "boolean", "default": True},
            "truncate": {
                "type": "boolean",
                "default": True,
                "description": "false: a text longer than the model's maximum sequence length is a 422.",
            },
            "input_type": _INPUT_TYPE,
            "dimensions": dimensions,
        },
    }
    embed_response = {
        "type": "object",
        "properties": {
            "embeddings": {"type": "array", "items": vector},
            "model": {"type": "string"},
            "dimensions": {"type": "integer"},
            "usage": {"type": "object", "properties": {"tokens": {"type": "integer"}}},
        },
    }
    openai_request = {
        "type": "object",
        "required": ["input"],
        "properties": {
            "input": texts,
            "model": model,
            "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
            "dimensions": dimensions,
            "input_type": _INPUT_TYPE,
            "user": {"type": "string", "description": "Accepted and ignored."},
        },
    }
    openai_response = {
        "type": "object",
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "object": {"const": "embedding"},
                        "index": {"type": "integer"},
                        "embedding": {"oneOf": [vector, {"type": "string", "contentEncoding": "base64"}]},
                    },
                },
            },
            "model": {"type": "string"},
            "usage": {
                "type": "object",
                "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}},
            },
        },
    }
    status = {"type": "object", "properties": {"status": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Embedding service", "version": version},
        "paths": {
            "/embed": {
                "post": {
                    "summary": "Embed one text or a list of texts.",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": embed_request}}},
                    "responses": {"200": _json(embed_response), **_error_responses()},
                }
            },
            "/v1/embeddings": {
                "post": {
                    "summary": "OpenAI-compatible embeddings.",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": openai_request}}},
                    "responses": {"200": _json(openai_response), **_error_responses()},
                }
            },
            "/info": {"get": {"summary": "Model, limits and version.", "responses": {"200": _json(_OBJECT)}}},
            "/health": {"get": {"summary": "Liveness.", "responses": {"200": _json(status)}}},
            "/ready": {
                "get": {
                    "summary": "Readiness: 200 once the model is loaded and warmed up.",
                    "responses": {"200": _json(status), "503": _json(status, "Not ready.")},
                }
            },
            "/activity": {
                "get": {
                    "summary": "Embedding requests in the last ?minutes=N (default 5, up to 1440), queue depth.",
                    "parameters": [
                        {"name": "minutes", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1440}}
                    ],
                    "responses": {"200": _json(_OBJECT), "400": _json(_ERROR_REF, "Bad minutes value.")},
                }
            },
            "/memory": {
                "get": {
                    "summary": "RSS/USS, thresholds, status (normal/elevated/high), last cleanup, cleanups by reason.",
                    "responses": {"200": _json(_OBJECT)},
                }
            },
            "/cleanup": {
                "post": {
                    "summary": (
                        "Run a memory cleanup now (reason manual). Bearer EMBEDDING_ADMIN_TOKEN when one is set, "
                        "else loopback clients only; never from a browser."
                    ),
                    "responses": {
                        "200": _json(_CLEANUP, "The cleanup record."),
                        "401": _json(_ERROR_REF, "Missing or wrong admin token."),
                        "403": _json(_ERROR_REF, "Not a loopback client (no token set), or a browser's request."),
                        "409": _json(_ERROR_REF, "A cleanup is already running."),
                        "429": _json(_ERROR_REF, "Within EMBEDDING_MANUAL_CLEANUP_INTERVAL_S of the last one."),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics.",
                    "responses": {"200": {"description": "OK", "content": {"text/plain": {"schema": _STRING}}}},
                }
            },
            "/openapi.json": {"get": {"summary": "This document.", "responses": {"200": _json(_OBJECT)}}},
        },
        "components": {"schemas": {"Error": _ERROR}},
    }
