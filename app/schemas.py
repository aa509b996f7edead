"""Request and response schemas of the HTTP API: the one source of validation and of ``/openapi.json``.

The pydantic models below declare every field, type and fixed constraint; :mod:`app.openapi` builds the
document from them and adds the limits that come from the settings and the loaded model. Validation
keeps this service's own messages and statuses: each field's validator runs before pydantic's and
raises a :class:`~app.errors.ServiceError` (pydantic lets those through untouched), so the types below
only ever see values that already passed.

Wrong JSON or wrong types are 400; well-typed input the service will not embed (empty, too many, too
long without truncation, an impossible ``dimensions``) is 422. An optional field is left out, ``null`` (both
mean its default, as text-embeddings-inference and OpenAI's schema have it) or of its type. Unknown fields
are ignored, as OpenAI's API does. Messages quote the client's input up to ``MAX_QUOTE_CHARS``.

Nothing that TEI or OpenAI would embed fails a batch, nor a blank chunk: a text of white space, and the
empty string (TEI and OpenAI refuse it; LlamaIndex strips a blank chunk to it), are embedded, and only no
text at all is empty; with truncation on (the default) a text longer than ``EMBEDDING_MAX_INPUT_CHARS`` is cut to
that many characters (its kept end, with ``truncation_direction: left``) before the model's own cut in
tokens; the body limit still bounds what a request can carry.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Self, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from app.backend import INPUT_TYPES, InputType, ModelInfo
from app.breakdown import PythonSample, RssByKind
from app.errors import BadRequest, EmptyInput, MalformedBody, NotFound, TooManyInputs, Unprocessable
from app.reasons import CleanupRecord, MemoryPolicy

EncodingFormat = Literal["float", "base64"]
ENCODING_FORMATS: tuple[str, ...] = get_args(EncodingFormat)
MAX_QUOTE_CHARS = 100
"""Longest quote of a client's value in an error message."""


@dataclass(frozen=True)
class Limits:
    """Per-request limits and rules from the settings."""

    max_inputs: int
    max_input_chars: int
    served_names: tuple[str, ...] = ()
    """More names the model answers to (``EMBEDDING_SERVED_MODEL_NAME``)."""
    refuse_unknown_models: bool = False
    """``EMBEDDING_MODEL_NAME_POLICY=served``: a request naming another model is a 404."""


@dataclass(frozen=True)
class EmbeddingRequest:
    """A validated embedding request, whichever route it came through."""

    texts: list[str]
    normalize: bool = True
    truncate: bool = True
    input_type: str | None = None
    dimensions: int | None = None
    encoding_format: str = "float"
    truncation_direction: str = "right"
    """Which end of an over-long text goes: ``right`` (the end) or ``left`` (the start)."""
    prompt_name: str | None = None
    """A key of the model's prompts, whose text is put before each input (TEI's ``prompt_name``)."""
    cut: frozenset[int] = frozenset()
    """Indices of the texts cut to ``EMBEDDING_MAX_INPUT_CHARS`` characters before tokenizing."""
    model: str | None = None
    """The model the request named (OpenAI's ``model``), if any."""
    token_vectors: bool = False
    """Answer each text's token vectors (``POST /embed_all``) instead of one vector a text."""

    def let_texts_go(self) -> None:
        """Empty :attr:`texts` once they are queued (the engine holds what the model reads of them), so that
        a request waiting for its answer does not hold megabytes of text it no longer needs."""
        self.texts.clear()


# --- requests ---------------------------------------------------------------------

Text = str
"""Any string is a text, white space and the empty string included: a pipeline's blank chunk (which LlamaIndex
strips to ``""``) is embedded as the model embeds no words, never a reason to fail its batch. The longest
length is a setting."""
Texts = Text | Annotated[list[Text], Field(min_length=1)]

_SCHEMA_KEYS = frozenset(
    {"$ref", "type", "anyOf", "enum", "const", "items", "minimum", "maximum", "pattern", "minLength", "minItems"}
)


