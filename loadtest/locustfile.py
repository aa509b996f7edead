"""Indexing load for the embedding service: indexers (most of the load), searchers, an occasional /memory.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:5000 \\
        --load-users 6 --load-duration 1200 --load-ramp 60 [--load-soak 3600]

The load shape ramps up to ``--load-users`` users over ``--load-ramp`` seconds,
holds them for ``--load-duration`` seconds (ramp included), then optionally for
``--load-soak`` more. Each option also reads an env var (LOAD_USERS, LOAD_DURATION_S,
LOAD_RAMP_S, LOAD_SOAK_S). Locust's own ``-u``, ``-r`` and ``-t`` win where given:
``-u`` the users, ``-r`` the ramp (users per second), ``-t`` the whole run, so
``locust -f loadtest/locustfile.py --headless -u 8 -r 4 -t 60s`` runs 60 s at 8 users.
Users split 3 indexers : 1 searcher. ``make loadtest`` runs this against a fresh
service and judges the memory curve (loadtest/run.py).
The profile "whole documents" is loadtest/whole_documents.py, with the same shape and options.
"""

from __future__ import annotations

import random
from typing import Any

from locust import HttpUser, LoadTestShape, between, events, task

from loadtest.corpus import INDEXING_MIX, Sampler, build_corpus
from loadtest.shape import Shape

_SAMPLER: list[Sampler] = []  # one, made when Locust starts
_GIVEN: dict[str, Any] = {}  # Locust's -u, -r and -t as given, read before Locust fills in its defaults


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--load-users", type=int, env_var="LOAD_USERS", default=6, help="users at steady load")
    parser.add_argument("--load-duration", type=float, env_var="LOAD_DURATION_S", default=1200, help="seconds")
    parser.add_argument("--load-ramp", type=float, env_var="LOAD_RAMP_S", default=60, help="ramp-up seconds")
    parser.add_argument("--load-soak", type=float, env_var="LOAD_SOAK_S", default=0, help="extra soak seconds")
    parser.add_argument("--load-seed", type=int, env_var="LOAD_SEED", default=0, help="random seed")


@events.init.add_listener
def _load_corpus(environment: Any, **_: Any) -> None:
    options = environment.parsed_options
    seed = options.load_seed if options else 0
    _GIVEN.update(
        users=getattr(options, "num_users", None),
        spawn_rate=getattr(options, "spawn_rate", None),
        run_time=getattr(options, "run_time", None),
    )
    random.seed(seed)
    _SAMPLER.append(Sampler(build_corpus(), seed))


SEARCH_MIX = {"title": 0.5, "sentence": 0.5}


def _documents(mix: dict[str, float], count: int) -> list[str]:
    return [d.text for d in _SAMPLER[0].draw(count, mix)]


class Indexer(HttpUser):
    """An indexing pipeline: batches of 8-64 documents (half passages, the rest sentences and titles)."""

    weight = 3
    wait_time = between(0.1, 0.5)

    @task(30)
    def index_batch(self) -> None:
        batch = _documents(INDEXING_MIX, random.randint(8, 64))
        with self.client.post("/embed", json={"inputs": batch}, name="/embed [index]", catch_response=True) as r:
            if r.status_code == 200 and len(r.json()) != len(batch):  # TEI's answer: one vector per text
                r.failure("wrong number of embeddings")

    @task(1)
    def check_memory(self) -> None:
        self.client.get("/memory", name="/memory")


class Searcher(HttpUser):
    """Search traffic: single short queries through the OpenAI-compatible route."""

    weight = 1
    wait_time = between(0.2, 1.0)

    @task
    def query(self) -> None:
        query = _documents(SEARCH_MIX, 1)[0]
        self.client.post("/v1/embeddings", json={"input": query}, name="/v1/embeddings [search]")


class IndexingShape(LoadTestShape):
    """Ramp-up, steady load, optional soak; then stop."""

    use_common_options = True  # -u, -r and -t are read by Shape.from_options: Locust must not warn they are ignored

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner else None
        return Shape.from_options(options, _GIVEN).at(self.get_run_time())
