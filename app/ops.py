"""Operational routes: ``/live``, ``/health`` (and TEI's ``GET /`` and ``/ping``), ``/ready``, ``/activity``,
``/memory``, ``/cleanup``, ``/metrics``."""

from __future__ import annotations

import hmac
import ipaddress

from flask import Blueprint, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST

from app.activity import WINDOW_MINUTES
from app.components import components
from app.errors import BadRequest, Forbidden, Unauthorized, Unavailable
from app.schemas import quote

bp = Blueprint("ops", __name__)


@bp.get("/live")
def live() -> Response:
    """Liveness: 200 while the process serves HTTP, loading its model or not (the Kubernetes liveness probe:
    a process that loads a large model is not restarted for it)."""
    return jsonify(status="ok")


@bp.get("/health")
@bp.get("/ping")
@bp.get("/")
def health() -> Response:
    """Health as text-embeddings-inference answers it (``InferenceClient.health_check()``, load balancers'
    default probe of ``/``): 200 once the model is loaded and serves, 503 while it loads or if it failed.
    Shedding load is not ill health: ``/ready`` says when to send requests elsewhere."""
    engine = components().engine
    if not engine.ready:
        raise Unavailable(f"unhealthy: {engine.failure or engine.state}", retry_after_s=5)
    return jsonify(status="ok")


@bp.get("/ready")
def ready() -> tuple[Response, int]:
    """Readiness: 200 once the model is loaded and warmed up, else 503; also 503 while memory is above the
    hard limit (new requests would be shed), so that a load balancer sends them to another replica."""
    parts = components()
    engine = parts.engine
    if engine.ready and not parts.memory.over_limit():
        return jsonify(status="ready"), 200
    if engine.ready:
        status = "shedding"
        error = Unavailable(
            "shedding load: memory is above the service's limit; send requests elsewhere", retry_after_s=5
        )
    else:
        status = engine.state
        error = Unavailable(f"not ready: {engine.failure or engine.state}", retry_after_s=5)
    response = jsonify(status=status, **error.body())
    response.headers["Retry-After"] = "5"
    return response, 503


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text exposition."""
    return Response(components().metrics.exposition(), content_type=CONTENT_TYPE_LATEST)


@bp.get("/activity")
def activity() -> Response:
    """Embedding requests in the last ``minutes`` (default 5) and the queue depth: is anyone indexing?"""
    minutes = whole_number_arg("minutes", 5, WINDOW_MINUTES)
    parts = components()
    return jsonify(
        minutes=minutes,
        requests=parts.activity.requests_within(minutes),
        queue_depth=parts.engine.queue_depth,
        last_request_at=parts.activity.last_request_at,
    )


@bp.get("/memory")
def memory() -> Response:
    """Memory now: RSS/USS, thresholds, status, the last cleanup, cleanups by reason."""
    return jsonify(components().memory.report())


@bp.post("/cleanup")
def cleanup() -> Response:
    """Run a cleanup now (reason ``manual``); 409 while one runs, 429 within the manual interval; admin only."""
    parts = components()
    require_admin(parts.settings.admin_token)
    return jsonify(parts.memory.manual_cleanup().to_dict())


def require_admin(token: str | None) -> None:
    """Admin routes answer no browser, and without a configured token no other host."""
    # Browsers send these with every cross-site (and same-origin) fetch or form post; curl, scripts and
    # HTTP clients do not. Refusing them makes a web page unable to drive an admin route, even on loopback.
    if "Origin" in request.headers or "Sec-Fetch-Site" in request.headers:
        raise Forbidden("admin routes do not answer requests made by a web browser")
    if token is None:
        if not _is_loopback(request.remote_addr):
            raise Forbidden(
                "without EMBEDDING_ADMIN_TOKEN, admin routes answer only on loopback (127.0.0.1, ::1); "
                "set a token to call them from another host"
            )
        return
    supplied = request.headers.get("Authorization", "")
    scheme, _, value = supplied.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise Unauthorized("this route needs the admin token: Authorization: Bearer <EMBEDDING_ADMIN_TOKEN>")


def _is_loopback(address: str | None) -> bool:
    """127.0.0.0/8 and ::1, and 127.0.0.1 as a dual-stack socket bound to [::] sees it (::ffff:127.0.0.1), which
    Python 3.11's ``is_loopback`` does not count."""
    if address is None:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


def whole_number_arg(name: str, default: int, maximum: int) -> int:
    """Query parameter ``name``: a whole number from 1 to ``maximum`` (400 otherwise), ``default`` if absent."""
    raw = request.args.get(name, str(default))
    # ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= maximum:
        raise BadRequest(f"'{name}' must be a whole number from 1 to {maximum}, got {quote(raw)}", param=name)
    return int(raw)
