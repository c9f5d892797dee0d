"""The intelligence of the writing mesh behind one small interface, :class:`Brain`.

Two implementations: :class:`~agents.offline.OfflineBrain` (deterministic, no model,
no network: BM25 retrieval, extraction, templates) and
:class:`~agents.model_brain.ModelBrain` (a model through pydantic-ai: OpenAI and
OpenAI-compatible servers such as vLLM, Ollama and LM Studio through a base URL,
Anthropic and the rest pydantic-ai supports). :func:`brain` picks one from the
settings: ``MESH_LLM__MODEL`` set gives the model (with ``MESH_LLM__BASE_URL`` and
``MESH_LLM__API_KEY``), else offline. The specialists (``agents/<name>.py``) only call
the interface; what a step returns is a model below, so the two brains' outputs look
alike and the reviewer checks them the same way.

Each output carries :class:`Usage`: which brain did it, the model calls, tokens and
cost (USD, as pydantic-ai prices the model; 0 for a model it cannot price) it spent,
and whether it fell back to the offline brain (a model answer that stayed
invalid after pydantic-ai's retries).

Example:
    >>> brain(settings=None).label
    'offline'
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel, Field

from agents.retriever import Passage
from topics.writing import WritingRequest

logger = logging.getLogger(__name__)

Search = Callable[[str, int], list[Passage]]


class Usage(BaseModel):
    """What producing one output cost."""

    brain: str = "offline"
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0  # USD, priced by pydantic-ai (genai-prices); 0 when unpriced
    fallback: bool = False

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class Findings(BaseModel):
    """The researcher's answer: passages found for the queries, best first."""

    queries: list[str]
    passages: list[Passage]
    usage: Usage = Field(default_factory=Usage)


class KeyPoint(BaseModel):
    text: str
    cite: int


class Figure(BaseModel):
    """A number worth quoting (a date, a version, a count) with its sentence."""

    value: str
    context: str
    cite: int


class Section(BaseModel):
    """A section of the outline and the passages (by number) it draws on."""

    title: str
    cites: list[int]


class Analysis(BaseModel):
    """The analyst's answer: the numbered passages, key points, figures, an outline."""

    subject: str
    passages: list[Passage]
    key_points: list[KeyPoint]
    figures: list[Figure] = Field(default_factory=list)
    outline: list[Section]
    usage: Usage = Field(default_factory=Usage)


class CodeSample(BaseModel):
    """The coder's answer: a program, what it shows, and what running it printed."""

    language: str = "python"
    filename: str
    code: str
    explanation: str
    stdout: str = ""
    exit_code: int | None = None
    usage: Usage = Field(default_factory=Usage)


class Draft(BaseModel):
    """The writer's answer: a Markdown document."""

    title: str
    markdown: str
    words: int
    usage: Usage = Field(default_factory=Usage)


class Brain(Protocol):
    """What the specialists ask of the intelligence (offline or a model)."""

    label: str

    async def research(self, queries: list[str], *, k: int, search: Search,
                       exclude: frozenset[str] = frozenset()) -> Findings:
        """Passages for ``queries``, found with ``search`` (a tool, for a model)."""
        ...

    async def analyse(self, request: WritingRequest, passages: list[Passage]) -> Analysis:
        """Key points, figures and an outline of ``passages`` (numbered from 1)."""
        ...

    async def code(self, request: WritingRequest, analysis: Analysis) -> CodeSample:
        """A code sample for the document (not yet run)."""
        ...

    async def write(self, request: WritingRequest, analysis: Analysis,
                    code: CodeSample | None, feedback: list[str]) -> Draft:
        """The document, honouring the requirements and the reviewer's feedback."""
        ...


def subject_of(task: str) -> str:
    """What a task is about: ``"Create a technical blog post about MCP servers"`` ->
    ``"MCP servers"`` (the task itself when no "about/on" clause is found).

    Example:
        >>> subject_of("Write a guide on consumer groups for beginners")
        'consumer groups'
    """
    found = re.search(r"\b(?:about|on|regarding|covering)\s+(.+?)(?:\s+for\s+.+)?[.!?]?$",
                      task.strip(), re.I)
    return (found.group(1) if found else task).strip()


def brain(settings: Any = None) -> Brain:
    """The brain the settings ask for: a model when ``settings.llm.model`` is set
    (``MESH_LLM__MODEL``), else the offline one. Read defensively: settings without an
    ``llm`` section (older mesh versions) mean offline."""
    from agents.offline import OfflineBrain

    llm = getattr(settings, "llm", None)
    model = getattr(llm, "model", None) if llm is not None else None
    if not model:
        return OfflineBrain()
    from agents.model_brain import ModelBrain

    return ModelBrain(llm, fallback=OfflineBrain())
