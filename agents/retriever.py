"""The researcher's search: BM25 over the corpus shipped in ``agents/corpus/``.

The corpus is the project's own docs (a snapshot of the README and the design notes)
plus a few texts written for it or in the public domain (notes on MCP servers, an
excerpt of Strunk's *Elements of Style*); any ``*.md`` or ``*.txt`` added there is
indexed. Each paragraph of prose (code blocks and tables left out) is one
:class:`Passage`, titled by its document and section. What a file says about itself
(where it comes from, its licence) goes in a front-matter block at its top, between
``---`` lines (``provenance: ...``), or in an HTML comment: neither is indexed, so it
never becomes a passage, a section of a document or a reference.

Ranking is Okapi BM25 from ``bm25s`` (the ``agents`` extra). Why it: it is maintained
(releases through 2025, where ``rank-bm25`` stopped in 2022), it needs only numpy
(scipy is optional), it indexes this corpus in milliseconds on one core and scores
a query exactly (no approximate index), so the same query always gives the same
passages in the same order (ties broken by corpus order). Embeddings from a small
model would rank synonyms better but load a model of tens of MB per process.

Example:
    >>> hits = Corpus.default().search("MCP transports stdio", k=2)
    >>> hits[0].section
    'Transports: stdio and Streamable HTTP'
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

CORPUS = Path(__file__).resolve().parent / "corpus"

_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
_STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for
from further had has have having he her here hers him his how i if in into is it its
itself just me more most my no nor not now of off on once only or other our ours out
over own same she should so some such than that the their them then there these they
this those through to too under until up very was we were what when where which while
who whom why will with would you your yours create write post blog article technical""".split())  # noqa: SIM905


def tokens(text: str) -> list[str]:
    """Lower-cased words without stop words, plurals folded (``servers`` -> ``server``);
    a hyphenated word also gives its parts, so "dead letter" finds "dead-letter".

    Example:
        >>> tokens("The dead-letter topics and the retries")
        ['dead-letter', 'dead', 'letter', 'topic', 'retry']
    """
    found = []
    for word in _TOKEN.findall(text.lower()):
        parts = word.split("-") if "-" in word else []
        for w in [word, *parts]:
            if w in _STOPWORDS or len(w) < 2:
                continue
            if len(w) > 4 and w.endswith("ies"):
                w = w[:-3] + "y"
            elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
                w = w[:-1]
            found.append(w)
    return found


_JOINS = re.compile(r"\s*(?:[,;&/+]|\b(?:and|or|plus|versus|vs\.?|as well as|along with)\b)"
                    r"\s*", re.I)


def parts_of(subject: str) -> list[str]:
    """The parts of a subject joined by "and", "or", commas...: each is searched on its
    own (a conjunction is no subject word); a subject of one part is itself.

    Example:
        >>> parts_of("consumer groups and dead letter queues")
        ['consumer groups', 'dead letter queues']
        >>> parts_of("retries, timeouts or dead letters")
        ['retries', 'timeouts', 'dead letters']
    """
    found = [p.strip(" .") for p in _JOINS.split(subject)]
    found = [p for p in found if tokens(p)]
    return found or [subject.strip()]


class Passage(BaseModel):
    """One paragraph of the corpus; ``n`` is its citation number once research
    numbers the passages it keeps (0 before)."""

    id: str
    source: str
    title: str
    section: str
    text: str
    score: float = 0.0
    n: int = 0


@dataclass(frozen=True, slots=True)
class _Chunk:
    id: str
    source: str
    title: str
    section: str
    text: str


_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\n.*?^(?:---|\.\.\.)[ \t]*$", re.M | re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)


def prose(text: str) -> str:
    r"""``text`` without what is not the document's prose: its front matter (a block
    between ``---`` lines at the top: provenance, licence), HTML comments and code
    blocks.

    Example:
        >>> prose("---\nprovenance: public domain\n---\n# T\n<!-- note -->\nBody.\n").split()
        ['#', 'T', 'Body.']
    """
    text = _FRONT_MATTER.sub("", text, count=1)
    text = _COMMENT.sub("", text)
    return re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.M | re.S)


