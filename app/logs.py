"""Structured logging: structlog configured once, JSON lines off a TTY, request ids in contextvars.

Every line is one JSON object with ``timestamp``, ``level`` and ``event``, plus
``request_id`` while a request is being handled. Standard-library records
(gunicorn, transformers) go through the same renderer.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from typing import Any, TextIO

import structlog
from flask import Flask, Response, g, request
from structlog.typing import Processor

from app.metrics import Metrics

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
_QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})

log = structlog.get_logger("app.http")


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]


def _renderer(json_lines: bool) -> Processor:
    if json_lines:
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(colors=False)


def configure_logging(level: str = "info", *, json_lines: bool | None = None, stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library; JSON unless writing to a TTY."""
    out = stream if stream is not None else sys.stdout
    as_json = (not out.isatty()) if json_lines is None else json_lines
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _renderer(as_json),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(stdlib_formatter(as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))


def stdlib_formatter(json_lines: bool = True) -> logging.Formatter:
    """A formatter that renders standard-library records like structlog events."""
    return structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _renderer(json_lines)],
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            *_shared_processors(),
            structlog.stdlib.ExtraAdder(),
        ],
    )


def gunicorn_logconfig(level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for gunicorn's own loggers, rendering JSON lines."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "app.logs.stdlib_formatter"}},
        "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
        "root": {"handlers": ["stdout"], "level": "WARNING"},
        "loggers": {
            "gunicorn.error": {"handlers": ["stdout"], "level": level.upper(), "propagate": False},
            "gunicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
        },
    }


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
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        duration = time.perf_counter() - g.get("started", time.perf_counter())
        metrics.requests.labels(route=route, code=str(response.status_code)).inc()
        metrics.request_duration.labels(route=route).observe(duration)
        emit = log.debug if route in _QUIET_ROUTES else log.info
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
