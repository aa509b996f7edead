"""Error types and their JSON bodies, in the two shapes clients expect.

Everywhere but text-embeddings-inference's routes: ``{"error": {"message", "type", "code"}}``, whose
``type`` values follow the OpenAI API where one fits, so OpenAI clients raise their usual exception
classes. On TEI's routes (:data:`app.routes.TEI_PATHS`): TEI's ``{"error": "...", "error_type": "..."}``
with TEI 1.9's statuses and its ``error_type`` spelling (its router's serialised enum), so TEI clients
(``huggingface_hub``, the LangChain/LlamaIndex/Haystack embedders) read them as they read TEI's: 400
Empty, 422 Validation (too many inputs included) or Tokenizer, 424 Backend, 429 Overloaded, 503 Unhealthy.
"""

from __future__ import annotations

from typing import Any

import structlog
from flask import Flask, Response, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed

from app.routes import TEI_PATHS

log = structlog.get_logger("app.errors")

TEI_ERROR_TYPES = ("Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty")
"""text-embeddings-inference's ``error_type`` values, as its router serialises its ``ErrorType`` enum."""

_TEI_TYPES = {429: "Overloaded", 503: "Unhealthy"}


class ServiceError(Exception):
    """An error with an HTTP status and a JSON body; raised anywhere, answered by the API."""

    status = 500
    type = "internal_error"
    tei_status: int | None = None
    """The status on TEI's routes where it differs from :attr:`status`."""
    tei_error_type: str | None = None
    """TEI's ``error_type`` where :attr:`tei_type`'s rule by status does not give it."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        error: dict[str, Any] = {"message": self.message, "type": self.type, "code": self.status}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}

    @property
    def tei_type(self) -> str:
        """TEI's ``error_type``: Unhealthy (503), Overloaded (429), Backend (other 5xx), Validation (4xx),
        unless the class says otherwise (Empty, Tokenizer)."""
        if self.tei_error_type is not None:
            return self.tei_error_type
        return _TEI_TYPES.get(self.status, "Backend" if self.status >= 500 else "Validation")

    def tei_body(self) -> dict[str, str]:
        """The JSON body of the error on TEI's routes."""
        return {"error": self.message, "error_type": self.tei_type}

    def status_for(self, path: str) -> int:
        """The HTTP status on the route at ``path``."""
        if path in TEI_PATHS and self.tei_status is not None:
            return self.tei_status
        return self.status

    def body_for(self, path: str) -> dict[str, Any]:
        """The JSON body on the route at ``path``."""
        return self.tei_body() if path in TEI_PATHS else self.body()

    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After`` for errors worth retrying, a challenge for 401)."""
        headers = {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return headers


class BadRequest(ServiceError):
    """A field of the wrong type (TEI: 422, as its JSON extractor answers one), or text that is not text."""

    status = 400
    type = "invalid_request_error"
    tei_status: int | None = 422


class MalformedBody(BadRequest):
    """A body that is not a JSON object (TEI: 400, as its JSON extractor answers a syntax error)."""

    tei_status: int | None = None


class UnsupportedMediaType(ServiceError):
    """A body that is not declared as JSON in UTF-8, or sent compressed (415, on every route)."""

    status = 415
    type = "invalid_request_error"


class Unauthorized(ServiceError):
    """A missing or wrong admin token."""

    status = 401
    type = "authentication_error"


class Forbidden(ServiceError):
    """An admin route called from where it does not answer (another host without a token, a browser)."""

    status = 403
    type = "permission_error"


class NotFound(ServiceError):
    """An unknown route or model."""

    status = 404
    type = "not_found_error"


class MethodNotAllowed(ServiceError):
    """A known route called with the wrong method."""

    status = 405
    type = "invalid_request_error"


class Conflict(ServiceError):
    """The operation is already running."""

    status = 409
    type = "conflict_error"


class PayloadTooLarge(ServiceError):
    """A request body over the size limit."""

    status = 413
    type = "invalid_request_error"


class RequestTimeout(ServiceError):
    """The request did not arrive in time (answered by the HTTP front, app.server)."""

    status = 408
    type = "timeout_error"


class ClientClosed(ServiceError):
    """The client went away before its answer was ready; nobody reads this one (nginx's 499)."""

    status = 499
    type = "client_closed_request"


class TooManyRequests(ServiceError):
    """A rate-limited operation asked for again too soon."""

    status = 429
    type = "rate_limit_error"


class Unprocessable(ServiceError):
    """Well-formed input the service will not embed: too long, token ids, an impossible option."""

    status = 422
    type = "invalid_request_error"


class EmptyInput(Unprocessable):
    """No text at all (TEI: 400 ``Empty``); a blank or empty text is embedded (app/schemas.py)."""

    tei_status: int | None = 400
    tei_error_type = "Empty"


class TooManyInputs(Unprocessable):
    """More texts in one request than the limit (TEI 1.9: 422 ``Validation``, as every validation error)."""


class TokenizerFailed(Unprocessable):
    """The tokenizer could not encode a text (TEI: 422 ``Tokenizer``)."""

    tei_error_type = "Tokenizer"


class ModelFailed(ServiceError):
    """The model failed on an input, or the inference thread died (TEI: 424 ``Backend``)."""

    tei_status: int | None = 424


class QueueFull(ServiceError):
    """Backpressure: the inference queue has no room for the request's texts, or no time to answer them."""

    status = 429
    type = "rate_limit_error"


class TooSlow(PayloadTooLarge):
    """A request whose own texts would take longer to embed than its timeout allows: it could never be answered
    in time (413, as text-embeddings-inference answers a request over its limits)."""


class Unavailable(ServiceError):
    """Not ready, shutting down, over the memory limit or timed out in the queue."""

    status = 503
    type = "service_unavailable_error"


class NotSupported(ServiceError):
    """What the service does not implement, such as a transfer coding other than chunked (RFC 9112 section 6.1)."""

    status = 501
    type = "not_supported_error"


_HTTP_ERRORS: dict[int, type[ServiceError]] = {
    400: MalformedBody,
    404: NotFound,
    405: MethodNotAllowed,
    408: RequestTimeout,
    413: PayloadTooLarge,
    501: NotSupported,
    503: Unavailable,
}


REFUSALS = frozenset({408, 413, 429, 503})
"""Statuses of requests refused for what they cost or when they came, not for what they said: logged as
``request.rejected``."""


def error_for_status(status: int, message: str) -> ServiceError:
    """The service's error for an HTTP status decided outside a route (by Werkzeug or the HTTP front)."""
    error = _HTTP_ERRORS.get(status, BadRequest if 400 <= status < 500 else ServiceError)(message)
    error.status = status
    error.tei_status = None  # decided before any route: the same status on every route
    return error


def init_app(app: Flask) -> None:
    """Answer every error, ours or Flask's, with the JSON error body."""

    @app.errorhandler(ServiceError)
    def _service_error(error: ServiceError) -> Response:
        if error.status >= 500 and error.status != 503:
            log.warning("request.failed", status=error.status, error=error.message)
        elif error.status in REFUSALS:
            log.info("request.rejected", status=error.status, reason=error.type, error=error.message)
        return _respond(error)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        message = error.description or error.name
        if status == 413:
            message = f"request body is larger than the limit of {app.config['MAX_CONTENT_LENGTH']} bytes"
        response = _respond(error_for_status(status, message))
        if isinstance(error, WerkzeugMethodNotAllowed) and error.valid_methods:
            response.headers["Allow"] = ", ".join(sorted(error.valid_methods))  # RFC 9110 section 15.5.6
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        log.exception("request.failed", error=str(error), error_type=type(error).__name__)
        return _respond(ServiceError("internal error; see the service log for this request id"))


def _respond(error: ServiceError) -> Response:
    path = request.path if has_request_context() else ""
    response = jsonify(error.body_for(path))
    response.status_code = error.status_for(path)
    response.headers.update(error.headers())
    return response
