"""The writer: composes the Markdown document from the analysis and the code sample,
taking the reviewer's feedback into account on a rewrite.

    mesh run agents.writer:agent
"""

from __future__ import annotations

from typing import Any

from agents.brain import Analysis, CodeSample
from agents.step import brain_for, latest, request_of, think
from mesh.agent import Context
from mesh.patterns.delegation.coordinator import Specialist
from mesh.patterns.delegation.plan import StepTask
from topics.writing import writing


async def write(task: StepTask, ctx: Context) -> dict[str, Any]:
    """Sections for the audience, the word count, citations, the code block."""
    request = request_of(task)
    analysis = Analysis.model_validate(latest(task, "outline"))
    sample = latest(task, "code")
    code = CodeSample.model_validate(sample) if sample else None
    await think(task)
    draft = await brain_for(ctx).write(request, analysis, code,
                                       list(task.input.get("feedback", [])))
    ctx.logger.info("step %s: %d words", task.step_id, draft.words)
    return draft.model_dump()


agent = Specialist("writer", topics=writing, handler=write, group="writing-writer",
                   description="composes the Markdown document")
