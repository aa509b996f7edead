"""Error types and their JSON bodies: ``{"error": {"message", "type", "code"}}``.

The ``type`` values follow the OpenAI API where one fits, so OpenAI clients
raise their usual exception classes.
"""

from __future__ import annotations

from typing import Any

import structlog
from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed

log = structlog.get_logger("app.errors")


class ServiceError(Exception):
    """An error with an HTTP status and a JSON body; raised anywhere, answered by the API."""

    status = 500
    type = "internal_error"

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

    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After`` for errors worth retrying, a challenge for 401)."""
        headers = {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return headers


class BadRequest(ServiceError):
    """Malformed JSON or a field of the wrong type."""

    status = 400
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
    """Well-formed input the service will not embed: empty, too many, too long."""

    status = 422
    type = "invalid_request_error"


class QueueFull(ServiceError):
    """Backpressure: the inference queue has no room for the request's texts."""

    status = 429
    type = "rate_limit_error"


class Unavailable(ServiceError):
    """Not ready, shutting down, over the memory limit or timed out in the queue."""

    status = 503
    type = "service_unavailable_error"


_HTTP_ERRORS: dict[int, type[ServiceError]] = {
    400: BadRequest,
    404: NotFound,
    405: MethodNotAllowed,
    408: RequestTimeout,
    413: PayloadTooLarge,
    503: Unavailable,
}


def error_for_status(status: int, message: str) -> ServiceError:
    """The service's error for an HTTP status decided outside a route (by Werkzeug or the HTTP front)."""
    error = _HTTP_ERRORS.get(status, BadRequest if 400 <= status < 500 else ServiceError)(message)
    error.status = status
    return error


def init_app(app: Flask) -> None:
    """Answer every error, ours or Flask's, with the JSON error body."""

    @app.errorhandler(ServiceError)
    def _service_error(error: ServiceError) -> Response:
        if error.status >= 500:
            log.warning("request.failed", status=error.status, error=error.message)
        elif error.status in (429, 503):
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
    response = jsonify(error.body())
    response.status_code = error.status
    response.headers.update(error.headers())
    return response
