"""Texts cut to a character budget before tokenizing: the model reads exactly what it read of the whole text.

Checked against three real tokenizer families: the bundled model's WordPiece (BERT, MPNet), and a
SentencePiece-style Unigram (XLM-R, e5) and a byte-level BPE (RoBERTa, GPT-2) trained here on the corpus,
over texts built to break a naive cut: prose, runs of white space, text without spaces, CJK, emoji.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from app.backend import resolve_model
from app.truncation import CHARS_PER_TOKEN, NO_BOUNDARY_MARGIN, Fitter, _later_start
from loadtest.corpus import build_corpus

MAX_TOKENS = 64
CORPUS = [d.text for d in build_corpus()[:3000]]


def wordpiece() -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(resolve_model("all-minilm-l6-v2").location) + "/tokenizer.json")
    tokenizer.no_truncation()  # its file truncates at 128 tokens; the fitter must see every token
    tokenizer.no_padding()
    return tokenizer


def unigram() -> Tokenizer:
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=1500, special_tokens=["<s>", "</s>", "<unk>"], unk_token="<unk>")
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {
    "wordpiece": wordpiece,
    "unigram": unigram,
    "bytelevel-bpe": byte_level_bpe,
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return TOKENIZERS[request.param]()


def spans_of(tokenizer: Tokenizer) -> Callable[[list[str]], list[list[tuple[int, int]]]]:
    def spans(texts: list[str]) -> list[list[tuple[int, int]]]:
        return [list(e.offsets) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    return spans


def ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def hostile_texts(seed: int, count: int) -> list[str]:
    """Texts of every shape a cut can get wrong, from a few characters to many budgets long."""
    rng = random.Random(seed)
    prose = " ".join(CORPUS)
    cjk = "".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(6000))
    texts = []
    for n in range(count):
        start = rng.randrange(0, len(prose) - 20000)
        length = rng.choice([5, 50, 300, 380, 400, 1000, 3000, 12000])
        base = prose[start : start + length]
        shape = n % 8
        if shape == 1:  # runs of white space between words, as in code and tables
            base = "".join(w + rng.choice([" ", "  ", "\n", "\t\t", " " * rng.randrange(1, 200)]) for w in base.split())
        elif shape == 2:  # a long run without spaces at the start
            base = "x" * rng.randrange(100, 5000) + " " + base
        elif shape == 3:  # a long run without spaces where the cut falls
            cut = MAX_TOKENS * CHARS_PER_TOKEN
            base = base[: cut // 2] + "ab" * rng.randrange(100, 2000) + base[cut // 2 :]
        elif shape == 4:  # CJK: no white space at all
            at = rng.randrange(0, 3000)
            base = cjk[at : at + rng.choice([20, 300, 2500])]
        elif shape == 5:  # emoji and accents between words
            base = " ".join(w + rng.choice(["", "é", "😀", "ﬁ"]) for w in base.split())
        elif shape == 6:  # white space only after a few words
            base = base[:40] + " " * rng.randrange(1000, 8000)
        elif shape == 7:  # leading white space
            base = "   \n " + base
        texts.append(base or "x")
    return texts


def test_cut_text_reads_as_the_whole_text(tokenizer: Tokenizer) -> None:
    fitter = Fitter(spans_of(tokenizer), max_tokens=MAX_TOKENS, special_tokens=2)
    texts = hostile_texts(seed=1, count=160)
    for prefix in ("", "query: "):
        for text, fitted in zip(texts, fitter.fit(texts, prefix), strict=True):
            whole = ids(tokenizer, prefix + text)
            assert ids(tokenizer, fitted.text)[: fitter.room] == whole[: fitter.room], (prefix, text[:80])
            assert fitted.tokens == min(len(whole), fitter.room) + 2
            assert fitted.over == (len(whole) > fitter.room)
            assert len(fitted.text) <= len(prefix + text)


def test_a_cut_piece_stays_near_the_budget_for_ordinary_text(tokenizer: Tokenizer) -> None:
    fitter = Fitter(spans_of(tokenizer), max_tokens=MAX_TOKENS, special_tokens=2)
    prose = " ".join(CORPUS)
    step = (len(prose) - 30_000) // 20
    texts = [prose[i * step : i * step + 30_000] for i in range(20)]
    for fitted in fitter.fit(texts):
        assert fitted.over
        assert len(fitted.text) <= 2 * fitter.room * CHARS_PER_TOKEN  # never the whole 30,000 characters


def test_keeping_the_end_reads_as_the_end_of_the_whole_text(tokenizer: Tokenizer) -> None:
    fitter = Fitter(spans_of(tokenizer), max_tokens=MAX_TOKENS, special_tokens=2)
    texts = hostile_texts(seed=2, count=160)
    prefix = "query: "
    room = fitter.room - len(ids(tokenizer, prefix))
    for text, fitted in zip(texts, fitter.fit(texts, prefix, keep_end=True), strict=True):
        whole = ids(tokenizer, text)
        assert fitted.text.startswith(prefix)
        read = ids(tokenizer, fitted.text)
        assert len(read) <= fitter.room
        assert fitted.over == (len(whole) > room)
        if not fitted.over:
            assert fitted.text == prefix + text
            continue
        # It starts at a word of the whole text's last tokens (in a run without white space, near one).
        sure = room - NO_BOUNDARY_MARGIN
        assert read[-sure:] == whole[-sure:], text[:80]
        assert fitted.tokens <= MAX_TOKENS


def test_the_kept_end_of_prose_starts_at_a_word_and_reads_as_the_whole_text(tokenizer: Tokenizer) -> None:
    fitter = Fitter(spans_of(tokenizer), max_tokens=MAX_TOKENS, special_tokens=2)
    prose = " ".join(CORPUS)
    step = (len(prose) - 5000) // 40
    texts = [prose[i * step : i * step + random.Random(i).randrange(400, 5000)] for i in range(40)]
    for text, fitted in zip(texts, fitter.fit(texts, keep_end=True), strict=True):
        whole, read = ids(tokenizer, text), ids(tokenizer, fitted.text)
        assert read == whole[-len(read) :], text[:80]  # every token read is the whole text's, none cut in two
        assert fitter.room - NO_BOUNDARY_MARGIN <= len(read) <= fitter.room


def test_a_whole_text_is_tokenized_at_most_about_twice_its_length() -> None:
    calls: list[int] = []
    tokenizer = wordpiece()
    spans = spans_of(tokenizer)

    def counting(texts: list[str]) -> list[list[tuple[int, int]]]:
        calls.extend(len(t) for t in texts)
        return spans(texts)

    fitter = Fitter(counting, max_tokens=MAX_TOKENS, special_tokens=2)
    spaced = "word " + " " * 30_000 + "end"  # two tokens: no piece ever holds enough
    (fitted,) = fitter.fit([spaced])
    assert fitted.text == spaced and not fitted.over
    assert sum(calls) <= 2 * len(spaced) + MAX_TOKENS * CHARS_PER_TOKEN


def test_a_cut_inside_a_word_needs_a_margin_of_tokens() -> None:
    """Without white space in the budget's last half, a piece must hold the margin's tokens more."""

    def six_chars_a_token(texts: list[str]) -> list[list[tuple[int, int]]]:
        return [[(i, min(i + 6, len(t))) for i in range(0, len(t), 6)] for t in texts]

    fitter = Fitter(six_chars_a_token, max_tokens=10, special_tokens=2)
    (fitted,) = fitter.fit(["a" * 2000])
    assert fitted.tokens == 10 and fitted.over
    # The first budget (8 tokens x 6 characters) holds exactly the 8 tokens read: not enough inside a word.
    assert len(fitted.text) >= 6 * (fitter.room + NO_BOUNDARY_MARGIN)


def test_the_true_count_is_there_for_a_refusal() -> None:
    fitter = Fitter(spans_of(wordpiece()), max_tokens=MAX_TOKENS, special_tokens=2)
    text = "one two three " * 400
    assert fitter.count(text) == 1202
    assert fitter.fit([text])[0].tokens == MAX_TOKENS


def test_a_start_a_token_too_long_moves_to_the_word_not_into_it() -> None:
    """Found on Python 3.13's corpus: the kept end began at the space before 'same', a Metaspace tokenizer
    read a token too many there, and the next token start was inside the word ('ame values'). The next start
    to try is the word itself, then the next word, and a token start inside a word only where none begins."""
    text = "as the same values as"
    space = text.index(" same")
    later = [space + 1, space + 2, text.index(" values"), text.index("values"), text.index(" as", space)]
    assert _later_start(text, space, later) == space + 1  # 'same', the word itself
    assert later == [space + 2, text.index(" values"), text.index("values"), text.index(" as", space)]
    assert _later_start(text, space + 2, later) == text.index(" values")  # never 'ame values'
    assert _later_start("abcdef", 0, [2, 4]) == 2  # no word anywhere: the next token
