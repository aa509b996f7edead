"""The one import-time app instance, for gunicorn: ``gunicorn -c python:app.gunicorn_conf app.wsgi:app``."""

from __future__ import annotations

import os
import sys

from app import create_app
from app.config import Settings
from app.logs import configure_logging

# gunicorn's arbiter stops the whole server when a worker exits with this code
# ("Worker failed to boot") instead of restarting it in a loop.
WORKER_BOOT_ERROR = 3


def _exit_worker(exc: BaseException) -> None:
    """A model that cannot be loaded stops the service; it never serves another model."""
    sys.stderr.write(f"embedding service: cannot start: {exc}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(WORKER_BOOT_ERROR)


settings = Settings.from_env()
configure_logging(settings.log_level)
app = create_app(settings, on_fatal=_exit_worker)
