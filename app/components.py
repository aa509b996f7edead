"""The parts of one app instance, attached to it as ``app.extensions["embedding"]``."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app

from app.activity import ActivityTracker
from app.budget import MemoryBudget
from app.config import Settings
from app.engine import Engine
from app.heaptrace import HeapTracer
from app.memory import MemoryManager
from app.metrics import Metrics
from app.schemas import Limits

EXTENSION_KEY = "embedding"


@dataclass(frozen=True)
class Components:
    """Settings, engine, memory manager and metrics of one app; routes reach them through :func:`components`."""

    settings: Settings
    engine: Engine
    memory: MemoryManager
    metrics: Metrics
    activity: ActivityTracker
    heap_tracer: HeapTracer | None = None  # with EMBEDDING_DEBUG_ENDPOINTS=true

    @property
    def budget(self) -> MemoryBudget:
        """What requests in flight may hold: the memory manager's (it derives it once the model is loaded)."""
        return self.memory.budget

    @property
    def limits(self) -> Limits:
        settings = self.settings
        return Limits(
            max_inputs=settings.max_inputs,
            max_input_chars=settings.max_input_chars,
            served_names=settings.served_model_name,
            refuse_unknown_models=settings.model_name_policy == "served",
        )

    def init_app(self, app: Flask) -> None:
        """Attach to ``app``."""
        app.extensions[EXTENSION_KEY] = self


def components(app: Flask | None = None) -> Components:
    """The components of ``app`` (default: the app handling the current request)."""
    found: Components = (app or current_app).extensions[EXTENSION_KEY]
    return found
