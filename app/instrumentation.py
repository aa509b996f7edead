"""Request instrumentation: a request id bound to each request's log lines and echoed, one
``request.completed`` line, and the request counters and duration histogram of :mod:`app.metrics`."""

from __future__ import annotations

import re
import time
import uuid

import structlog
from flask import Flask, Response, g, request

from app.metrics import Metrics
from app.routes import QUIET_LABELS, label_for

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")

log = structlog.get_logger("app.http")


def new_request_id(supplied: str | None) -> str:
    """The client's ``X-Request-ID`` when it is a sane token, else a new random id."""
    if supplied and _REQUEST_ID_RE.match(supplied):
        return supplied
    return uuid.uuid4().hex


def init_app(app: Flask, metrics: Metrics) -> None:
    """Bind a request id to every request, echo it, and emit one ``request.completed`` line."""

    @app.before_request
    def _bind_request() -> None:
        g.started = time.perf_counter()
        g.request_id = new_request_id(request.headers.get(REQUEST_ID_HEADER))
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=g.request_id)

    @app.after_request
    def _complete_request(response: Response) -> Response:
        request_id = g.get("request_id") or new_request_id(None)
        response.headers[REQUEST_ID_HEADER] = request_id
        route = label_for(request.method, request.url_rule.rule if request.url_rule is not None else None)
        duration = time.perf_counter() - g.get("started", time.perf_counter())
        metrics.requests.labels(route=route, code=str(response.status_code)).inc()
        metrics.request_duration.labels(route=route).observe(duration)
        emit = log.debug if route in QUIET_LABELS else log.info
        fields = {"inputs": g.inputs} if "inputs" in g else {}
        emit(
            "request.completed",
            method=request.method,
            route=route,
            status=response.status_code,
            duration_ms=round(duration * 1000, 2),
            **fields,
        )
        return response

    @app.teardown_request
    def _unbind_request(_exc: BaseException | None) -> None:
        structlog.contextvars.clear_contextvars()
