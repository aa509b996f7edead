"""The memory budget: what the work in flight may cost, and what each request costs, from what it carries.

The memory manager keeps the service's *idle* memory flat; this bounds what requests add to it. Every
request holds a reservation from the moment its body starts to arrive until its answer is written: first
an estimate from the body's declared length (the HTTP front, before reading it), then, once parsed, its
cost (:meth:`CostModel.request_bytes`): the body, its texts as Python holds them, the pieces the model
will read (app/truncation.py), the vectors and the answer's JSON; once queued, its body and texts are let
go and it holds the pieces, the vectors and the answer (:meth:`CostModel.queued_bytes`), a few MB for the
largest request instead of about 50. The reservations together stay under
the budget's capacity; a request that finds no room is refused at once (429, ``Retry-After``), one that
could never fit is a 413. Nothing waits for room: a waiting request would hold its body all the same.

The capacity comes from the service's own thresholds and its warmed baseline (:func:`derive`): the room
between the RSS the loaded model settles at and the lowest of the elevated threshold and the hard limit,
less the activations of the largest batch the engine may run (:meth:`CostModel.batch_bytes`, from the
model's width), less a tenth for what no estimate sees. Where that room is small, the engine's batches
are made smaller so that one still fits (:attr:`Derived.max_batch_tokens`).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from app.backend import ModelInfo
from app.errors import PayloadTooLarge, TooManyRequests
from app.metrics import Metrics
from app.truncation import CHARS_PER_TOKEN

ACTIVATION_FLOATS = 2.5
"""Peak activation floats of one forward pass per padded token, per unit of (2 x hidden + intermediate).
Measured in inference mode under jemalloc (VmHWM around one batch): 2.3 for all-MiniLM-L6-v2 (384 wide,
6 layers) and 2.3 for a BERT of 768 x 12 layers, in float32; 1.6 to 1.8 under bfloat16 autocast. Depth
adds nothing: each layer's activations are freed while the next one is computed."""

JSON_BYTES_PER_FLOAT = 12
"""A float32 written as JSON text (``-0.012345678,``); base64 takes less (5.3 bytes)."""
SPECIAL_TOKENS_BOUND = 4
"""The special tokens a tokenizer adds to one text at most (BERT's 2, XLM-R's 2, some models' 3)."""
TOKEN_ANSWER_BYTES_PER_FLOAT = 72
"""What one float of a ``POST /embed_all`` answer holds at the request's peak: its float32 row, and its JSON
text about five times over (orjson's growing buffer, the answer's bytes, and the socket's send buffer with
the slice that fills it). Measured with the bundled model on 32 to 256 texts of 256 tokens: the worker's
peak rose by 51 to 71 bytes per answered float. An answer 300 times its request is what ``/embed_all`` is;
this keeps it inside the budget like any other request."""

PER_TEXT_BYTES = 256
"""The Python objects of one text in flight beside its characters: list slots, its fitted copy, counts."""

ENCODING_BYTES_PER_TOKEN = 256
"""What the tokenizer's encoding of a text holds per token while it is read (``POST /tokenize``): its ids,
offsets, masks and token strings, in Rust and as Python lists. Measured with tracemalloc on 32,768-character
texts of words and of symbols: 180 bytes per token on the Python side, the Rust side's about 70 beside it."""
TOKEN_ROW_BYTES = 768
"""One token of a ``POST /tokenize`` answer while it is written: its dict, text and offsets as Python objects
and its JSON (640 to 680 bytes per token at the peak, measured with tracemalloc as above)."""
ANSWER_COPIES = 4
"""An answer written piece by piece is held about this many times at its peak: its pieces, their join into one
body (app/front.py), the socket's send buffer and the slice of it being written."""
DECODE_BYTES_PER_ID = 128
"""One token id of a ``POST /decode`` request at its peak: the id as a Python int in its list, the token's
string in the tokenizer, and its share of the text and of the answer's JSON."""

BODY_COST_FACTOR = 3
"""A body costs itself, its decoding while it is parsed (``json.loads`` decodes the bytes to one string
first), and its texts once parsed (about its size for ASCII JSON): the estimate before it is parsed. The
cost after parsing measures the texts as Python holds them. Measured with tracemalloc: a 16.8 MB body of
512 ASCII texts held 16.0 MiB of texts beside it, 50 MB at the peak of parsing."""

HEADROOM_SHARE = 0.1
"""Of the room above the warmed baseline: kept for what no estimate sees (allocator slack, threads' stacks)."""

MIN_CAPACITY_BYTES = 32 * 1024 * 1024
"""The least capacity: thresholds at or under the baseline still let small requests through (shedding
refuses them while RSS is above the hard limit)."""

RETRY_AFTER_S = 2
"""What a request refused for want of budget is told to wait: work in flight drains in seconds."""


class BudgetExhausted(TooManyRequests):
    """No room in the memory budget for this request now (429, ``Retry-After``)."""


class TooCostly(PayloadTooLarge):
    """A request whose cost alone is more than the whole budget: it could never be admitted (413)."""


