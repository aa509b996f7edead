"""Operational routes: ``/health``, ``/ready``, ``/metrics``."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

from app.components import components
from app.errors import Unavailable

bp = Blueprint("ops", __name__)


@bp.get("/health")
def health() -> Response:
    """Liveness: 200 while the process serves HTTP."""
    return jsonify(status="ok")


@bp.get("/ready")
def ready() -> tuple[Response, int]:
    """Readiness: 200 once the model is loaded and warmed up, else 503."""
    engine = components().engine
    if engine.ready:
        return jsonify(status="ready"), 200
    error = Unavailable(f"not ready: {engine.failure or engine.state}", retry_after_s=5)
    response = jsonify(status=engine.state, **error.body())
    response.headers["Retry-After"] = "5"
    return response, 503


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text exposition."""
    return Response(components().metrics.exposition(), content_type=CONTENT_TYPE_LATEST)