def _nullable_optionals(schema: dict[str, Any]) -> None:
    """Every optional field takes ``null`` (its default) in the document, as the service does."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        if name in required:
            continue
        options = prop.get("anyOf") or [{k: v for k, v in prop.items() if k in _SCHEMA_KEYS}]
        if {"type": "null"} not in options:
            options = [*options, {"type": "null"}]
        for key in _SCHEMA_KEYS & prop.keys():
            del prop[key]
        prop["anyOf"] = options


def _without_nulls(body: dict[str, Any], required: str | None) -> dict[str, Any]:
    """``body`` without its optional fields that are ``null``: they take their defaults."""
    return {key: value for key, value in body.items() if value is not None or key == required}


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", json_schema_extra=_nullable_optionals)
    texts_field: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _texts_given(cls, body: Any) -> Any:
        if isinstance(body, dict) and cls.texts_field not in body:
            raise BadRequest(f"'{cls.texts_field}' is required: a string or a list of strings", param=cls.texts_field)
        return _without_nulls(body, cls.texts_field) if isinstance(body, dict) else body

    @classmethod
    def validated(cls, body: dict[str, Any], limits: Limits, info: ModelInfo) -> Self:
        """Validate a decoded JSON body against this route's model, the settings' limits and the model's."""
        try:
            return cls.model_validate(body, context={"limits": limits, "info": info})
        except ValidationError as exc:  # the field validators answer first; this is a safety net, never a 500
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"])
            raise BadRequest(f"'{field}': {error['msg']}", param=str(error["loc"][0])) from None

    @classmethod
    def parse(cls, body: dict[str, Any], limits: Limits, info: ModelInfo) -> EmbeddingRequest:
        """The validated embedding request of a decoded JSON body."""
        return cls.validated(body, limits, info).to_request(limits)

    def to_request(self, limits: Limits) -> EmbeddingRequest:
        raise NotImplementedError


def _limits(info: ValidationInfo) -> Limits:
    limits: Limits = (info.context or {})["limits"]
    return limits


def _model(info: ValidationInfo) -> ModelInfo:
    model: ModelInfo = (info.context or {})["info"]
    return model


TOKEN_IDS_HINT = {
    "inputs": "send the texts themselves (POST /tokenize shows how this model tokenizes a text)",
    "input": (
        "ids from another tokenizer mean nothing to this model (LangChain's OpenAIEmbeddings sends tiktoken's "
        "unless it is built with check_embedding_ctx_length=False): send the texts themselves"
    ),
}
"""How to avoid the 422 on token ids, by the route's texts field (``inputs``: TEI's, ``input``: OpenAI's)."""


def _is_token_ids(value: Any) -> bool:
    """A list of whole numbers, or a list of such lists: token ids, as TEI's and OpenAI's APIs allow."""

    def ids(items: Any) -> bool:
        return isinstance(items, list) and bool(items) and all(_is_int(i) for i in items)

    return ids(value) or (isinstance(value, list) and bool(value) and all(ids(item) for item in value))


def _whole(value: Any) -> Any:
    """A whole number written as a float (``5.0``, an "integer" to JSON Schema) as an int; anything else as is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_texts(value: Any, info: ValidationInfo) -> list[str]:
    key, limits = str(info.field_name), _limits(info)
    if _is_token_ids(value):
        raise Unprocessable(f"'{key}' holds token ids; this service embeds text only: {TOKEN_IDS_HINT[key]}", param=key)
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise BadRequest(f"'{key}' must be a string or a list of strings, got {_type_name(value)}", param=key)
    if not texts:
        raise EmptyInput(f"'{key}' is empty; send at least one text", param=key)
    if len(texts) > limits.max_inputs:
        raise TooManyInputs(f"'{key}' has {len(texts)} texts, more than the limit of {limits.max_inputs}", param=key)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadRequest(f"{key}[{i}] must be a string, got {_type_name(text)}", param=key)
        if not text.isascii() and not _encodable(text):
            raise BadRequest(
                f"{key}[{i}] is not valid Unicode text (it holds a lone surrogate, such as an unpaired \\ud800)",
                param=key,
            )
    return texts


def cut_to_limit(
    texts: list[str], limits: Limits, *, truncate: bool, keep_end: bool = False, key: str = "input"
) -> frozenset[int]:
    """Cut each text longer than ``max_input_chars`` to that many characters, in place (its end, or with
    ``keep_end`` its start, goes), as TEI cuts text over its character limit when truncation is on; without
    truncation, 422 for the first such text. The indices of the texts cut."""
    limit = limits.max_input_chars
    cut = frozenset(i for i, text in enumerate(texts) if len(text) > limit)
    if cut and not truncate:
        first = min(cut)
        raise Unprocessable(
            f"{key}[{first}] has {len(texts[first])} characters, more than the limit of {limit}; shorten it or set "
            "truncate to true",
            param=key,
        )
    for i in cut:
        texts[i] = texts[i][-limit:] if keep_end else texts[i][:limit]
    return cut


def _check_bool(value: Any, info: ValidationInfo) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"'{info.field_name}' must be true or false, got {_type_name(value)}", param=info.field_name)
    return value


def _check_input_type(value: Any) -> str:
    if not isinstance(value, str) or value not in INPUT_TYPES:
        raise BadRequest(
            f"'input_type' must be one of {', '.join(INPUT_TYPES)}, got {quote(value)}", param="input_type"
        )
    return value


def _check_dimensions(value: Any, info: ValidationInfo) -> int:
    model = _model(info)
    value = _whole(value)  # 64.0 is a whole number (and an "integer" to JSON Schema)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'dimensions' must be a whole number, got {_type_name(value)}", param="dimensions")
    if not 1 <= value <= model.dimensions:
        raise Unprocessable(
            f"'dimensions' must be from 1 to {model.dimensions} for model {quote(model.model_id)}, got {quote(value)}",
            param="dimensions",
        )
    return value


TruncationDirection = Literal["right", "left", "Right", "Left"]
"""Which end of an over-long text is cut: this service's spelling, and text-embeddings-inference's (its enum
serialised as it is named, which huggingface_hub's client sends)."""
TRUNCATION_DIRECTIONS: tuple[str, ...] = get_args(TruncationDirection)


def _check_truncation_direction(value: Any) -> str:
    if isinstance(value, str) and value in TRUNCATION_DIRECTIONS:
        return value.lower()
    raise BadRequest(
        f"'truncation_direction' must be one of {', '.join(TRUNCATION_DIRECTIONS)}, got {quote(value)}",
        param="truncation_direction",
    )


def _check_prompt_name(value: Any, info: ValidationInfo) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"'prompt_name' must be a string, got {_type_name(value)}", param="prompt_name")
    model = _model(info)
    if value not in model.prompts:
        offered = ", ".join(sorted(model.prompts)) or "none: it declares no prompts"
        raise Unprocessable(
            f"prompt_name {quote(value)} is not one of model {quote(model.model_id)}'s prompts ({offered})",
            param="prompt_name",
        )
    return value


