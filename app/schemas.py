"""Request parsing and validation for the embedding routes.

Wrong JSON or wrong types are 400; well-typed input the service will not embed
(empty, too many, too long, an impossible ``dimensions``) is 422. An optional field
is either left out (its default) or of its type: ``null`` is a wrong type, as with
OpenAI's API. Messages quote the client's input up to ``MAX_QUOTE_CHARS``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.backend import INPUT_TYPES, ModelInfo
from app.errors import BadRequest, NotFound, Unprocessable

ENCODING_FORMATS = ("float", "base64")
MAX_QUOTE_CHARS = 100
"""Longest quote of a client's value in an error message."""


@dataclass(frozen=True)
class Limits:
    """Per-request limits from the settings."""

    max_inputs: int
    max_input_chars: int


@dataclass(frozen=True)
class EmbeddingRequest:
    """A validated embedding request, whichever route it came through."""

    texts: list[str]
    normalize: bool = True
    truncate: bool = True
    input_type: str | None = None
    dimensions: int | None = None
    encoding_format: str = "float"


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object."""
    if not raw.strip():
        raise BadRequest("request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request body is not valid JSON: nested too deeply") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise BadRequest("request body is not valid JSON: a number is too long") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {_type_name(body)}")
    return body


def parse_embed(body: dict[str, Any], limits: Limits, info: ModelInfo) -> EmbeddingRequest:
    """Validate a ``POST /embed`` body."""
    return EmbeddingRequest(
        texts=_texts(body, "inputs", limits),
        normalize=_bool(body, "normalize", True),
        truncate=_bool(body, "truncate", True),
        input_type=_input_type(body),
        dimensions=_dimensions(body, info),
    )


def parse_openai(body: dict[str, Any], limits: Limits, info: ModelInfo) -> EmbeddingRequest:
    """Validate an OpenAI-style ``POST /v1/embeddings`` body."""
    _check_model(body, info)
    encoding_format = body.get("encoding_format", "float")
    if not isinstance(encoding_format, str) or encoding_format not in ENCODING_FORMATS:
        raise BadRequest(
            f"unsupported encoding_format {quote(encoding_format)}; use one of {', '.join(ENCODING_FORMATS)}",
            param="encoding_format",
        )
    if "user" in body and not isinstance(body["user"], str):
        raise BadRequest(f"'user' must be a string, got {_type_name(body['user'])}", param="user")
    return EmbeddingRequest(
        texts=_texts(body, "input", limits),
        input_type=_input_type(body),
        dimensions=_dimensions(body, info),
        encoding_format=encoding_format,
    )


def model_names(info: ModelInfo) -> set[str]:
    """Names a client may use for the served model."""
    return {info.model_id, info.model_id.rsplit("/", 1)[-1]}


def quote(value: Any) -> str:
    """``repr(value)`` up to :data:`MAX_QUOTE_CHARS`, marked when cut: error messages never echo a whole input."""
    text = repr(value) if not isinstance(value, int) or isinstance(value, bool) else _int_text(value)
    return text if len(text) <= MAX_QUOTE_CHARS else f"{text[:MAX_QUOTE_CHARS]}... ({len(text)} characters)"


def _int_text(value: int) -> str:
    try:
        return str(value)
    except ValueError:  # more digits than Python converts
        return "a number of thousands of digits"


def _check_model(body: dict[str, Any], info: ModelInfo) -> None:
    if "model" not in body:
        return
    model = body["model"]
    if not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {_type_name(model)}", param="model")
    if model not in model_names(info):
        raise NotFound(
            f"model {quote(model)} is not served here; this service serves {info.model_id!r} only "
            "(embeddings of different models must not be mixed in one index)",
            param="model",
        )


def _texts(body: dict[str, Any], key: str, limits: Limits) -> list[str]:
    if key not in body:
        raise BadRequest(f"'{key}' is required: a string or a list of strings", param=key)
    value = body[key]
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise BadRequest(f"'{key}' must be a string or a list of strings, got {_type_name(value)}", param=key)
    if not texts:
        raise Unprocessable(f"'{key}' is empty; send at least one text", param=key)
    if len(texts) > limits.max_inputs:
        raise Unprocessable(f"'{key}' has {len(texts)} texts, more than the limit of {limits.max_inputs}", param=key)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadRequest(f"{key}[{i}] must be a string, got {_type_name(text)}", param=key)
        if not text.isascii() and not _encodable(text):
            raise BadRequest(
                f"{key}[{i}] is not valid Unicode text (it holds a lone surrogate, such as an unpaired \\ud800)",
                param=key,
            )
        if not text.strip():
            raise Unprocessable(f"{key}[{i}] is empty", param=key)
        if len(text) > limits.max_input_chars:
            raise Unprocessable(
                f"{key}[{i}] has {len(text)} characters, more than the limit of {limits.max_input_chars}",
                param=key,
            )
    return texts


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"'{key}' must be true or false, got {_type_name(value)}", param=key)
    return value


def _input_type(body: dict[str, Any]) -> str | None:
    if "input_type" not in body:
        return None
    value = body["input_type"]
    if not isinstance(value, str) or value not in INPUT_TYPES:
        raise BadRequest(
            f"'input_type' must be one of {', '.join(INPUT_TYPES)}, got {quote(value)}", param="input_type"
        )
    return value


def _dimensions(body: dict[str, Any], info: ModelInfo) -> int | None:
    if "dimensions" not in body:
        return None
    value = body["dimensions"]
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 64.0 is a whole number (and an "integer" to JSON Schema)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'dimensions' must be a whole number, got {_type_name(value)}", param="dimensions")
    if not 1 <= value <= info.dimensions:
        raise Unprocessable(
            f"'dimensions' must be from 1 to {info.dimensions} for model {info.model_id!r}, got {quote(value)}",
            param="dimensions",
        )
    return value


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "string" if isinstance(value, str) else type(value).__name__
