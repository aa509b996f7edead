"""The application gunicorn serves: ``gunicorn -c python:app.gunicorn_conf app.asgi:app``.

The Flask app of :mod:`app.wsgi` behind :class:`app.front.WSGIFront`, which reads each request whole
before a request thread runs it, and stops the engine when gunicorn shuts the worker down.
"""

from __future__ import annotations

from app import components
from app.front import WSGIFront
from app.wsgi import app as flask_app
from app.wsgi import settings


def _stop_engine() -> None:
    """After the last connection: stop the memory monitor, then let the engine drain its queue and stop."""
    parts = components(flask_app)
    parts.memory.stop()
    parts.engine.stop(timeout_s=max(30.0, settings.request_timeout_s))


app = WSGIFront(
    flask_app,
    threads=settings.http_threads,
    max_body_bytes=settings.max_body_bytes,
    body_timeout_s=settings.body_timeout_s,
    on_shutdown=_stop_engine,
)