_INPUT_TYPE_DOC = (
    "Adds the prefix the model was trained with (e5: 'query: ' / 'passage: '); nothing for models without one."
)
_DIMENSIONS_DOC = "Keep the first N components, re-normalised (at most the model's dimensions)."


class EmbedRequest(_Request):
    """``POST /embed`` and ``POST /``: text-embeddings-inference's request fields (and ``input_type``)."""

    texts_field = "inputs"
    inputs: Texts
    normalize: bool = True
    truncate: bool = Field(True, description="false: a text longer than the model's maximum sequence length is a 422.")
    truncation_direction: TruncationDirection = Field(
        "right", description="Which end of an over-long text is cut: right (its end) or left (its start)."
    )
    prompt_name: str | SkipJsonSchema[None] = Field(
        None, description="A key of the model's prompts (GET /info's prompts): its text is put before each input."
    )
    input_type: InputType | SkipJsonSchema[None] = Field(None, description=_INPUT_TYPE_DOC)
    dimensions: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = Field(None, description=_DIMENSIONS_DOC)

    _inputs = field_validator("inputs", mode="before")(_check_texts)
    _flags = field_validator("normalize", "truncate", mode="before")(_check_bool)
    _direction = field_validator("truncation_direction", mode="before")(_check_truncation_direction)
    _prompt_name = field_validator("prompt_name", mode="before")(_check_prompt_name)
    _input_type = field_validator("input_type", mode="before")(_check_input_type)
    _dimensions = field_validator("dimensions", mode="before")(_check_dimensions)

    def to_request(self, limits: Limits) -> EmbeddingRequest:
        if self.prompt_name is not None and self.input_type is not None:
            raise Unprocessable("send prompt_name or input_type, not both: each puts a prompt before the text")
        texts = [self.inputs] if isinstance(self.inputs, str) else self.inputs
        return _tei_request(
            texts,
            limits,
            self.truncate,
            self.truncation_direction,
            self.prompt_name,
            normalize=self.normalize,
            input_type=self.input_type,
            dimensions=self.dimensions,
        )


def _tei_request(
    texts: list[str],
    limits: Limits,
    truncate: bool,
    truncation_direction: str,
    prompt_name: str | None,
    **fields: Any,
) -> EmbeddingRequest:
    """A TEI route's embedding request: its texts cut to the character limit as its truncation allows."""
    keep_end = truncation_direction == "left"
    return EmbeddingRequest(
        texts,
        truncate=truncate,
        truncation_direction=truncation_direction,
        prompt_name=prompt_name,
        cut=cut_to_limit(texts, limits, truncate=truncate, keep_end=keep_end, key="inputs"),
        **fields,
    )


