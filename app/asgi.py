"""The application gunicorn serves: ``gunicorn -c python:app.gunicorn_conf app.asgi:app``.

Importing it reads the settings (once) and builds the service; it starts nothing. gunicorn's worker starts the
service through the ASGI lifespan, after the fork, and stops it at shutdown (:func:`app.server.serve`). The app
is the Flask app behind :class:`app.front.WSGIFront`, which reads each request whole before a request thread
runs it.
"""

from __future__ import annotations

import os
import sys

from app.config import Settings
from app.engine import EngineCrashed
from app.server import serve
from app.service import Service

# gunicorn's arbiter stops the whole server when a worker exits with this code
# ("Worker failed to boot") instead of restarting it in a loop.
WORKER_BOOT_ERROR = 3


def _exit_worker(exc: BaseException) -> None:
    """A model that cannot be loaded stops the service (it never serves another model); a crash restarts it."""
    crashed = isinstance(exc, EngineCrashed)
    sys.stderr.write(f"embedding service: {'restarting' if crashed else 'cannot start'}: {exc}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1 if crashed else WORKER_BOOT_ERROR)


service = Service(Settings.from_env(), on_fatal=_exit_worker)
app = serve(service)
