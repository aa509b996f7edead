"""Texts are measured (token offsets) on request threads while the inference thread tokenizes: the real
tokenizer, raced."""

from __future__ import annotations

import threading

from app.backend import SentenceTransformerBackend
from loadtest.corpus import build_corpus, sample


def test_counting_on_many_threads_beside_prepare_neither_fails_nor_miscounts() -> None:
    backend = SentenceTransformerBackend("all-minilm-l6-v2", "cpu")
    backend.load()
    texts = [d.text for d in sample(build_corpus(), 64, seed=3)]
    expected = [len(spans) for spans in backend.token_spans(texts)]
    errors: list[BaseException] = []
    wrong: list[int] = []
    stop = threading.Event()

    def count() -> None:
        for _ in range(40):
            try:
                counts = [len(spans) for spans in backend.token_spans(texts)]
            except BaseException as exc:  # noqa: BLE001  (every failure is the finding)
                errors.append(exc)
                return
            if counts != expected:
                wrong.append(1)

    def prepare() -> None:  # what the inference thread does: tokenize with truncation, again and again
        while not stop.is_set():
            try:
                backend.prepare(texts[:32])
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    inference = threading.Thread(target=prepare)
    inference.start()
    counters = [threading.Thread(target=count) for _ in range(8)]
    for thread in counters:
        thread.start()
    for thread in counters:
        thread.join(120)
    stop.set()
    inference.join(60)
    assert errors == []
    assert wrong == []
    assert max(expected) > backend._model.max_seq_length  # counts are untruncated: some text is over the limit