class OpenAIEmbeddingRequest(_Request):
    """``POST /v1/embeddings``: OpenAI's request fields."""

    texts_field = "input"
    input: Texts
    model: str | SkipJsonSchema[None] = Field(
        None,
        description="Optional. Any name is answered by the served model (the answer's model says which), unless "
        "EMBEDDING_MODEL_NAME_POLICY=served: then one of the served names.",
    )
    encoding_format: EncodingFormat = "float"
    dimensions: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = Field(None, description=_DIMENSIONS_DOC)
    input_type: InputType | SkipJsonSchema[None] = Field(None, description=_INPUT_TYPE_DOC)
    user: str | SkipJsonSchema[None] = Field(None, description="Accepted and ignored.")

    _input = field_validator("input", mode="before")(_check_texts)
    _input_type = field_validator("input_type", mode="before")(_check_input_type)
    _dimensions = field_validator("dimensions", mode="before")(_check_dimensions)

    @field_validator("model", mode="before")
    @classmethod
    def _served_model(cls, value: Any, info: ValidationInfo) -> str:
        if not isinstance(value, str):
            raise BadRequest(f"'model' must be a string, got {_type_name(value)}", param="model")
        model, limits = _model(info), _limits(info)
        if limits.refuse_unknown_models and value not in model_names(model, limits.served_names):
            raise NotFound(
                f"model {quote(value)} is not served here; this service serves {quote(model.model_id)} only, under the "
                f"names {', '.join(sorted(model_names(model, limits.served_names)))} (embeddings of different "
                "models must not be mixed in one index)",
                param="model",
            )
        return value

    @field_validator("encoding_format", mode="before")
    @classmethod
    def _encoding(cls, value: Any) -> str:
        if not isinstance(value, str) or value not in ENCODING_FORMATS:
            raise BadRequest(
                f"unsupported encoding_format {quote(value)}; use one of {', '.join(ENCODING_FORMATS)}",
                param="encoding_format",
            )
        return value

    @field_validator("user", mode="before")
    @classmethod
    def _user(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise BadRequest(f"'user' must be a string, got {_type_name(value)}", param="user")
        return value

    def to_request(self, limits: Limits) -> EmbeddingRequest:
        texts = [self.input] if isinstance(self.input, str) else self.input
        cut = cut_to_limit(texts, limits, truncate=True)  # OpenAI's API has no truncate: always on, as TEI's
        return EmbeddingRequest(
            texts,
            input_type=self.input_type,
            dimensions=self.dimensions,
            encoding_format=self.encoding_format,
            cut=cut,
            model=self.model,
        )


class TokenizeRequest(_Request):
    """``POST /tokenize``: text-embeddings-inference's request."""

    texts_field = "inputs"
    inputs: Texts
    add_special_tokens: bool = True
    prompt_name: str | SkipJsonSchema[None] = Field(
        None, description="A key of the model's prompts: its text is put before each input, and tokenized with it."
    )

    _inputs = field_validator("inputs", mode="before")(_check_texts)
    _flags = field_validator("add_special_tokens", mode="before")(_check_bool)
    _prompt_name = field_validator("prompt_name", mode="before")(_check_prompt_name)

    @property
    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else self.inputs

    @model_validator(mode="after")
    def _within_limit(self, info: ValidationInfo) -> Self:
        cut_to_limit(self.texts, _limits(info), truncate=False, key="inputs")  # TEI tokenizes texts whole: no cut
        return self


class EmbedAllRequest(_Request):
    """``POST /embed_all``: text-embeddings-inference's request for each text's token vectors."""

    texts_field = "inputs"
    inputs: Texts
    truncate: bool = Field(True, description="false: a text longer than the model's maximum sequence length is a 422.")
    truncation_direction: TruncationDirection = Field(
        "right", description="Which end of an over-long text is cut: right (its end) or left (its start)."
    )
    prompt_name: str | SkipJsonSchema[None] = Field(
        None, description="A key of the model's prompts (GET /info's prompts): its text is put before each input."
    )

    _inputs = field_validator("inputs", mode="before")(_check_texts)
    _flags = field_validator("truncate", mode="before")(_check_bool)
    _direction = field_validator("truncation_direction", mode="before")(_check_truncation_direction)
    _prompt_name = field_validator("prompt_name", mode="before")(_check_prompt_name)

    def to_request(self, limits: Limits) -> EmbeddingRequest:
        texts = [self.inputs] if isinstance(self.inputs, str) else self.inputs
        return _tei_request(
            texts,
            limits,
            self.truncate,
            self.truncation_direction,
            self.prompt_name,
            normalize=False,
            token_vectors=True,
        )


class SimilarityInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    source_sentence: Text = Field(description="The text the others are compared with.")
    sentences: Annotated[list[Text], Field(min_length=1)] = Field(description="The texts compared with it.")


class SimilarityParameters(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", json_schema_extra=_nullable_optionals)

    truncate: bool = True
    truncation_direction: TruncationDirection = "right"
    prompt_name: str | SkipJsonSchema[None] = Field(None, description="A key of the model's prompts.")

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, body: Any) -> Any:
        if not isinstance(body, dict):
            raise BadRequest(f"'parameters' must be an object, got {_type_name(body)}", param="parameters")
        return _without_nulls(body, None)

    _flags = field_validator("truncate", mode="before")(_check_bool)
    _direction = field_validator("truncation_direction", mode="before")(_check_truncation_direction)
    _prompt_name = field_validator("prompt_name", mode="before")(_check_prompt_name)


class SimilarityRequest(_Request):
    """``POST /similarity`` (and ``POST /`` with this shape, as ``InferenceClient.sentence_similarity`` sends it):
    the cosine similarity of ``source_sentence`` to each of ``sentences``."""

    texts_field = "inputs"
    inputs: SimilarityInput
    parameters: SimilarityParameters | SkipJsonSchema[None] = None

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, dict):
            raise BadRequest(
                '\'inputs\' must be an object: {"source_sentence": "...", "sentences": ["..."]}', param="inputs"
            )
        source, sentences = value.get("source_sentence"), value.get("sentences")
        if not isinstance(source, str):
            raise BadRequest(f"'inputs.source_sentence' must be a string, got {_type_name(source)}", param="inputs")
        if not isinstance(sentences, list):
            raise BadRequest(
                f"'inputs.sentences' must be a list of strings, got {_type_name(sentences)}", param="inputs"
            )
        if not sentences:
            raise EmptyInput("'inputs.sentences' is empty; send at least one text", param="inputs")
        limits = _limits(info)
        if len(sentences) + 1 > limits.max_inputs:
            raise TooManyInputs(
                f"'inputs.sentences' has {len(sentences)} texts; with the source sentence that is more than the "
                f"limit of {limits.max_inputs}",
                param="inputs",
            )
        _check_texts([source, *sentences], info)
        return value

    def to_request(self, limits: Limits) -> EmbeddingRequest:
        texts = [self.inputs.source_sentence, *self.inputs.sentences]
        options = self.parameters or SimilarityParameters.model_validate({})
        return _tei_request(texts, limits, options.truncate, options.truncation_direction, options.prompt_name)


