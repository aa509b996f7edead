"""gunicorn settings: one worker (one model), an asyncio front that reads requests whole, graceful SIGTERM.

Used as ``gunicorn -c python:app.gunicorn_conf app.asgi:app`` by ``make run``,
the Dockerfile and the tests. The settings are validated here, in the master,
so a bad ``EMBEDDING_*`` value stops the start with one clear line. The CPU kernels' caches are bounded
(:data:`app.allocator.KERNEL_CACHES`), and the forward pass's waiting threads sleep soon
(:data:`app.allocator.OPENMP_SPIN_COUNT`). Then, with
``EMBEDDING_ALLOCATOR=jemalloc`` (the default) and jemalloc installed, the master
runs itself again with jemalloc preloaded, before it binds or forks
(:mod:`app.allocator`).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from app.allocator import allocator_for, bound_kernel_caches, exec_under_jemalloc, yield_waiting_openmp_threads
from app.config import ConfigError, Settings
from app.handover import HANDOVER_DIR_VARIABLE, Offer, Served, inherited_listeners
from app.logs import gunicorn_logconfig

try:
    _settings = Settings.from_env()
except ConfigError as _error:
    sys.stderr.write(f"embedding service: configuration error: {_error}\n")
    raise SystemExit(2) from None

bound_kernel_caches()  # before the worker imports torch: oneDNN reads it once
yield_waiting_openmp_threads()  # and libgomp: a neighbour (the next version, loading) must not stall the forward
exec_under_jemalloc(allocator_for(_settings.allocator, _settings.backend), _settings.malloc_arenas)

# Sockets inherited from a running version (app.handover) or from systemd replace the bind below.
_inherited = inherited_listeners() > 0
_served = Served()  # set once a worker of this master accepts connections
_offer: Offer | None = None

bind = f"0.0.0.0:{_settings.port}"  # override with --bind HOST:PORT
workers = 1  # one process holds one model; concurrency comes from request threads + batching
# The event loop reads each request whole (app.front, app.server); EMBEDDING_HTTP_THREADS threads then run Flask.
worker_class = "app.server.Worker"
asgi_lifespan = "on"  # the front stops the engine at shutdown
timeout = 120  # heartbeat of the worker's main loop, not of requests
graceful_timeout = max(30, int(_settings.request_timeout_s))
keepalive = 5  # seconds a connection may stay idle between requests
accesslog = None  # app.instrumentation emits one request.completed line per request
logconfig_dict = gunicorn_logconfig(_settings.log_level)
proc_name = "embedding-service"
# The runtime control socket is not used; without this it is created under $HOME.
control_socket_disable = True


def on_starting(server: Any) -> None:
    """Refuse more than one worker (``-w``/``--workers`` or ``GUNICORN_CMD_ARGS`` override ``workers`` above):
    each would load its own model, answer ``/activity`` and ``/cleanup`` for itself only, and export metrics
    that the other workers' scrapes contradict. Scale with more instances (replicas) instead."""
    if server.cfg.workers != 1:
        sys.stderr.write(
            f"embedding service: configuration error: gunicorn workers: expected 1, got {server.cfg.workers} "
            "(from --workers/-w or GUNICORN_CMD_ARGS): one process serves one model; run more instances "
            "(replicas) to scale\n"
        )
        raise SystemExit(2)


def when_ready(server: Any) -> None:
    """Offer the listening TCP sockets to the next version (only under the ops scripts: app.handover)."""
    global _offer  # noqa: PLW0603  (one offer per master)
    directory = os.environ.get(HANDOVER_DIR_VARIABLE)
    if directory:
        tcp = [listener.sock for listener in server.LISTENERS if listener.sock.family != socket.AF_UNIX]
        _offer = Offer(tcp, directory, server.log)


def post_worker_init(worker: Any) -> None:
    """The first worker on an inherited socket accepts only once its model is ready: the running version (or
    systemd's queue) answers the connections until then (app.handover). A worker started again after one served
    accepts at once, and answers 503 while it loads."""
    if _inherited and not _served.is_set():
        worker.accept_once_ready(then=_served.set)


def on_exit(server: Any) -> None:
    if _offer is not None:
        _offer.close()
