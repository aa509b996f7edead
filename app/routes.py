"""Every route the service answers, in one place: what it is, in whose protocol it answers errors, whether
it needs the API key, which thread pool serves it and how its requests are labelled in the metrics.

The handlers in :mod:`app.api` and :mod:`app.ops` serve these routes (a test holds the Flask app's URL map
to this table, both ways), and everything that needs a set of routes derives it from here: the error shapes
(:mod:`app.errors`), the HTTP front's probe pool (:mod:`app.front`), the API key (:mod:`app.auth`), the quiet
log lines (:mod:`app.instrumentation`), the alert rules' and the dashboard's route selectors
(``alerts/generate.py``, ``dashboards/generate.py``) and the load tests' counters (``loadtest/sampler.py``).

No Flask here: the generators import it without the service.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """What a route does, for the sets derived below."""

    EMBED = "embed"
    """Runs the model on the request's texts: counted by the availability and latency objectives."""
    TOKENS = "tokens"
    """Tokenizer work only (``/tokenize``, ``/decode``)."""
    PROBE = "probe"
    """Liveness, readiness and health answers, and the metrics scrape: a pool of their own, logged quietly."""
    INFO = "info"
    """Read-only descriptions: ``/info``, the OpenAPI document, the docs page."""
    OPS = "ops"
    """Operator routes: activity, memory, cleanup, debug."""


class Protocol(StrEnum):
    """Whose error shape and statuses a route answers with."""

    TEI = "tei"
    """text-embeddings-inference's ``{"error", "error_type"}`` and its statuses."""
    OPENAI = "openai"
    """``{"error": {"message", "type", "code"}}``, OpenAI's shape, also for the service's own routes."""


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    endpoint: str
    """The Flask endpoint name (``blueprint.function``) that serves it."""
    kind: Kind
    protocol: Protocol = Protocol.OPENAI

    @property
    def label(self) -> str:
        """The ``route`` label of its requests in the metrics and logs: its path, unless another method serves the
        path too (``GET /``, TEI's health answer beside ``POST /``, an embedding request, is ``GET /``)."""
        return f"GET {self.path}" if self.method == "GET" and self.path in _SHARED_PATHS else self.path

    @property
    def needs_api_key(self) -> bool:
        """Routes that read texts need ``EMBEDDING_API_KEY`` when one is set; probes, metrics and docs do not."""
        return self.kind in (Kind.EMBED, Kind.TOKENS)


ROUTES: tuple[Route, ...] = (
    # text-embeddings-inference's API
    Route("POST", "/", "api.embed_root", Kind.EMBED, Protocol.TEI),
    Route("POST", "/embed", "api.embed", Kind.EMBED, Protocol.TEI),
    Route("POST", "/embed_all", "api.embed_all", Kind.EMBED, Protocol.TEI),
    Route("POST", "/similarity", "api.similarity", Kind.EMBED, Protocol.TEI),
    Route("POST", "/tokenize", "api.tokenize", Kind.TOKENS, Protocol.TEI),
    Route("POST", "/decode", "api.decode", Kind.TOKENS, Protocol.TEI),
    Route("GET", "/", "ops.health", Kind.PROBE, Protocol.TEI),
    Route("GET", "/ping", "ops.health", Kind.PROBE, Protocol.TEI),
    Route("GET", "/health", "ops.health", Kind.PROBE, Protocol.TEI),
    # OpenAI's API, with and without the /v1 of the client's base URL
    Route("POST", "/v1/embeddings", "api.openai_embeddings", Kind.EMBED),
    Route("POST", "/embeddings", "api.openai_embeddings", Kind.EMBED),
    # the service's own
    Route("GET", "/live", "ops.live", Kind.PROBE),
    Route("GET", "/ready", "ops.ready", Kind.PROBE),
    Route("GET", "/metrics", "ops.metrics", Kind.PROBE),
    Route("GET", "/info", "api.info", Kind.INFO),
    Route("GET", "/openapi.json", "api.openapi", Kind.INFO),
    Route("GET", "/api-doc/openapi.json", "api.openapi", Kind.INFO),
    Route("GET", "/docs", "api.docs", Kind.INFO),
    Route("GET", "/docs/<name>", "api.docs_asset", Kind.INFO),
    Route("GET", "/activity", "ops.activity", Kind.OPS),
    Route("GET", "/memory", "ops.memory", Kind.OPS),
    Route("POST", "/cleanup", "ops.cleanup", Kind.OPS),
    Route("POST", "/debug/memory/snapshot", "debug.memory_snapshot", Kind.OPS),
)


_PATHS = [r.path for r in ROUTES]
_SHARED_PATHS = frozenset(path for path in _PATHS if _PATHS.count(path) > 1)
"""Paths that more than one method serves."""

TEI_PATHS = frozenset(r.path for r in ROUTES if r.protocol is Protocol.TEI)
"""Paths whose errors are answered in text-embeddings-inference's shape and statuses."""

PROBE_PATHS = frozenset(r.path for r in ROUTES if r.kind is Kind.PROBE and r.path != "/")
"""Served on the HTTP front's own small pool: probes and scrapes never wait behind embedding requests (``/``
is also ``POST /``, an embedding request, so it waits with them)."""

API_KEY_PATHS = frozenset(r.path for r in ROUTES if r.needs_api_key)
"""Paths that need ``Authorization: Bearer <EMBEDDING_API_KEY>`` when a key is set (``GET /`` excepted: a probe)."""

QUIET_LABELS = frozenset(r.label for r in ROUTES if r.kind is Kind.PROBE)
"""Routes whose ``request.completed`` lines are logged at debug: probes and scrapes, every few seconds."""

EMBED_LABELS = tuple(r.label for r in ROUTES if r.kind is Kind.EMBED)
"""The ``route`` labels of requests that run the model: what the objectives, alerts and load tests count."""


def label_for(method: str, rule: str | None) -> str:
    """The metrics' ``route`` label of a request matched to URL rule ``rule`` (``unmatched`` for none)."""
    if rule is None:
        return "unmatched"
    return _LABELS.get((method, rule), rule)


def needs_api_key(method: str, path: str) -> bool:
    """Whether a request needs the API key (when one is set): a POST to a route that reads texts. ``GET /`` is a
    probe, and a browser's preflight (``OPTIONS``) carries no credentials."""
    return method == "POST" and path in API_KEY_PATHS


def prometheus_regex(labels: tuple[str, ...]) -> str:
    """A PromQL regular expression (RE2, anchored) that matches exactly ``labels``."""
    return "|".join(re.escape(label) for label in labels)


_LABELS = {(r.method, r.path): r.label for r in ROUTES} | {
    ("HEAD", r.path): r.label for r in ROUTES if r.method == "GET"
}