MAX_TOKEN_ID = 2**32 - 1
"""TEI reads token ids as unsigned 32-bit numbers."""


class DecodeRequest(_Request):
    """``POST /decode``: token ids back to text (text-embeddings-inference's request)."""

    texts_field = "ids"
    ids: (
        Annotated[list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]], Field(min_length=1)]],
            Field(min_length=1),
        ]
    )
    skip_special_tokens: bool = True

    _flags = field_validator("skip_special_tokens", mode="before")(_check_bool)

    @field_validator("ids", mode="before")
    @classmethod
    def _ids(cls, value: Any, info: ValidationInfo) -> Any:
        form = "a list of token ids or a list of such lists"
        if not isinstance(value, list):
            raise BadRequest(f"'ids' must be {form}, got {_type_name(value)}", param="ids")
        rows = value if value and isinstance(value[0], list) else [value]
        rows = [[_whole(n) for n in row] if isinstance(row, list) else row for row in rows]
        value = rows if value and isinstance(value[0], list) else rows[0]
        limits = _limits(info)
        if not value or not all(rows):
            raise EmptyInput("'ids' is empty; send at least one token id", param="ids")
        if len(rows) > limits.max_inputs:
            raise TooManyInputs(f"'ids' has {len(rows)} lists, more than the limit of {limits.max_inputs}", param="ids")
        for i, row in enumerate(rows):
            if not isinstance(row, list) or not all(_is_int(n) and 0 <= n <= MAX_TOKEN_ID for n in row):
                raise BadRequest(f"'ids' must be {form} (whole numbers from 0 to {MAX_TOKEN_ID})", param="ids")
            if len(row) > limits.max_input_chars:
                raise Unprocessable(
                    f"ids[{i}] has {len(row)} token ids, more than the limit of {limits.max_input_chars}", param="ids"
                )
        return value

    @property
    def rows(self) -> list[list[int]]:
        return self.ids if self.ids and isinstance(self.ids[0], list) else [self.ids]  # type: ignore[list-item]


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object, as RFC 8259 has it: UTF-8 (not UTF-16 or UTF-32, which
    Python's own decoder guesses from the first bytes), each key once (not the last of several), and numbers
    only (not ``NaN`` or ``Infinity``)."""
    if not raw.strip():
        raise MalformedBody("request body is empty; send a JSON object")
    if raw[:2] in _UTF16_32_STARTS or raw[:1] == b"\x00" or raw[1:2] == b"\x00":
        raise MalformedBody("request body is not UTF-8 (it looks like UTF-16 or UTF-32); send JSON in UTF-8")
    try:
        body = json.loads(raw.decode("utf-8-sig"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise MalformedBody(f"request body is not UTF-8 (byte {exc.start} is not part of a character)") from None
    except json.JSONDecodeError as exc:
        raise MalformedBody(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedBody("request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # a repeated key, NaN, or more digits than Python converts (sys.get_int_max_str_digits)
        detail = str(exc) if isinstance(exc, _NotJson) else "a number is too long"
        raise MalformedBody(f"request body is not valid JSON: {detail}") from None
    if not isinstance(body, dict):
        raise MalformedBody(f"request body must be a JSON object, got {_type_name(body)}")
    return body


_UTF16_32_STARTS = frozenset({b"\xff\xfe", b"\xfe\xff"})
"""The byte order marks of UTF-16 and UTF-32 (little and big endian); UTF-8's is ignored, as RFC 8259 allows."""


class _NotJson(ValueError):
    """What JSON itself does not allow, though Python's decoder takes it."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    body = dict(pairs)
    if len(body) != len(pairs):
        repeated = next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise _NotJson(f"the key {quote(repeated)} appears more than once in an object")
    return body


def _no_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON value (numbers must be finite)")


def parse_embed(body: dict[str, Any], limits: Limits, info: ModelInfo) -> EmbeddingRequest:
    """Validate a ``POST /embed`` body."""
    return EmbedRequest.parse(body, limits, info)


def parse_openai(body: dict[str, Any], limits: Limits, info: ModelInfo) -> EmbeddingRequest:
    """Validate an OpenAI-style ``POST /v1/embeddings`` body."""
    return OpenAIEmbeddingRequest.parse(body, limits, info)


# --- responses --------------------------------------------------------------------
# What the routes answer. The embedding routes build their (large) answers directly; the tests hold every
# answer to these models, which forbid fields they do not declare, so the document cannot fall behind.


def _no_null_defaults(schema: dict[str, Any]) -> None:
    """An answer's field that is left out when empty is never ``null``: the document gives it no default."""
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop["default"] is None:
            del prop["default"]


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_no_null_defaults)


