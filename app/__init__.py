"""Embedding service: a Flask app whose memory stays flat under indexing load."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import structlog
from flask import Flask

from app import api, auth, debug, errors, instrumentation, jsonio, ops
from app.activity import ActivityTracker
from app.allocator import limit_glibc_arenas
from app.backend import EmbeddingBackend, backend_for
from app.budget import MemoryBudget, provisional_capacity
from app.components import Components, components
from app.config import SECRETS, Settings, unknown_variables
from app.engine import Engine
from app.heaptrace import HeapTracer
from app.lifecycle import RunRecord, default_state_dir
from app.memory import MemoryManager, rss_bytes
from app.metrics import Metrics
from app.version import __version__

__all__ = ["Settings", "__version__", "components", "create_app"]

log = structlog.get_logger("app")


def create_app(
    settings: Settings,
    *,
    backend: EmbeddingBackend | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
    start: bool = True,
) -> Flask:
    """Build the app: routes, metrics, engine and memory manager (threads started unless ``start=False``).

    ``backend`` defaults to the one the settings name (:func:`app.backend.backend_for`); tests pass a fake.
    """
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    jsonio.init_app(app)
    metrics = Metrics()
    engine = Engine(
        backend or backend_for(settings),
        batch_size=settings.batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        queue_size=settings.queue_size,
        metrics=metrics,
        rss_sampler=rss_bytes,
        on_fatal=on_fatal,
        request_timeout_s=settings.request_timeout_s,
    )
    # Until the model is loaded, only bodies arrive: the memory manager derives the real budget once it is.
    budget = MemoryBudget(settings.memory_budget_bytes or provisional_capacity(settings.max_body_bytes), metrics)
    manager = MemoryManager(settings, metrics=metrics, engine=engine, budget=budget)
    heap_tracer = HeapTracer() if settings.debug_endpoints else None
    state_dir = Path(settings.state_dir) if settings.state_dir else default_state_dir(settings.port)
    run = RunRecord(state_dir) if start else None  # a served app marks its run; one built for a check does not
    Components(settings, engine, manager, metrics, ActivityTracker(), heap_tracer, run).init_app(app)
    instrumentation.init_app(app, metrics)
    auth.init_app(app, settings.api_key, settings.cors_origins)
    errors.init_app(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(ops.bp)
    if settings.debug_endpoints:
        app.register_blueprint(debug.bp)
    if start:
        limit_glibc_arenas(settings.malloc_arenas)  # before the engine's and the server's threads exist
        manager.start()
        engine.start()
        assert run is not None
        _begin(run, metrics)
        unknown = unknown_variables()
        if unknown:
            log.warning(
                "config.unknown_variables",
                variables=unknown,
                message="not settings of this service (README, Configuration): they change nothing; "
                "each is shown with the setting it most resembles",
            )
        log.info(
            "service.started",
            version=__version__,
            pid=os.getpid(),
            settings={k: v for k, v in dataclasses.asdict(settings).items() if k not in SECRETS},
        )
    return app


def _begin(record: RunRecord, metrics: Metrics) -> None:
    """Mark this run as started; count and report a previous run that did not end cleanly."""
    start = record.begin()
    metrics.unclean_exits.inc(start.unclean_exits)
    metrics.previous_exit_unclean.set(start.previous is not None)
    if start.previous is not None:
        log.warning(
            "service.previous_run_unclean",
            previous=start.previous,
            unclean_exits=start.unclean_exits,
            state_dir=str(record.dir),
            message="the previous run ended without a clean shutdown: crashed, OOM-killed or SIGKILLed",
        )
