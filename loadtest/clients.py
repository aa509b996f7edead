"""Clients that keep sending while something is replaced under them: an upgrade (tests/e2e/test_upgrade.py)
or a pod's shutdown behind the balancer (loadtest/rehearsal.py).

Sixteen by default, without pause: single texts (query-time embedding) and 32-text batches (indexing), half on
kept-alive connections and half on a new connection each. Every answer is recorded: 200 when it carries one
vector per text, else its status and body, or the connection error; and when each vector came, so that the
longest time without one (:meth:`Clients.longest_gap`) shows a stall that no error shows.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import requests

T = TypeVar("T")
Answer = int | str
KINDS = ("single", "batch")
"""What a client sends: one text a request, or 32."""


class Clients:
    def __init__(self, url: str, clients: int = 16) -> None:
        self.url = url
        self.answers: list[Answer] = []
        self.answered_at: dict[str, list[float]] = {kind: [] for kind in KINDS}
        """When each kind of client got its vectors (``time.monotonic()``), in order."""
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, args=(i,), daemon=True) for i in range(clients)]

    def _send(self, i: int) -> None:
        kind = KINDS[0] if i % 4 < 2 else KINDS[1]
        texts = ["a query, one text"] if kind == "single" else [f"passage {j} of an indexing batch" for j in range(32)]
        session = requests.Session() if i % 2 == 0 else None
        while not self._stop.is_set():
            try:
                if session is not None:
                    answer = session.post(f"{self.url}/embed", json={"inputs": texts}, timeout=120)
                else:
                    answer = requests.post(
                        f"{self.url}/embed", json={"inputs": texts}, timeout=120, headers={"Connection": "close"}
                    )
                ok = answer.status_code == 200 and len(answer.json()) == len(texts)
                self.answers.append(200 if ok else f"{answer.status_code} {answer.text[:200]}")
                if ok:
                    self.answered_at[kind].append(time.monotonic())
            except requests.RequestException as error:
                self.answers.append(f"{type(error).__name__}: {error}")

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(150)

    def wait_answers(self, count: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.answers) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.answers)} answers after {timeout_s} s, not {count}")
            time.sleep(0.1)

    def during(self, what: Callable[[], T], settle_s: float = 2.0) -> tuple[T, list[Answer]]:
        """Run ``what`` while the clients send; the answers they got meanwhile and for ``settle_s`` after."""
        first = len(self.answers)
        result = what()
        time.sleep(settle_s)
        return result, self.answers[first:]

    def longest_gap(self, kind: str, since: float, until: float) -> float:
        """The longest time between ``since`` and ``until`` (``time.monotonic()``) in which no client of ``kind``
        got its vectors."""
        times = [since, *(t for t in self.answered_at[kind] if since < t < until), until]
        return max(later - earlier for earlier, later in itertools.pairwise(times))


def errors(answers: list[Answer]) -> list[str]:
    return [str(a) for a in answers if a != 200]
