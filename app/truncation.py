"""Each text cut to what the model will read, before the tokenizer sees all of it.

A model reads at most its maximum sequence length (256 tokens for all-MiniLM-L6-v2), yet a text may
hold 32,768 characters, about 8,000 tokens: tokenized whole, 512 of them held 1.6 GB of encodings for
a moment, to keep 2% of their tokens. So, as text-embeddings-inference does, a text is first cut to a
budget of characters (``CHARS_PER_TOKEN`` per token the model reads) and only that piece is tokenized.

The cut never changes what the model reads. It falls where a run of white space starts, so every word
before it is tokenized as in the whole text (tokenizers split words at white space: WordPiece, BPE and
SentencePiece alike); where the piece holds more tokens than the model reads, the model reads exactly
the tokens it would have read of the whole text. Where a piece holds too few tokens (white space
everywhere, or one long word), the budget doubles and the text is cut again, up to the whole text, so the
worst case costs about twice one tokenization of the whole text, one text at a time. A cut that finds
no white space in the last half of its budget (a long run of text without spaces) falls inside a word
and is accepted only when ``NO_BOUNDARY_MARGIN`` more tokens follow the ones the model reads.

``truncate=false`` needs a text's true length only to refuse it: the first text over the model's
maximum is then tokenized whole once, for the message, and dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Spans = Callable[[list[str]], list[list[tuple[int, int]]]]
"""Each text's tokens as (start, stop) character offsets: no special tokens, no truncation."""

CHARS_PER_TOKEN = 6
"""The first character budget per token the model reads (English prose: about 4 characters a token)."""

NO_BOUNDARY_MARGIN = 8
"""A cut inside a word is trusted only with this many tokens after the last one the model reads."""

CHUNK_TEXTS = 64
"""Texts tokenized in one call: the encodings held at once are bounded by this many pieces."""


@dataclass(frozen=True)
class Fitted:
    """One text as the model will read it."""

    text: str
    """The prompt and the text, cut where the model stops reading (or where its kept end starts)."""
    tokens: int
    """Tokens the model reads, special tokens included."""
    over: bool
    """The prompt and text hold more tokens than the model reads: it is truncated (or refused)."""


@dataclass(frozen=True)
class _Piece:
    text: str
    start: int
    """Where the piece starts in the text (0 unless the end is kept)."""
    whole: bool
    at_boundary: bool


class Fitter:
    """Cuts texts to what a model reads, from a tokenizer's token offsets (:data:`Spans`)."""

    def __init__(self, spans: Spans, *, max_tokens: int, special_tokens: int) -> None:
        self._spans = spans
        self.max_tokens = max_tokens
        self.special_tokens = special_tokens
        self.room = max(1, max_tokens - special_tokens)
        """Tokens of text (prompt included) the model reads."""

    def fit(self, texts: Sequence[str], prefix: str = "", *, keep_end: bool = False) -> list[Fitted]:
        """Each text with ``prefix`` before it, as the model reads it: cut at the end, or with ``keep_end`` at
        the start (the prefix stays whole). Raises what the tokenizer raises."""
        prefix_tokens = len(self._spans([prefix])[0]) if prefix else 0
        room = self.room - prefix_tokens
        if keep_end and room > 0:
            return self._fit_keeping_end(texts, prefix, room)
        return self._fit_keeping_start(texts, prefix)

    def count(self, text: str) -> int:
        """The true token count of one text, special tokens included (tokenizes it whole)."""
        return len(self._spans([text])[0]) + self.special_tokens

    # --- cutting the end ------------------------------------------------------------------------------

    def _fit_keeping_start(self, texts: Sequence[str], prefix: str) -> list[Fitted]:
        found: list[Fitted | None] = [None] * len(texts)
        budget = [self.room * CHARS_PER_TOKEN] * len(texts)
        pending = list(range(len(texts)))
        while pending:
            pieces = [_head(texts[i], budget[i]) for i in pending]
            counts = self._counts([prefix + piece.text for piece in pieces])
            again = []
            for i, piece, count in zip(pending, pieces, counts, strict=True):
                if piece.whole:
                    found[i] = Fitted(
                        prefix + piece.text, min(count, self.room) + self.special_tokens, count > self.room
                    )
                elif count >= self.room + (0 if piece.at_boundary else NO_BOUNDARY_MARGIN):
                    found[i] = Fitted(prefix + piece.text, self.room + self.special_tokens, True)
                else:
                    budget[i] *= 2
                    again.append(i)
            pending = again
        return [f for f in found if f is not None]

    # --- cutting the start ----------------------------------------------------------------------------

    def _fit_keeping_end(self, texts: Sequence[str], prefix: str, room: int) -> list[Fitted]:
        starts: list[int] = [0] * len(texts)
        later: dict[int, list[int]] = {}  # for a text cut at its start: where the tokens after its first kept one start
        budget = [self.room * CHARS_PER_TOKEN] * len(texts)
        pending = list(range(len(texts)))
        while pending:
            pieces = [_tail(texts[i], budget[i]) for i in pending]
            spans = self._all_spans([piece.text for piece in pieces])
            again = []
            for i, piece, tokens in zip(pending, pieces, spans, strict=True):
                if len(tokens) > room and (
                    piece.whole or len(tokens) >= room + (0 if piece.at_boundary else NO_BOUNDARY_MARGIN)
                ):
                    kept = [piece.start + start for start, _ in tokens[-room:][:NO_BOUNDARY_MARGIN]]
                    starts[i], later[i] = _first_word_start(texts[i], kept), kept[1:]
                elif not piece.whole:
                    budget[i] *= 2
                    again.append(i)
            pending = again
        counts = self._counts([prefix + text[start:] for text, start in zip(texts, starts, strict=True)])
        # A text cut inside a word can tokenize to a token more than before the cut: start a token later.
        for _ in range(NO_BOUNDARY_MARGIN - 1):
            longer = [i for i in later if counts[i] > self.room and later[i]]
            if not longer:
                break
            for i in longer:
                starts[i] = _later_start(texts[i], starts[i], later[i])
            for i, count in zip(longer, self._counts([prefix + texts[i][starts[i] :] for i in longer]), strict=True):
                counts[i] = count
        return [
            Fitted(prefix + text[start:], min(count, self.room) + self.special_tokens, i in later)
            for i, (text, start, count) in enumerate(zip(texts, starts, counts, strict=True))
        ]

    # --- the tokenizer ----------------------------------------------------------------------------------

    def _all_spans(self, pieces: list[str]) -> list[list[tuple[int, int]]]:
        found: list[list[tuple[int, int]]] = []
        for start in range(0, len(pieces), CHUNK_TEXTS):
            found.extend(self._spans(pieces[start : start + CHUNK_TEXTS]))
        return found

    def _counts(self, pieces: list[str]) -> list[int]:
        counts: list[int] = []
        for start in range(0, len(pieces), CHUNK_TEXTS):
            counts.extend(len(spans) for spans in self._spans(pieces[start : start + CHUNK_TEXTS]))
        return counts


