"""The application gunicorn serves: ``gunicorn -c python:app.gunicorn_conf app.asgi:app``.

The Flask app of :mod:`app.wsgi` behind :class:`app.front.WSGIFront` (:func:`app.server.serve`), which
reads each request whole before a request thread runs it, and stops the engine when gunicorn shuts the
worker down.
"""

from __future__ import annotations

from app.server import serve
from app.wsgi import app as flask_app
from app.wsgi import settings

app = serve(flask_app, settings)
