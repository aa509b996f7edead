from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from app.backend import ModelInfo
from app.errors import BadRequest, EmptyInput, NotFound, ServiceError, TooManyInputs, Unprocessable
from app.schemas import (
    DecodeRequest,
    EmbedAllRequest,
    Limits,
    SimilarityRequest,
    TokenizeRequest,
    parse_embed,
    parse_json_object,
    parse_openai,
)
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
        ({"inputs": ["x"] * 5}, TooManyInputs, "5 texts, more than the limit of 4"),
        ({"inputs": [101, 7592, 102]}, Unprocessable, "'inputs' holds token ids; this service embeds text only"),
        ({"inputs": [[101, 102], [101]]}, Unprocessable, "POST /tokenize shows how this model tokenizes"),
        ({"inputs": [1, "x"]}, BadRequest, "inputs[0] must be a string, got number"),
        (
            {"inputs": "x", "truncation_direction": "middle"},
            BadRequest,
            'must be one of right, left, Right, Left, got "middle"',
        ),
        ({"inputs": "x", "prompt_name": "passage"}, Unprocessable, 'not one of model "org/some-model"\'s prompts'),
        ({"inputs": "x", "prompt_name": 3}, BadRequest, "'prompt_name' must be a string"),
        ({"inputs": "x", "prompt_name": "query", "input_type": "query"}, Unprocessable, "not both"),
        ({"inputs": ["x" * 51], "truncate": False}, Unprocessable, "51 characters, more than the limit of 50"),
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
        ({"input": "x", "encoding_format": "int8"}, BadRequest, 'unsupported encoding_format "int8"'),
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


STRICT = Limits(max_inputs=4, max_input_chars=50, served_names=("text-embedding-3-small",), refuse_unknown_models=True)


def test_any_model_name_is_answered_unless_the_policy_is_served() -> None:
    # LangChain's OpenAIEmbeddings sends text-embedding-ada-002 unless told otherwise; TEI answers any name.
    assert (
        parse_openai({"input": "x", "model": "text-embedding-ada-002"}, LIMITS, INFO).model == "text-embedding-ada-002"
    )
    with pytest.raises(NotFound, match='serves "org/some-model" only, under the names org/some-model, some-model, '):
        parse_openai({"input": "x", "model": "text-embedding-ada-002"}, STRICT, INFO)
    for name in ("text-embedding-3-small", "org/some-model", "some-model"):
        assert parse_openai({"input": "x", "model": name}, STRICT, INFO).texts == ["x"]


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": "x", "truncate": None, "normalize": None, "truncation_direction": None},
        {"inputs": "x", "prompt_name": None, "input_type": None, "dimensions": None},
    ],
)
def test_null_is_the_default_of_every_optional_field(body: dict[str, Any]) -> None:
    assert parse_embed(body, LIMITS, INFO) == parse_embed({"inputs": "x"}, LIMITS, INFO)


def test_null_is_the_default_of_every_optional_openai_field() -> None:
    nulls = {"model": None, "user": None, "dimensions": None, "encoding_format": None, "input_type": None}
    assert parse_openai({"input": "x", **nulls}, LIMITS, INFO) == parse_openai({"input": "x"}, LIMITS, INFO)
    assert TokenizeRequest.validated({"inputs": "x", "add_special_tokens": None}, LIMITS, INFO).add_special_tokens


def test_a_blank_or_empty_text_is_a_text_and_only_no_text_is_empty() -> None:
    assert parse_embed({"inputs": [" ", "\n\t", "", "x"]}, LIMITS, INFO).texts == [" ", "\n\t", "", "x"]
    assert parse_openai({"input": "   "}, LIMITS, INFO).texts == ["   "]
    assert parse_openai({"input": ""}, LIMITS, INFO).texts == [""]
    with pytest.raises(EmptyInput, match="'input' is empty"):
        parse_openai({"input": []}, LIMITS, INFO)


def test_with_truncation_a_text_over_the_character_limit_is_cut_at_its_end_or_start() -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(120))
    right = parse_embed({"inputs": ["short", text]}, LIMITS, INFO)
    assert right.texts == ["short", text[:50]] and right.cut == {1}
    left = parse_embed({"inputs": [text], "truncation_direction": "left"}, LIMITS, INFO)
    assert left.texts == [text[-50:]] and left.cut == {0}
    assert parse_openai({"input": text}, LIMITS, INFO).texts == [text[:50]]  # OpenAI's API always truncates
    assert parse_embed({"inputs": text[:50]}, LIMITS, INFO).cut == frozenset()  # at the limit: whole
    with pytest.raises(Unprocessable, match="more than the limit of 50"):
        TokenizeRequest.validated({"inputs": text}, LIMITS, INFO)  # tokenized whole, as TEI does: never cut


def test_similarity_and_embed_all_requests() -> None:
    similar = SimilarityRequest.parse(
        {"inputs": {"source_sentence": "a", "sentences": ["b", " "]}, "parameters": None}, LIMITS, INFO
    )
    assert (similar.texts, similar.normalize) == (["a", "b", " "], True)
    left = SimilarityRequest.parse(
        {"inputs": {"source_sentence": "a", "sentences": ["b"]}, "parameters": {"truncation_direction": "left"}},
        LIMITS,
        INFO,
    )
    assert left.truncation_direction == "left"
    with pytest.raises(EmptyInput, match=r"'inputs\.sentences' is empty"):
        SimilarityRequest.parse({"inputs": {"source_sentence": "a", "sentences": []}}, LIMITS, INFO)
    with pytest.raises(TooManyInputs, match="with the source sentence that is more than the limit of 4"):
        SimilarityRequest.parse({"inputs": {"source_sentence": "a", "sentences": ["b"] * 4}}, LIMITS, INFO)
    with pytest.raises(BadRequest, match=r"'inputs\.source_sentence' must be a string, got null"):
        SimilarityRequest.parse({"inputs": {"sentences": ["b"]}}, LIMITS, INFO)
    assert EmbedAllRequest.parse({"inputs": ["a"], "truncate": None}, LIMITS, INFO).token_vectors


@pytest.mark.parametrize(
    ("body", "error", "fragment"),
    [
        ({"ids": []}, EmptyInput, "'ids' is empty"),
        ({"ids": [[1], []]}, EmptyInput, "'ids' is empty"),
        ({"ids": [-1]}, BadRequest, "whole numbers from 0 to 4294967295"),
        ({"ids": [1.5]}, BadRequest, "whole numbers"),
        ({"ids": [[1]] * 5}, TooManyInputs, "5 lists, more than the limit of 4"),
        ({"ids": [1] * 51}, Unprocessable, "51 token ids, more than the limit of 50"),
        ({"ids": "1 2"}, BadRequest, "got string"),
    ],
)
def test_decode_body_errors(body: dict[str, Any], error: type[ServiceError], fragment: str) -> None:
    with pytest.raises(error) as caught:
        DecodeRequest.validated(body, LIMITS, INFO)
    assert fragment in caught.value.message


def test_decode_takes_one_list_of_ids_or_many() -> None:
    assert DecodeRequest.validated({"ids": [1, 2]}, LIMITS, INFO).rows == [[1, 2]]
    assert DecodeRequest.validated({"ids": [[1], [2, 3]], "skip_special_tokens": None}, LIMITS, INFO).rows == [
        [1],
        [2, 3],
    ]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [(b"", "empty"), (b"{bad", "not valid JSON"), (b"[1]", "got array"), (b"\xff\xfe", "looks like UTF-16 or UTF-32")],
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
