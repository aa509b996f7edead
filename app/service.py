"""One instance of the service: every part built from settings read once, its threads started and stopped in order.

Building a :class:`Service` starts nothing and changes nothing in the process: no thread, no ``gc.freeze()``, no
allocator setting, no file. :meth:`Service.start` does, in this order: the glibc arena cap (before any thread
exists), the memory monitor (hooked into the engine before its thread runs, so the model's load is frozen and the
budget derived once it is loaded), the inference thread (it loads the model), then the run's marker. :meth:`stop`
ends them in reverse: a heap trace, the monitor, the engine (it drains its queue first), the marker last, so a
clean exit is recorded only once everything stopped. gunicorn's worker runs both through the ASGI lifespan
(:func:`app.server.serve`); tests and tools use the service as a context manager.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import structlog
from flask import Flask

from app import api, auth, debug, errors, instrumentation, jsonio, ops
from app.activity import ActivityTracker
from app.backend import EmbeddingBackend, backend_for
from app.budget import MemoryBudget, provisional_capacity
from app.components import Components
from app.config import SECRETS, Settings, unknown_variables
from app.engine import Engine
from app.heaptrace import HeapTracer
from app.lifecycle import RunRecord, default_state_dir
from app.memory import HeapActions, MemoryManager, rss_bytes
from app.metrics import Metrics
from app.version import __version__

log = structlog.get_logger("app")


class Service:
    """The engine, the memory manager, the metrics, the run's record and the Flask app of one instance."""

    def __init__(
        self,
        settings: Settings,
        *,
        backend: EmbeddingBackend | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        heap: HeapActions | None = None,
        record_run: bool = True,
    ) -> None:
        """``backend`` defaults to the one the settings name (:func:`app.backend.backend_for`; tests pass a fake),
        ``heap`` to the real collector and allocator (tests record them), ``record_run`` marks the run in the
        state directory (:mod:`app.lifecycle`) when it starts."""
        self.settings = settings
        self.metrics = Metrics()
        self.engine = Engine(
            backend or backend_for(settings),
            batch_size=settings.batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            queue_size=settings.queue_size,
            metrics=self.metrics,
            rss_sampler=rss_bytes,
            on_fatal=on_fatal,
            request_timeout_s=settings.request_timeout_s,
            startup_timeout_s=settings.startup_timeout_s,
        )
        # Until the model is loaded only bodies arrive: the memory manager derives the real budget once it is.
        budget = MemoryBudget(
            settings.memory_budget_bytes or provisional_capacity(settings.max_body_bytes), self.metrics
        )
        self.memory = MemoryManager(settings, metrics=self.metrics, engine=self.engine, budget=budget, heap=heap)
        self.heap_tracer = HeapTracer() if settings.debug_endpoints else None
        state_dir = Path(settings.state_dir) if settings.state_dir else default_state_dir(settings.port)
        self.run = RunRecord(state_dir) if record_run else None
        self.app = self._build_app()
        self._state = "created"

    def _build_app(self) -> Flask:
        settings = self.settings
        app = Flask(__name__)
        app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
        jsonio.init_app(app)
        Components(settings, self.engine, self.memory, self.metrics, ActivityTracker(), self.heap_tracer).init_app(app)
        instrumentation.init_app(app, self.metrics)
        auth.init_app(app, settings.api_key, settings.cors_origins)
        errors.init_app(app)
        app.register_blueprint(api.bp)
        app.register_blueprint(ops.bp)
        if settings.debug_endpoints:
            app.register_blueprint(debug.bp)
        return app

    def start(self) -> None:
        """Start the memory monitor, then the engine (it loads the model), then mark the run."""
        if self._state != "created":
            raise RuntimeError(f"the service is {self._state}: a service starts once")
        self._state = "started"
        self.memory.start()
        self.engine.start()
        if self.run is not None:
            self._begin(self.run)
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
            settings={k: v for k, v in dataclasses.asdict(self.settings).items() if k not in SECRETS},
        )

    def stop(self, timeout_s: float | None = None) -> None:
        """End a heap trace, stop the monitor, let the engine drain its queue and stop (at most ``timeout_s``,
        by default the request timeout and at least 30 s), then record a clean exit. Idempotent."""
        if self._state != "started":
            self._state = "stopped"
            return
        self._state = "stopped"
        if self.heap_tracer is not None:
            self.heap_tracer.stop()
        self.memory.stop()
        self.engine.stop(timeout_s=max(30.0, self.settings.request_timeout_s) if timeout_s is None else timeout_s)
        if self.run is not None:
            self.run.end()  # a clean exit: an upgrade's or a rollout's restart is not counted

    def __enter__(self) -> Service:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _begin(self, record: RunRecord) -> None:
        """Mark this run as started; count and report a previous run that did not end cleanly."""
        start = record.begin()
        self.metrics.unclean_exits.inc(start.unclean_exits)
        self.metrics.previous_exit_unclean.set(start.previous is not None)
        if start.previous is not None:
            log.warning(
                "service.previous_run_unclean",
                previous=start.previous,
                unclean_exits=start.unclean_exits,
                state_dir=str(record.dir),
                message="the previous run ended without a clean shutdown: crashed, OOM-killed or SIGKILLed",
            )