class EmbedResponse(RootModel[list[list[float]]]):
    """``POST /embed`` and ``POST /``: one vector per text, in order (also for a single string), as TEI answers.
    The tokens, characters and times are in the x-compute-* and x-*-time headers."""


class SimpleToken(_Answer):
    id: int
    text: str = Field(description="The token's text in the input, or the special token itself.")
    special: bool
    start: int | None = Field(description="Byte offset of the token in the UTF-8 input (null for special tokens).")
    stop: int | None = Field(description="Byte offset just past the token (null for special tokens).")


class TokenizeResponse(RootModel[list[list[SimpleToken]]]):
    """``POST /tokenize``: each input's tokens, in order, as TEI answers."""


class EmbedAllResponse(RootModel[list[list[list[float]]]]):
    """``POST /embed_all``: each text's token vectors (one per token the model read, special tokens included)."""


class SimilarityResponse(RootModel[list[float]]):
    """``POST /similarity``: the cosine similarity of the source sentence to each sentence, in order."""


class DecodeResponse(RootModel[list[str]]):
    """``POST /decode``: each list of ids as text."""


class TeiErrorResponse(_Answer):
    """Every error on TEI's routes (app/routes.py), in TEI 1.9's shape and spelling."""

    error: str
    error_type: Literal["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty"]


class OpenAIEmbedding(_Answer):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | Annotated[str, Field(json_schema_extra={"contentEncoding": "base64"})]


class OpenAIUsage(_Answer):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(_Answer):
    """``POST /v1/embeddings``: OpenAI's answer; base64 vectors are little-endian float32."""

    object: Literal["list"]
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class ErrorDetail(_Answer):
    message: str
    type: str
    code: int
    param: str | SkipJsonSchema[None] = None


