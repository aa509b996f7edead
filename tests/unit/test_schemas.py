from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from app.backend import ModelInfo
from app.errors import BadRequest, EmptyInput, NotFound, ServiceError, TooManyInputs, Unprocessable
from app.schemas import Limits, parse_embed, parse_json_object, parse_openai
from app.vectors import shape_vectors, to_base64

LIMITS = Limits(max_inputs=4, max_input_chars=50)
INFO = ModelInfo("org/some-model", 8, 16, "cpu", {"query": "query: "})


def test_a_single_string_becomes_one_text() -> None:
    assert parse_embed({"inputs": "hello"}, LIMITS, INFO).texts == ["hello"]
    assert parse_openai({"input": ["a", "b"]}, LIMITS, INFO).texts == ["a", "b"]


@pytest.mark.parametrize(
    ("body", "error", "fragment"),
    [
        ({}, BadRequest, "'inputs' is required"),
        ({"inputs": 3}, BadRequest, "got number"),
        ({"inputs": None}, BadRequest, "got null"),
        ({"inputs": [["nested"]]}, BadRequest, "inputs[0] must be a string, got array"),
        ({"inputs": ["ok", None]}, BadRequest, "inputs[1] must be a string, got null"),
        ({"inputs": []}, EmptyInput, "empty"),
        ({"inputs": ["  "]}, EmptyInput, "inputs[0] is empty"),
        ({"inputs": ["x"] * 5}, TooManyInputs, "5 texts, more than the limit of 4"),
        ({"inputs": [101, 7592, 102]}, Unprocessable, "'inputs' holds token ids; this service embeds text only"),
        ({"inputs": [[101, 102], [101]]}, Unprocessable, "POST /tokenize shows how this model tokenizes"),
        ({"inputs": [1, "x"]}, BadRequest, "inputs[0] must be a string, got number"),
        ({"inputs": "x", "truncation_direction": "middle"}, BadRequest, "must be one of right, left, got 'middle'"),
        ({"inputs": "x", "prompt_name": "passage"}, Unprocessable, "not one of model 'org/some-model''s prompts"),
        ({"inputs": "x", "prompt_name": 3}, BadRequest, "'prompt_name' must be a string"),
        ({"inputs": "x", "prompt_name": "query", "input_type": "query"}, Unprocessable, "not both"),
        ({"inputs": ["x" * 51]}, Unprocessable, "51 characters"),
        ({"inputs": "x", "normalize": "yes"}, BadRequest, "'normalize' must be true or false"),
        ({"inputs": "x", "truncate": 1}, BadRequest, "'truncate' must be true or false"),
        ({"inputs": "x", "input_type": "question"}, BadRequest, "'input_type' must be one of"),
        ({"inputs": "x", "dimensions": 9}, Unprocessable, "from 1 to 8"),
        ({"inputs": "x", "dimensions": 0}, Unprocessable, "from 1 to 8"),
        ({"inputs": "x", "dimensions": "4"}, BadRequest, "whole number"),
    ],
)
def test_embed_body_errors(body: dict[str, Any], error: type[ServiceError], fragment: str) -> None:
    with pytest.raises(error) as caught:
        parse_embed(body, LIMITS, INFO)
    assert fragment in caught.value.message


@pytest.mark.parametrize(
    ("body", "error", "fragment"),
    [
        ({"input": "x", "encoding_format": "int8"}, BadRequest, "unsupported encoding_format 'int8'"),
        ({"input": "x", "model": "text-embedding-3-small"}, NotFound, "serves 'org/some-model' only"),
        ({"input": "x", "model": 7}, BadRequest, "'model' must be a string"),
        ({"input": [1, 2, 3]}, Unprocessable, "check_embedding_ctx_length=False"),
        ({"input": [[1, 2], [3]]}, Unprocessable, "'input' holds token ids"),
        ({"input": ["a", 3]}, BadRequest, "input[1] must be a string"),
    ],
)
def test_openai_body_errors(body: dict[str, Any], error: type[ServiceError], fragment: str) -> None:
    with pytest.raises(error) as caught:
        parse_openai(body, LIMITS, INFO)
    assert fragment in caught.value.message


def test_text_embeddings_inference_fields_are_read() -> None:
    request = parse_embed({"inputs": "x", "truncation_direction": "Left", "prompt_name": "query"}, LIMITS, INFO)
    assert (request.truncation_direction, request.prompt_name) == ("left", "query")
    assert parse_embed({"inputs": "x"}, LIMITS, INFO).truncation_direction == "right"


def test_the_served_model_may_be_named_with_or_without_its_organisation() -> None:
    assert parse_openai({"input": "x", "model": "org/some-model"}, LIMITS, INFO).texts == ["x"]
    assert parse_openai({"input": "x", "model": "some-model"}, LIMITS, INFO).texts == ["x"]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [(b"", "empty"), (b"{bad", "not valid JSON"), (b"[1]", "got array"), (b"\xff\xfe", "not valid JSON")],
)
def test_body_must_be_a_json_object(raw: bytes, fragment: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_json_object(raw)
    assert fragment in caught.value.message


def test_shortened_vectors_are_normalised_again() -> None:
    raw = np.array([[3.0, 4.0, 12.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    full = shape_vectors(raw, dimensions=None, normalize=True)
    short = shape_vectors(raw, dimensions=2, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(short[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(shape_vectors(raw, dimensions=None, normalize=False), raw)


def test_base64_is_little_endian_float32() -> None:
    vector = np.array([1.0, -2.5, 0.125], dtype=np.float32)
    decoded = np.frombuffer(__import__("base64").b64decode(to_base64(vector)), dtype="<f4")
    np.testing.assert_array_equal(decoded, vector)
