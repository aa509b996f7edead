"""Who may call the routes that read texts, and from which web origins.

``EMBEDDING_API_KEY``: when set, every embedding and tokenizer route (:func:`app.routes.needs_api_key`)
needs ``Authorization: Bearer <key>``, as text-embeddings-inference's ``--api-key`` and OpenAI clients'
``api_key`` send it. The key is compared in constant time and never logged; a missing or wrong one is a
401 with ``WWW-Authenticate: Bearer``. The HTTP front checks it before reading a body (an unauthenticated
client costs no memory budget), and the app checks it again for requests that do not come through the
front. Probes, ``/metrics``, ``/info`` and the docs stay open.

``EMBEDDING_CORS_ORIGINS``: off by default (no ``Access-Control-Allow-Origin``: browsers keep other sites
from reading the answers). With origins (or ``*``), requests from them get the CORS headers and their
preflight requests an answer, as text-embeddings-inference's ``--cors-allow-origin`` does. The admin routes
answer no browser either way (:func:`app.ops.require_admin`).
"""

from __future__ import annotations

import hmac

from flask import Flask, Response, request

from app.errors import Unauthorized
from app.routes import needs_api_key

PREFLIGHT_MAX_AGE_S = 600
ALLOWED_HEADERS = "Authorization, Content-Type, X-Request-ID"
EXPOSED_HEADERS = (
    "X-Request-ID, x-compute-type, x-compute-time, x-compute-tokens, x-compute-characters, x-total-time, "
    "x-tokenization-time, x-queue-time, x-inference-time, x-truncated-inputs, x-model-id"
)


def api_key_refusal(key: str | None, method: str, path: str, authorization: str | None) -> Unauthorized | None:
    """The 401 for a request that needs ``key`` and does not carry it; None when it may pass."""
    if key is None or not needs_api_key(method, path):
        return None
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), key.encode()):
        return None
    return Unauthorized(
        "this route needs the API key: Authorization: Bearer <EMBEDDING_API_KEY>"
        if authorization
        else "missing API key: send Authorization: Bearer <EMBEDDING_API_KEY>"
    )


def init_app(app: Flask, api_key: str | None, cors_origins: tuple[str, ...]) -> None:
    """Check the API key before every route; add the CORS headers after it when origins are allowed."""

    @app.before_request
    def _require_api_key() -> None:
        refusal = api_key_refusal(api_key, request.method, request.path, request.headers.get("Authorization"))
        if refusal is not None:
            raise refusal

    if not cors_origins:
        return
    any_origin = "*" in cors_origins

    @app.after_request
    def _cors(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin is None or not (any_origin or origin in cors_origins):
            return response
        response.headers["Access-Control-Allow-Origin"] = "*" if any_origin else origin
        if not any_origin:
            response.vary.add("Origin")
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = "GET, POST"
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE_S)
        return response