def _chunks(path: Path) -> list[_Chunk]:
    text = prose(path.read_text(encoding="utf-8"))
    title, section = path.stem.replace("-", " "), ""
    found: list[_Chunk] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.strip().splitlines()
                 if ln.strip() and not ln.lstrip().startswith(("|", "<", "    "))]
        heading = [ln for ln in lines if ln.startswith("#")]
        for ln in heading:
            name = ln.lstrip("#").strip()
            if ln.startswith("# "):
                title = name
            section = name
        logical: list[str] = []  # a list item and its continuation lines are one line
        for ln in lines:
            if ln.startswith("#"):
                continue
            if logical and _ITEM.match(logical[-1]) and not _ITEM.match(ln):
                logical[-1] += " " + ln.strip()
            else:
                logical.append(ln.strip())
        body = " ".join(_sentence(ln) for ln in logical)
        for piece in _pieces(body):
            found.append(_Chunk(f"{path.name}#{len(found) + 1}", f"agents/corpus/{path.name}",
                                title, section or title, piece))
    return found


_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")


def _sentence(line: str) -> str:
    """A line of prose as it reads in a passage: a list item (``- item``) becomes a
    sentence of its own (its marker dropped, a capital first, an end mark), so passages
    are cut between items and no list runs on as one long sentence."""
    line = line.strip()
    if not _ITEM.match(line):
        return line
    item = _ITEM.sub("", line)
    if re.match(r"[a-z]+(?:[\s,:;]|$)", item):  # a word, not an identifier (create_topic)
        item = item[:1].upper() + item[1:]
    return item if item.endswith((".", "!", "?", ":")) else f"{item}."


def _pieces(body: str, most: int = 140) -> list[str]:
    """``body`` in passages of at most about ``most`` words, cut between sentences;
    fewer than 25 words is no passage."""
    pieces: list[str] = []
    current: list[str] = []
    for sentence in re.split(r"(?<=[.!?:])\s+(?=[A-Z`])", body):
        if current and len(" ".join([*current, sentence]).split()) > most:
            pieces.append(" ".join(current))
            current = []
        current.append(sentence)
    pieces.append(" ".join(current))
    return [p for p in pieces if len(p.split()) >= 25]


class Corpus:
    """The passages of a directory of Markdown/text files and their BM25 index."""

    def __init__(self, directory: Path) -> None:
        import bm25s  # the agents extra; imported here so `mesh graph` needs none of it

        files = sorted([*directory.glob("*.md"), *directory.glob("*.txt")])
        self.chunks = [c for f in files for c in _chunks(f)]
        if not self.chunks:
            raise FileNotFoundError(f"No passages in {directory}: the corpus needs *.md or "
                                    "*.txt files with paragraphs of 25 words or more.")
        self._index = bm25s.BM25()
        self._index.index([tokens(f"{c.section} {c.text}") for c in self.chunks],
                          show_progress=False)
        self._vocab = set(self._index.vocab_dict)
        self._counts: dict[str, Counter[str]] = {}
        for c in self.chunks:
            self._counts.setdefault(c.source, Counter()).update(tokens(f"{c.section} {c.text}"))

    @classmethod
    @functools.cache
    def default(cls) -> Corpus:
        """The shipped corpus, indexed once per process."""
        return cls(CORPUS)

    def search(self, query: str, *, k: int = 5, exclude: frozenset[str] = frozenset(),
               about: str = "") -> list[Passage]:
        """The ``k`` best passages for ``query`` (score > 0), best first; ``exclude``
        leaves out passages by id (those already found); ``about`` keeps only passages of
        documents on that subject (each of its words there at least twice), so a query
        word common elsewhere ("server", "test") does not pull in other documents."""
        words = [t for t in tokens(query) if t in self._vocab]
        if not words:
            return []
        on_subject = self._on_subject(about)
        scores = self._index.get_scores(words)
        ranked = sorted(range(len(self.chunks)), key=lambda i: (-float(scores[i]), i))
        hits: list[Passage] = []
        for i in ranked:
            chunk = self.chunks[i]
            if float(scores[i]) <= 0 or len(hits) >= k:
                break
            if chunk.id not in exclude and chunk.source in on_subject:
                hits.append(Passage(id=chunk.id, source=chunk.source, title=chunk.title,
                                    section=chunk.section, text=chunk.text,
                                    score=round(float(scores[i]), 4)))
        return hits

    def _on_subject(self, about: str) -> set[str]:
        """The documents on ``about``: on any of its parts (:func:`parts_of`), each of the
        part's words the corpus knows there at least twice (a word no document has, such
        as "queues" of "dead letter queues", asks nothing; a part most of whose words are
        unknown matches no document)."""
        if not tokens(about):
            return set(self._counts)
        found: set[str] = set()
        for part in parts_of(about):
            words = tokens(part)
            known = [t for t in words if t in self._vocab]
            if not known or len(known) * 2 < len(words):
                continue
            found |= {source for source, counts in self._counts.items()
                      if all(counts[t] >= 2 for t in known)}
        return found