class ErrorResponse(_Answer):
    """Every error: ``type`` follows OpenAI's where one fits, so OpenAI clients raise their usual exceptions."""

    error: ErrorDetail


class HealthResponse(_Answer):
    status: Literal["ok"]


class ReadyResponse(_Answer):
    """``status`` is the engine's state, or ``shedding`` while memory is above the hard limit; while it is
    not ``ready`` the answer is a 503 with the error."""

    status: str
    error: ErrorDetail | SkipJsonSchema[None] = None


class ActivityResponse(_Answer):
    minutes: int
    requests: int
    queue_depth: int
    last_request_at: float | None = Field(description="Unix time of the last embedding request, null if none.")


class InfoLimits(_Answer):
    max_inputs: int
    max_input_chars: int
    max_body_bytes: int
    queue_size: int
    request_timeout_s: float


class InfoResponse(_Answer):
    """What this service serves and its limits (a 503 until the model is loaded, as TEI answers nothing then)."""

    version: str
    status: str
    model: str
    dimensions: int
    max_seq_length: int
    device: str
    dtype: str = Field(description="The precision the model computes in: float32, bfloat16 or float16.")
    dtype_reason: str = Field(description="Why that dtype: the setting, or what auto found on this hardware.")
    backend: Literal["torch", "openvino"] = Field(description="The runtime the forward pass runs in.")
    backend_reason: str = Field(description="Why that runtime: the setting, or what auto measured at start.")
    calibration: Literal["measured", "cached"] = Field(
        description="measured: the dtype, runtime and batch cost were measured at this start; cached: read from what "
        "an earlier start of the same model measured on this machine, with the same libraries and settings, and "
        "checked with one probe batch."
    )
    calibrated_at: str = Field(description="When they were measured (UTC, ISO 8601).")
    input_types: list[InputType]
    prompts: dict[str, str] = Field(description="The model's prompts: the prompt_name values /embed takes.")
    batch_size: int
    max_batch_tokens: int
    limits: InfoLimits
    memory_policy: MemoryPolicy
    model_names: list[str] = Field(description="The names the model answers to on the OpenAI routes.")
    model_name_policy: str = Field(
        description="any: a request naming another model is answered by this one; served: it is a 404."
    )
    # text-embeddings-inference's fields, for its clients
    model_id: str
    model_sha: str | None = Field(description="The model's hub commit where it came from the hub's cache, else null.")
    model_dtype: str
    served_model_name: str = Field(description="The first of EMBEDDING_SERVED_MODEL_NAME, else the model id.")
    model_type: dict[str, dict[str, str]] = Field(description='{"embedding": {"pooling": ...}}, as TEI says.')
    max_concurrent_requests: int = Field(description="Requests served at once (more wait for a request thread).")
    max_input_length: int = Field(description="The model's maximum sequence length in tokens.")
    max_batch_requests: int = Field(description="Texts per model batch.")
    max_client_batch_size: int = Field(description="Texts per request.")
    auto_truncate: bool = Field(description="Whether texts are truncated when a request does not say (it is).")
    tokenization_workers: int = Field(description="Threads that tokenize: the request threads.")
    sha: str | None = Field(description="The commit the image was built from (its build argument), else null.")
    docker_label: str | None = Field(description="The image's label (its build argument), else null.")


class AllocatorBreakdown(_Answer):
    name: str = Field(description="The allocator in use: jemalloc, glibc or other.")
    accounts: dict[str, int] = Field(
        description="jemalloc allocated/active/resident/retained/mapped or glibc in_use/free/mmapped/resident, in "
        "bytes; empty where the allocator reports none."
    )
    free_but_kept_bytes: int | None = Field(description="Freed but kept by the allocator: what a cleanup gives back.")


class MemoryBreakdown(_Answer):
    """Where the memory is: the kernel's, the allocator's and the interpreter's accounts."""

    rss_by_kind: RssByKind | None
    allocator: AllocatorBreakdown
    python: PythonSample
    weight_bytes: int | None = Field(description="The model's parameters and buffers (null until loaded).")


class CudaMemory(_Answer):
    allocated_bytes: int
    reserved_bytes: int


class MemoryThresholds(_Answer):
    elevated_bytes: int
    high_bytes: int
    limit_bytes: int | None = Field(description="The hard limit above which new requests are shed; null if none.")
    limit_source: str | None = Field(description="config (EMBEDDING_MEMORY_LIMIT_BYTES) or cgroup (90% of it).")


