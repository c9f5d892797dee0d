"""The writer: composes the Markdown document from the analysis and the code sample,
taking the reviewer's feedback into account on a rewrite; and, when a person approved
it (the plan's ``publish`` step), hands over the reviewed draft as the final copy.

    mesh run agents.writer:agent
"""

from __future__ import annotations

from typing import Any

from agents.brain import Analysis, CodeSample
from agents.document import citations, count_words
from agents.step import brain_for, latest, report, request_of, think
from mesh.agent import Context
from mesh.errors import HandlerError
from mesh.patterns.delegation.coordinator import Specialist
from mesh.patterns.delegation.plan import StepTask
from topics.writing import writing


async def write(task: StepTask, ctx: Context) -> dict[str, Any]:
    """Sections for the audience, the word count, citations, the code block."""
    if task.input.get("publish"):
        return publish(task, ctx)
    request = request_of(task)
    analysis = Analysis.model_validate(latest(task, "outline"))
    sample = latest(task, "code")
    code = CodeSample.model_validate(sample) if sample else None
    await think(task)
    draft = await brain_for(ctx).write(request, analysis, code,
                                       list(task.input.get("feedback", [])))
    report(draft.usage)
    ctx.logger.info("step %s: %d words", task.step_id, draft.words)
    return draft.model_dump() | {"material": material(analysis, draft.markdown)}


def material(analysis: Analysis, markdown: str) -> dict[str, int]:
    """What the draft had to draw on and what it used: the passages found (and their
    words), the passages it cites; the reviewer tells a short draft that used them all
    that the corpus has too little on the subject."""
    return {"passages": len(analysis.passages),
            "words": sum(count_words(p.text) for p in analysis.passages),
            "cited": len(citations(markdown))}


def publish(task: StepTask, ctx: Context) -> dict[str, Any]:
    """The approved draft as published (its usage counted once, with its write step)."""
    draft = latest(task, "markdown")
    if draft is None:
        raise HandlerError(f"Step {task.step_id!r} of {task.workflow_id!r} has no draft to "
                           f"publish in its context ({', '.join(task.context)}): make it "
                           "depend on a writer step.")
    ctx.logger.info("step %s: published %r", task.step_id, draft.get("title"))
    return {k: v for k, v in draft.items() if k not in ("usage", "material")} | {
        "published": True}


agent = Specialist("writer", topics=writing, handler=write, group="writing-writer",
                   description="composes the Markdown document, publishes it once approved")
