"""Debugging routes for operators, registered only with ``EMBEDDING_DEBUG_ENDPOINTS=true`` (404 otherwise)
and answering only with the admin token (the setting refuses to start without one)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from app.components import components
from app.heaptrace import MAX_SECONDS, MAX_TOP
from app.ops import require_admin, whole_number_arg

bp = Blueprint("debug", __name__, url_prefix="/debug")


@bp.post("/memory/snapshot")
def memory_snapshot() -> Response:
    """Trace Python allocations for ``seconds`` (default 30) and answer the ``top`` (default 20) sites whose
    held memory grew most: where a leak allocates. One at a time (409); admin token required."""
    parts = components()
    require_admin(parts.settings.admin_token)
    seconds = whole_number_arg("seconds", 30, MAX_SECONDS)
    top = whole_number_arg("top", 20, MAX_TOP)
    assert parts.heap_tracer is not None  # registered with it
    return jsonify(parts.heap_tracer.growth(seconds, top).model_dump())
