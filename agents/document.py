"""What the writer makes and the reviewer checks: a Markdown document, measured the
same way by both (words outside code blocks, sections, citations, code blocks).

Example:
    >>> doc = "# T\\n\\n## Intro\\n\\nMCP links tools [1].\\n\\n```python\\nprint(1)\\n```\\n"
    >>> count_words(doc), sections(doc), citations(doc), len(code_blocks(doc))
    (5, ['Intro'], {1}, 1)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_WORD = re.compile(r"[A-Za-z0-9][\w'\u2019.-]*")
_CITE = re.compile(r"\[(\d{1,3})\]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(`])")


@dataclass(frozen=True, slots=True)
class CodeBlock:
    """A fenced code block: its language tag and its text."""

    language: str
    code: str


def prose(markdown: str) -> str:
    """``markdown`` without its fenced code blocks."""
    return _FENCE.sub("", markdown)


def count_words(markdown: str) -> int:
    """Words of the prose before the references section (headings and lists included,
    code blocks not; a citation marker ``[3]`` is not a word)."""
    body = re.split(r"^## +References\s*$", prose(markdown), maxsplit=1, flags=re.M)[0]
    return len(_WORD.findall(_CITE.sub("", body)))


def sections(markdown: str) -> list[str]:
    """The titles of the level-2 headings, in order."""
    return re.findall(r"^## +(.+?)\s*$", prose(markdown), re.M)


def citations(markdown: str) -> set[int]:
    """The passage numbers cited in the text (before the references section)."""
    body = re.split(r"^## +References\s*$", prose(markdown), maxsplit=1, flags=re.M)[0]
    return {int(n) for n in _CITE.findall(body)}


def references(markdown: str) -> set[int]:
    """The numbers the references section lists (lines starting ``[n]`` or ``n.``)."""
    parts = re.split(r"^## +References\s*$", prose(markdown), maxsplit=1, flags=re.M)
    if len(parts) < 2:
        return set()
    return {int(n) for n in re.findall(r"^\s*(?:[-*]\s*)?\[?(\d{1,3})[\].]", parts[1], re.M)}


def code_blocks(markdown: str) -> list[CodeBlock]:
    """Every fenced code block, in order."""
    return [CodeBlock(lang.lower(), code) for lang, code in _FENCE.findall(markdown)]


def split_sentences(text: str) -> list[str]:
    """``text`` cut into sentences (a simple rule: end mark, space, capital or digit)."""
    flat = " ".join(text.split())
    return [s.strip() for s in _SENTENCE.split(flat) if s.strip()]
