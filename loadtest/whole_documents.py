"""The load profile "whole documents": pipelines that send whole documents and rely on truncation.

    locust -f loadtest/whole_documents.py --headless --host http://127.0.0.1:5000 --load-users 4 --load-duration 600
    LOAD_PROFILE=whole-documents make loadtest

Each user sends 1 to the service's maximum texts per request (``/info``), half of them of its maximum
characters (a whole document, truncated by the service), the others shorter; a refusal with ``Retry-After``
(429, 503) is waited out and counted apart, as ``refused early``: it is not a lost request. The shape and the
``--load-*`` options are those of loadtest/locustfile.py.
"""

from __future__ import annotations

import random
import time

from locust import HttpUser, between, task

from loadtest.corpus import build_corpus
from loadtest.locustfile import IndexingShape

__all__ = ["DocumentIndexer", "IndexingShape"]

REFUSED = "refused early (Retry-After)"
"""Locust's name for refusals a client is told to retry: not failures, and counted apart."""


class DocumentIndexer(HttpUser):
    """A pipeline that sends whole documents: 1 to the service's maximum texts per request, half of them of the
    service's maximum characters, the others shorter; on 429 or 503 with ``Retry-After`` it waits and goes on."""

    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        limits = self.client.get("/info", name="/info").json()["limits"]
        self.max_inputs, self.max_chars = int(limits["max_inputs"]), int(limits["max_input_chars"])

    @task
    def index_documents(self) -> None:
        count = random.randint(1, self.max_inputs)
        texts = [_PROSE.document(self.max_chars if random.random() < 0.5 else random.randint(1, self.max_chars))
                 for _ in range(count)]  # fmt: skip
        name = "/embed [whole documents]"
        with self.client.post("/embed", json={"inputs": texts, "truncate": True}, name=name, catch_response=True) as r:
            if r.status_code == 200:
                if len(r.json()) != count:
                    r.failure("wrong number of embeddings")
                return
            retry_after = r.headers.get("Retry-After")
            if r.status_code in (429, 503) and retry_after:
                r.success()
                self.environment.events.request.fire(
                    request_type="POST", name=f"{name} {REFUSED}", response_time=0, response_length=0,
                    exception=None, context={},
                )  # fmt: skip
                time.sleep(float(retry_after))
            else:
                r.failure(f"{r.status_code} without Retry-After: {r.text[:200]}")


class _Prose:
    """Documents of any length cut from the corpus's passages (ASCII, nothing JSON must escape)."""

    def __init__(self) -> None:
        self._text = ""

    def document(self, chars: int) -> str:
        if not self._text:
            passages = [d.text for d in build_corpus() if d.kind == "passage" and d.text.isascii()]
            self._text = " ".join(passages)
        start = random.randrange(0, max(1, len(self._text) - chars))
        return self._text[start : start + chars] or "empty"


_PROSE = _Prose()