class CleanupTriggers(_Answer):
    interval_s: float
    every_requests: int
    cooldown_s: float
    monitor_interval_s: float
    trim_after_batch: bool
    trim_interval_s: float


class MemoryBudgetReport(_Answer):
    """What requests in flight may hold (app/budget.py): null fields until the model is loaded."""

    capacity_bytes: int = Field(description="The budget: memory that requests in flight may hold at once.")
    used_bytes: int = Field(description="Held now: bodies, texts, queued work and answers of requests in flight.")
    peak_bytes: int = Field(description="The most ever held at once since the start.")
    baseline_bytes: int | None = Field(description="RSS once the model was loaded and warmed up.")
    ceiling_bytes: int | None = Field(description="The lowest of the elevated threshold and the hard limit.")
    batch_reserve_bytes: int | None = Field(description="Activations of the largest batch, kept out of the budget.")
    max_batch_tokens: int | None = Field(description="Padded tokens of the largest batch (less where room is short).")
    activation_bytes_per_token: int | None = Field(
        description="Peak activation bytes per padded token (the model's width)."
    )
    source: Literal["derived", "config"] = Field(description="derived, or config (EMBEDDING_MEMORY_BUDGET_BYTES).")


class MemoryResponse(_Answer):
    """``GET /memory``: memory now, its breakdown, the thresholds, the cleanups so far and the triggers."""

    status: Literal["normal", "elevated", "high"]
    policy: MemoryPolicy
    allocator: str
    rss_bytes: int
    uss_bytes: int | None
    breakdown: MemoryBreakdown
    cuda: CudaMemory | None
    thresholds: MemoryThresholds
    cgroup_limit_bytes: int | None
    shedding: bool = Field(description="Above the hard limit: new embedding requests get 503 and /ready 503.")
    budget: MemoryBudgetReport
    cleanup_running: bool
    last_cleanup: CleanupRecord | None
    cleanups: dict[str, int] = Field(description="Cleanups run so far, by reason.")
    ineffective_cleanups: dict[str, int] = Field(
        description="Cleanups, by reason, that gave back less than 1 MiB to the operating system (RSS before - after)."
    )
    requests_since_cleanup: int
    triggers: CleanupTriggers


class GrowthSite(_Answer):
    """One allocation site (a line of code, reached through one chain of callers) and how much more memory
    it held at the end of the window."""

    file: str = Field(description="The source file, relative to its import path entry (e.g. torch/nn/functional.py).")
    line: int
    size_bytes: int = Field(description="Growth of the bytes allocated here and still held, over the window.")
    count: int = Field(description="Growth of the number of blocks allocated here and still held.")
    held_bytes: int = Field(description="Bytes allocated here since tracing started and held at the window's end.")
    traceback: list[str] = Field(
        description="file:line of the allocation and its callers, innermost first (up to 8 frames)."
    )


class HeapGrowthResponse(_Answer):
    """``POST /debug/memory/snapshot``: the allocation sites whose held memory grew most, largest first."""

    seconds: float = Field(description="The window measured (shorter when the service was shutting down).")
    started_tracing: bool = Field(description="Whether tracing was started for this window and stopped after it.")
    growth_bytes: int = Field(description="Total growth over every site that grew.")
    tracemalloc_memory_bytes: int = Field(description="Memory the traces themselves took at the window's end.")
    sites: list[GrowthSite]


def model_names(info: ModelInfo, served: tuple[str, ...] = ()) -> set[str]:
    """Names the served model answers to: its id, the id's last part and ``EMBEDDING_SERVED_MODEL_NAME``'s."""
    return {info.model_id, info.model_id.rsplit("/", 1)[-1], *served}


def quote(value: Any) -> str:
    """``value`` as JSON writes it (``null``, ``true``, ``"text"``, ``{"k": null}``: the client's own words, not
    Python's), up to :data:`MAX_QUOTE_CHARS`, marked when cut: error messages never echo a whole input. A value
    nested deeper than can be written (an array in an array, about 980 deep) is named, not shown: the
    RecursionError it raised was a 500 for a client's bad input."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except RecursionError:
        return f"an {_type_name(value)} nested too deeply to show"
    except ValueError:  # a number of more digits than Python converts
        return "a number of thousands of digits" if _is_int(value) else f"an {_type_name(value)} holding such a number"
    if not _encodable(text):  # a lone surrogate (\ud800) cannot be written in UTF-8: escaped, as JSON allows
        text = json.dumps(value, default=repr)
    return text if len(text) <= MAX_QUOTE_CHARS else f"{text[:MAX_QUOTE_CHARS]}... ({len(text)} characters)"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
