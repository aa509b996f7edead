"""A reproducible corpus of real text that no one here wrote: the standard library's docstrings.

The docstrings are read from the installed standard library's source with
``ast`` (nothing is imported or downloaded) and cut into the three kinds of text
an indexing pipeline sends: titles, sentences and passages of up to a few
hundred words. The same Python version gives the same corpus, in the same order.

    python -m loadtest.corpus --out reports/corpus.jsonl
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import random
import re
import sysconfig
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

KINDS = ("title", "sentence", "passage")
MAX_PASSAGE_WORDS = 300
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__", "turtledemo"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LIKE = re.compile(r"(>>>|\.\.\. |^\s*[-=*]{3,}|::$)", re.MULTILINE)


@dataclass(frozen=True)
class Document:
    """One text of the corpus and what kind of text it is."""

    kind: str
    text: str
    source: str

    @property
    def words(self) -> int:
        return len(self.text.split())


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The standard library's Python files, sorted, tests and demos left out."""
    base = root or Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in base.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(base).parts))


_PARSING = threading.Lock()
"""One parse at a time: CPython 3.11's parser keeps its recursion depth per interpreter, and two threads building
the corpus at once failed with "AST constructor recursion depth mismatch"."""


def docstrings(path: Path) -> Iterator[str]:
    """Module, class and function docstrings of one source file."""
    try:
        with _PARSING:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def _clean(text: str) -> str:
    return " ".join(text.split())


def split_docstring(doc: str, source: str) -> Iterator[Document]:
    """Cut one docstring into a title, its sentences and its prose passages."""
    paragraphs = [p for p in re.split(r"\n\s*\n", doc) if p.strip() and not _CODE_LIKE.search(p)]
    if not paragraphs:
        return
    title = _clean(paragraphs[0].splitlines()[0]).rstrip(".")
    if 2 <= len(title.split()) <= 12:
        yield Document("title", title, source)
    passage: list[str] = []
    for paragraph in map(_clean, paragraphs):
        for sentence in _SENTENCE_END.split(paragraph):
            if 6 <= len(sentence.split()) <= 60:
                yield Document("sentence", sentence, source)
        if len(" ".join([*passage, paragraph]).split()) > MAX_PASSAGE_WORDS:
            yield from _passage(passage, source)
            passage = []
        passage.append(paragraph)
    yield from _passage(passage, source)


def _passage(paragraphs: list[str], source: str) -> Iterator[Document]:
    text = " ".join(paragraphs)
    words = text.split()
    if len(words) >= 40:
        yield Document("passage", " ".join(words[:MAX_PASSAGE_WORDS]), source)


@functools.cache
def build_corpus(root: Path | None = None) -> tuple[Document, ...]:
    """Every document of the corpus, in a fixed order, without duplicates: read once per process (3-4 s), and a
    tuple, so that no caller changes what the next one gets."""
    base = root or Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    corpus: list[Document] = []
    for path in stdlib_sources(base):
        source = str(path.relative_to(base))
        for doc in docstrings(path):
            for item in split_docstring(doc, source):
                if item.text not in seen:
                    seen.add(item.text)
                    corpus.append(item)
    return tuple(corpus)


INDEXING_MIX = {"title": 0.15, "sentence": 0.35, "passage": 0.5}
"""What an indexing pipeline sends: mostly passages (document chunks), with titles and single sentences."""


class Sampler:
    """Draws documents with a given share of each kind; indexes the corpus once."""

    def __init__(self, corpus: Sequence[Document], seed: int = 0) -> None:
        self._by_kind = {kind: [d for d in corpus if d.kind == kind] for kind in KINDS}
        self._rng = random.Random(seed)

    def draw(self, n: int, mix: dict[str, float] | None = None) -> list[Document]:
        shares = mix or INDEXING_MIX
        kinds = self._rng.choices(list(shares), weights=list(shares.values()), k=n)
        return [self._rng.choice(self._by_kind[kind]) for kind in kinds]


def sample(corpus: Sequence[Document], n: int, *, seed: int = 0, mix: dict[str, float] | None = None) -> list[Document]:
    """``n`` documents drawn reproducibly with the given share of each kind (default: indexing mix)."""
    return Sampler(corpus, seed).draw(n, mix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to write")
    args = parser.parse_args()
    corpus = build_corpus()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out:
        for item in corpus:
            out.write(json.dumps(asdict(item)) + "\n")
    counts = {kind: sum(d.kind == kind for d in corpus) for kind in KINDS}
    print(f"{len(corpus)} documents {counts} -> {args.out}")


if __name__ == "__main__":
    main()