def _first_word_start(text: str, starts: list[int]) -> int:
    """The first of these token starts that begins a word (at or just after white space), else the first: the
    kept text then tokenizes as the end of the whole text did, instead of a word cut in two."""
    for start in starts:
        if _begins_word(text, start):
            return start
    return starts[0]


def _begins_word(text: str, start: int) -> bool:
    """Whether a token starting at ``start`` begins a word: at white space, or just after it."""
    return text[start].isspace() or (start > 0 and text[start - 1].isspace())


def _later_start(text: str, start: int, later: list[int]) -> int:
    """The next start to try after ``start`` read a token too many (taken from ``later``, the token starts
    after it): the word itself where ``start`` is the white space before it (a Metaspace tokenizer marks a
    leading space and a word's start alike, so the space adds a token), else the next token that begins a
    word, else the next token."""
    word = start
    while word < len(text) and text[word].isspace():
        word += 1
    while later and later[0] <= start:
        later.pop(0)
    if start < word < len(text):
        while later and later[0] <= word:
            later.pop(0)
        return word
    for k, candidate in enumerate(later):
        if _begins_word(text, candidate):
            del later[: k + 1]
            return candidate
    return later.pop(0) if later else start


def _head(text: str, budget: int) -> _Piece:
    """The start of ``text`` up to ``budget`` characters, cut where a run of white space starts."""
    if len(text) <= budget:
        return _Piece(text, 0, whole=True, at_boundary=True)
    space = next((i for i in range(budget, budget // 2, -1) if text[i].isspace()), None)
    cut = _run_start(text, space) if space is not None else 0
    if cut > 0:
        return _Piece(text[:cut], 0, whole=False, at_boundary=True)
    return _Piece(text[:budget], 0, whole=False, at_boundary=False)


def _tail(text: str, budget: int) -> _Piece:
    """The end of ``text``, about ``budget`` characters, starting where a run of white space starts."""
    if len(text) <= budget:
        return _Piece(text, 0, whole=True, at_boundary=True)
    first = len(text) - budget
    space = next((i for i in range(first, first + budget // 2) if text[i].isspace()), None)
    cut = _run_start(text, space) if space is not None else 0
    if cut > 0:
        return _Piece(text[cut:], cut, whole=False, at_boundary=True)
    return _Piece(text[first:], first, whole=False, at_boundary=False)


def _run_start(text: str, space: int) -> int:
    """Where the run of white space holding ``text[space]`` starts."""
    while space > 0 and text[space - 1].isspace():
        space -= 1
    return space
