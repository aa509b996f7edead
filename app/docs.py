"""``GET /docs``: the API's documentation page, Swagger UI served from the ``swagger-ui-py`` package's own
files, so it works offline and loads nothing from a CDN (text-embeddings-inference serves the same page)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

DOCS_ASSETS = frozenset({"swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png", "favicon-16x16.png"})
"""The files the page loads from ``/docs/<name>``; nothing else of the package is served."""

DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Embedding service API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});
  </script>
</body>
</html>
"""


@functools.cache
def swagger_ui_dir() -> Path:
    """Where the installed Swagger UI's files are (the ``swagger_ui`` package's ``static`` directory), found
    without importing the package (its import pulls in its web framework handlers)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"
