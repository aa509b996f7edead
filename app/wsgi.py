"""The one import-time Flask app instance; gunicorn serves it through :mod:`app.asgi`."""

from __future__ import annotations

import os
import sys

from app import create_app
from app.config import Settings
from app.engine import EngineCrashed
from app.logs import configure_logging

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


settings = Settings.from_env()
configure_logging(settings.log_level)
app = create_app(settings, on_fatal=_exit_worker)
