"""Embedding service: a Flask app whose memory stays flat under indexing load.

:class:`app.service.Service` builds one instance and owns its threads; :mod:`app.asgi` is what gunicorn serves.
"""

from __future__ import annotations

from app.components import components
from app.config import Settings
from app.version import __version__

__all__ = ["Settings", "__version__", "components"]
