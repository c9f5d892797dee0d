"""The model brain: the writing mesh's work done by a model through pydantic-ai.

The model comes from the settings (``MESH_LLM__MODEL``, ``MESH_LLM__BASE_URL``,
``MESH_LLM__API_KEY``: :func:`mesh.llm.model_from_settings`). The researcher's search
is a tool the model calls (``search(query, k)`` over the shipped corpus); the analysis,
the code sample and the draft are structured outputs validated by pydantic-ai (which
asks again on invalid output). What stays deterministic: the passages' numbering, the
references list, running the sample (agents/coder.py) and every check (agents/reviewer.py).

Errors: a retriable model error (429, 5xx, timeout, connection) raises a retriable
:class:`~mesh.llm.LLMError`, so the mesh retries the step through its retry topics; any
other (output still invalid, a 4xx) falls back to the offline brain for that step, marked
``usage.fallback`` (counted in the demo's summary). Keys never appear in errors or logs.

Usage: the calls and tokens pydantic-ai counted, and the cost (USD) of the model's
answers as pydantic-ai prices them (genai-prices, from the model name the server
answered with; :func:`cost_of`), also for a run that failed and fell back. A model it
cannot price (a local one, a custom name) costs 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic_ai import Agent as ModelAgent
from pydantic_ai import capture_run_messages
from pydantic_ai import exceptions as pai
from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.usage import RunUsage

from agents.brain import (
    Analysis,
    CodeSample,
    Draft,
    Figure,
    Findings,
    KeyPoint,
    Search,
    Section,
    Usage,
    subject_of,
)
from agents.document import count_words
from agents.offline import OfflineBrain, _numbered
from agents.retriever import Passage
from agents.step import report
from mesh.errors import MeshError
from mesh.llm import LLMError, classify, model_from_settings
from topics.writing import WritingRequest

logger = logging.getLogger(__name__)


class _Notes(BaseModel):
    key_points: list[KeyPoint]
    figures: list[Figure]
    outline: list[Section]


class _Code(BaseModel):
    filename: str
    code: str
    explanation: str


class ModelBrain:
    """See the module docstring; ``fallback`` does a step the model could not."""

    def __init__(self, llm_settings: Any, *, fallback: OfflineBrain) -> None:
        model = model_from_settings(llm_settings)
        if model is None:
            raise ValueError("ModelBrain needs MESH_LLM__MODEL; without it use OfflineBrain.")
        self.model, self.fallback = model, fallback
        self.label = f"model {model.model_id}" if hasattr(model, "model_id") else "model"

    async def _ask(self, what: str, instructions: str, prompt: str, output: Any,
                   tools: Sequence[Any] = ()) -> tuple[Any, Usage]:
        """The model's validated output (None when it failed for good) and its usage."""
        agent: ModelAgent[None, Any] = ModelAgent(self.model, output_type=output,
                                                  instructions=instructions, tools=tools,
                                                  retries=2)
        usage = RunUsage()
        spent = Usage(brain=self.label)
        with capture_run_messages() as messages:  # kept when the run fails too
            try:
                result = await agent.run(prompt, usage=usage)
                return result.output, _usage(spent, usage, messages)
            except MeshError:
                raise
            except (pai.AgentRunError, pai.UserError, TimeoutError) as exc:
                failed = exc
        retriable, cause, _ = classify(failed)
        if retriable:
            # The answers this attempt already got were paid for: charged to the step
            # (its failed attempt's audit, the result's usage) though its output is lost.
            report(_usage(spent, usage, messages))
            raise LLMError(f"Model {self.label!r} failed to {what}: {cause}. Retriable.",
                           agent=what, model=self.label, cause=cause,
                           retriable=True) from None
        logger.warning("model %s could not %s (%s): the offline brain does it",
                       self.label, what, cause)
        return None, _usage(spent, usage, messages).model_copy(update={"fallback": True})

    async def research(self, queries: list[str], *, k: int, search: Search,
                       exclude: frozenset[str] = frozenset()) -> Findings:
        found: dict[str, Passage] = {}

        def search_corpus(query: str, k: int = 5) -> list[dict[str, str]]:
            """Search the corpus; returns passages (id, section, text), best first."""
            hits = search(query, min(max(k, 1), 10))
            found.update({h.id: h for h in hits})
            return [{"id": h.id, "section": h.section, "text": h.text} for h in hits]

        keep, usage = await self._ask(
            "research", "You research a document. Call search_corpus with 2 to 4 queries, "
            f"then return the ids of the {k} passages most useful to write about the topic.",
            f"Topic: {'; '.join(queries)}", list[str], tools=[search_corpus])
        if keep is None or not found:
            offline = await self.fallback.research(queries, k=k, search=search,
                                                   exclude=exclude)
            return offline.model_copy(update={"usage": usage.model_copy(
                update={"fallback": True})})
        chosen = [found[i] for i in keep if i in found][:k] or list(found.values())[:k]
        return Findings(queries=queries, passages=chosen, usage=usage)

    async def analyse(self, request: WritingRequest, passages: list[Passage]) -> Analysis:
        numbered = _numbered(passages, request.requirements.must_cover)
        text = "\n\n".join(f"[{p.n}] ({p.section}) {p.text}" for p in numbered)
        notes, usage = await self._ask(
            "analyse", "Extract up to 6 key points and up to 6 figures (numbers, dates, "
            "versions) from the numbered passages, each citing its passage number, and an "
            "outline of 4 to 8 sections listing the passage numbers each draws on.",
            f"Task: {request.task}\nAudience: {request.requirements.audience}\n\n{text}",
            _Notes)
        valid = {p.n for p in numbered}
        if notes is None or not _cites_ok(notes, valid):
            offline = await self.fallback.analyse(request, passages)
            return offline.model_copy(update={"usage": usage.model_copy(
                update={"fallback": True})})
        return Analysis(subject=subject_of(request.task), passages=numbered,
                        key_points=notes.key_points, figures=notes.figures,
                        outline=notes.outline, usage=usage)

    async def code(self, request: WritingRequest, analysis: Analysis) -> CodeSample:
        sample, usage = await self._ask(
            "code", "Write one self-contained Python 3.11 program (standard library only, "
            "no input, no network, finishes in a second) that illustrates the subject and "
            "prints its results.",
            f"Subject: {analysis.subject}\nKey points:\n"
            + "\n".join(f"- {p.text}" for p in analysis.key_points), _Code)
        if sample is None:
            offline = await self.fallback.code(request, analysis)
            return offline.model_copy(update={"usage": usage})
        return CodeSample(filename=sample.filename, code=sample.code,
                          explanation=sample.explanation, usage=usage)

    async def write(self, request: WritingRequest, analysis: Analysis,
                    code: CodeSample | None, feedback: list[str]) -> Draft:
        req = request.requirements
        sources = "\n\n".join(f"[{p.n}] ({p.section}) {p.text}" for p in analysis.passages)
        sample = (f"\n\nInclude this code block verbatim (```python) and what it prints:\n"
                  f"{code.code}\nIt prints:\n{code.stdout}") if code else ""
        notes = "\n".join(f"- {f}" for f in feedback)
        markdown, usage = await self._ask(
            "write", f"Write a Markdown document of {req.word_count} words (within 10 %) "
            f"for {req.audience}: a # title, at least three ## sections, citations of the "
            "numbered sources as [n] after the sentences that use them, and a final "
            "## References section listing each cited [n]. Use only the sources' facts.",
            f"Task: {request.task}\nOutline: "
            + "; ".join(s.title for s in analysis.outline)
            + f"\n\nSources:\n{sources}{sample}"
            + (f"\n\nThe reviewer asked for:\n{notes}" if notes else ""), str)
        if markdown is None:
            offline = await self.fallback.write(request, analysis, code, feedback)
            return offline.model_copy(update={"usage": usage})
        title = next((ln[2:].strip() for ln in markdown.splitlines() if ln.startswith("# ")),
                     analysis.subject)
        return Draft(title=title, markdown=markdown, words=count_words(markdown), usage=usage)


