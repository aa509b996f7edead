"""Structured logging: structlog configured once, JSON lines off a TTY.

Every line is one JSON object with ``timestamp``, ``level`` and ``event``, plus
``request_id`` while a request is being handled (bound by :mod:`app.instrumentation`).
Standard-library records (gunicorn, transformers) go through the same renderer.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import Processor


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