@dataclass(frozen=True)
class CostModel:
    """What requests and batches of one model cost in memory."""

    dimensions: int
    max_tokens: int
    hidden: int
    intermediate: int
    heads: int
    eager_attention: bool = False

    @classmethod
    def for_model(cls, info: ModelInfo) -> CostModel:
        shape = info.shape
        return cls(
            dimensions=info.dimensions,
            max_tokens=info.max_seq_length,
            hidden=shape.hidden,
            intermediate=shape.intermediate,
            heads=shape.heads,
            eager_attention=shape.attention == "eager",
        )

    @property
    def activation_bytes_per_token(self) -> int:
        """Peak activation bytes of one padded token in a batch of the longest texts."""
        per_token = ACTIVATION_FLOATS * (2 * self.hidden + self.intermediate) * 4
        if self.eager_attention:  # the scores and their softmax: heads x (tokens x tokens) floats, twice
            per_token += 2 * self.heads * self.max_tokens * 4
        return int(per_token)

    def token_answer_bytes(self, tokens: Iterable[int]) -> int:
        """What a ``POST /embed_all`` answer of texts of ``tokens`` tokens each holds at its peak."""
        return sum(min(n, self.max_tokens) for n in tokens) * self.hidden * TOKEN_ANSWER_BYTES_PER_FLOAT

    def token_bound(self, chars: int) -> int:
        """At most how many tokens the model reads of a text of ``chars`` characters (its prompt included), before
        it is tokenized: a character makes at most 3 tokens (a byte-level tokenizer's split of a rare one), plus
        the special tokens."""
        return min(self.max_tokens, 3 * chars + SPECIAL_TOKENS_BOUND)

    def batch_bytes(self, padded_tokens: int) -> int:
        """Peak memory one forward pass over ``padded_tokens`` (texts x longest) takes."""
        return padded_tokens * self.activation_bytes_per_token

    def tokens_within(self, nbytes: int) -> int:
        """The padded tokens of the largest batch whose activations fit in ``nbytes``."""
        return max(0, nbytes // self.activation_bytes_per_token)

    def request_bytes(self, *, body_bytes: int, texts: Sequence[str], dimensions: int | None = None) -> int:
        """What one embedding request holds at its peak, from its arrival to its answer: the body (twice: while
        it is parsed, its decoded copy), the texts as Python holds them, the pieces the model reads, each
        text's vector (the engine's, the answer's copy) and the answer's JSON (built once, then written)."""
        piece_chars = 2 * self.max_tokens * CHARS_PER_TOKEN  # a fitted text: at most one doubling of its budget
        pieces = 0
        for text in texts:
            size = sys.getsizeof(text)
            pieces += min(size, size * piece_chars // max(1, len(text)) + 80)
        return held_text_bytes(body_bytes, texts) + pieces + self._answer_bytes(len(texts), dimensions)

    def queued_bytes(self, pieces: Sequence[str], dimensions: int | None = None) -> int:
        """What a request holds once its texts are queued and its body and texts let go: the pieces the model
        reads, the vectors and the answer's JSON."""
        return sum(sys.getsizeof(piece) for piece in pieces) + self._answer_bytes(len(pieces), dimensions)

    def _answer_bytes(self, texts: int, dimensions: int | None) -> int:
        """Each text's vector (the engine's and the answer's copy), the answer's JSON (built once, then written)
        and the Python objects of each text in flight."""
        answer_dims = dimensions or self.dimensions
        vectors = texts * 4 * (self.dimensions + answer_dims)
        return vectors + texts * answer_dims * JSON_BYTES_PER_FLOAT * 2 + texts * PER_TEXT_BYTES


def tokenizing_bytes(chars: int) -> int:
    """At most what tokenizing one text of ``chars`` characters (its prompt included) holds, before its tokens
    are known: a character makes at most 3 tokens (see :meth:`CostModel.token_bound`), none cut."""
    return (3 * chars + SPECIAL_TOKENS_BOUND) * ENCODING_BYTES_PER_TOKEN


def token_rows_bytes(tokens: int) -> int:
    """What one tokenized text of ``tokens`` tokens holds while its part of a ``POST /tokenize`` answer is
    written: its encoding and each token's row."""
    return tokens * (ENCODING_BYTES_PER_TOKEN + TOKEN_ROW_BYTES)


def held_text_bytes(body_bytes: int, texts: Iterable[str]) -> int:
    """What a parsed request holds of what it carried: its body (and its decoded copy) and its texts."""
    return 2 * body_bytes + sum(sys.getsizeof(text) for text in texts)


def body_estimate(length: int) -> int:
    """The cost of a request body of ``length`` bytes before it is parsed."""
    return BODY_COST_FACTOR * length


PARSED_VALUE_BYTES = 56
"""One value of a JSON array or object once parsed and validated: its Python object (an int 28 to 32 bytes, a
float 24), its slot in the list (8) and its slots in validation's copies of the list (16). ``7,`` is 2 bytes of
body and 56 parsed: 2.1 million token ids (a 12.6 MB ``POST /decode`` body) held about 100 MB while they were
parsed, against the 38 MB the body's estimate reserved."""


def parse_bytes(body: bytes) -> int:
    """What parsing ``body`` holds at its peak: :func:`body_estimate`, or for a body of many small values (token
    ids) each value as a Python object; their number is bounded by the body's commas, counted at C speed."""
    return max(body_estimate(len(body)), 2 * len(body) + PARSED_VALUE_BYTES * (body.count(b",") + 1))


PROVISIONAL_BODIES = 4
"""Until the model is loaded (and the budget derived), bodies of at most this many largest requests at once."""


def provisional_capacity(max_body_bytes: int) -> int:
    """The budget before the model is loaded: a few largest bodies (only bodies arrive then)."""
    return PROVISIONAL_BODIES * body_estimate(max_body_bytes)


@dataclass(frozen=True)
class Derived:
    """A budget derived from the thresholds and the warmed baseline (:func:`derive`)."""

    capacity_bytes: int
    ceiling_bytes: int
    baseline_bytes: int
    batch_reserve_bytes: int
    max_batch_tokens: int
    """The engine's largest batch (padded tokens): the setting, or less where the room is small."""


def derive(
    cost: CostModel, *, baseline: int, ceiling: int, max_batch_tokens: int, configured: int | None = None
) -> Derived:
    """The budget above ``baseline`` under ``ceiling``, or ``configured`` (EMBEDDING_MEMORY_BUDGET_BYTES).

    A batch of at most ``max_batch_tokens`` runs at any time; where the room is small the batch is made
    smaller, to at most half the room (never under one text of the model's maximum length). A configured
    budget is taken as it is: the operator who sets it keeps the batches they configured too.
    """
    room = max(0, ceiling - baseline)
    fitting = cost.tokens_within(room // 2) if configured is None else max_batch_tokens
    batch_tokens = max(cost.max_tokens, min(max_batch_tokens, fitting))
    reserve = cost.batch_bytes(batch_tokens)
    derived = int((room - reserve) * (1 - HEADROOM_SHARE))
    capacity = configured if configured is not None else max(MIN_CAPACITY_BYTES, derived)
    return Derived(capacity, ceiling, baseline, reserve, batch_tokens)


class Reservation:
    """The memory one request holds in the budget; resized as its cost is known, released once."""

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self.bytes = 0

    def resize(self, nbytes: int) -> None:
        """Hold ``nbytes`` in all; raise :class:`BudgetExhausted` or :class:`TooCostly` when they do not fit."""
        self._budget.resize(self, nbytes)

    def release(self) -> None:
        """Give everything back (again: nothing)."""
        self._budget.resize(self, 0)


class MemoryBudget:
    """The bytes that requests in flight may hold at once; thread-safe (the event loop and request threads)."""

    def __init__(self, capacity: int, metrics: Metrics) -> None:
        self._lock = threading.Lock()
        self._metrics = metrics
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self.derived: Derived | None = None
        self.cost: CostModel | None = None
        metrics.budget.set(capacity)
        metrics.budget_used.set_function(lambda: self.used)
        for reason in ("budget", "too_costly"):
            metrics.rejected.labels(reason=reason)

    def configure(self, cost: CostModel, derived: Derived) -> None:
        """Take the model's cost model and the capacity derived for it (once the model is loaded)."""
        with self._lock:
            self.cost = cost
            self.derived = derived
            self.capacity = derived.capacity_bytes
        self._metrics.budget.set(self.capacity)

    def reservation(self) -> Reservation:
        """An empty reservation for one request."""
        return Reservation(self)

    def resize(self, reservation: Reservation, nbytes: int) -> None:
        """Grow or shrink ``reservation`` to ``nbytes``; growing past the capacity refuses."""
        with self._lock:
            growth = nbytes - reservation.bytes
            if growth > 0 and self.used + growth > self.capacity:
                refusal = self._refusal(nbytes)
            else:
                refusal = None
                self.used += growth
                self.peak = max(self.peak, self.used)
                reservation.bytes = nbytes
        if refusal is not None:
            self._metrics.rejected.labels(reason="too_costly" if isinstance(refusal, TooCostly) else "budget").inc()
            raise refusal

    def _refusal(self, nbytes: int) -> BudgetExhausted | TooCostly:
        mb = 1_000_000
        if nbytes > self.capacity:
            return TooCostly(
                f"this request would hold about {nbytes / mb:.0f} MB of memory until it is answered, more than the "
                f"service's whole budget for work in flight ({self.capacity / mb:.0f} MB); send fewer or shorter "
                "texts per request"
            )
        return BudgetExhausted(
            f"the service's memory budget for work in flight is in use ({self.used / mb:.0f} of "
            f"{self.capacity / mb:.0f} MB; this request needs {nbytes / mb:.1f} MB); retry shortly",
            retry_after_s=RETRY_AFTER_S,
        )