def _usage(base: Usage, usage: RunUsage, messages: Sequence[ModelMessage] = ()) -> Usage:
    return base.model_copy(update={"calls": usage.requests,
                                   "input_tokens": usage.input_tokens,
                                   "output_tokens": usage.output_tokens,
                                   "cost": cost_of(messages)})


def cost_of(messages: Sequence[ModelMessage]) -> float:
    """What the model's answers among ``messages`` cost in USD, priced by pydantic-ai
    (genai-prices) from each answer's model name, provider and token usage. An answer it
    cannot price (a model it does not know, such as a local one, or no usage reported)
    counts 0, so a model without a price costs 0 and nothing fails.

    Example:
        >>> from pydantic_ai.messages import TextPart
        >>> from pydantic_ai.usage import RequestUsage
        >>> def answer(model: str) -> ModelResponse:
        ...     return ModelResponse(parts=[TextPart("hi")], model_name=model,
        ...                          usage=RequestUsage(input_tokens=1_000_000))
        >>> cost_of([answer("gpt-4o-mini")]), cost_of([answer("my-local-llama")])
        (0.15, 0.0)
    """
    total = 0.0
    for message in messages:
        if not isinstance(message, ModelResponse) or not message.model_name:
            continue
        try:
            total += float(message.cost().total_price)
        except Exception as exc:  # LookupError, ValueError, AssertionError...: no price
            logger.debug("no price for model %r: %s", message.model_name, type(exc).__name__)
    return total


def _cites_ok(notes: _Notes, valid: set[int]) -> bool:
    cites = [p.cite for p in notes.key_points] + [f.cite for f in notes.figures]
    cites += [n for s in notes.outline for n in s.cites]
    return bool(notes.outline) and all(n in valid for n in cites)
