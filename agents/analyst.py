"""The analyst: key points, figures and an outline from the research's passages.

    mesh run agents.analyst:agent
"""

from __future__ import annotations

from typing import Any

from agents.brain import Findings
from agents.step import brain_for, report, request_of, think
from mesh.agent import Context
from mesh.errors import HandlerError
from mesh.patterns.delegation.coordinator import Specialist
from mesh.patterns.delegation.plan import StepTask
from topics.writing import writing


async def analyse(task: StepTask, ctx: Context) -> dict[str, Any]:
    """Merges every research step it depends on, numbers the passages, outlines."""
    passages = [p for out in task.context.values()
                if isinstance(out, dict) and "passages" in out and "outline" not in out
                for p in Findings.model_validate(out).passages]
    if not passages:
        raise HandlerError(f"Step {task.step_id!r} of {task.workflow_id!r}: the research "
                           f"found no passages ({', '.join(task.context) or 'no research'}). "
                           "Research other terms or add documents to agents/corpus/.")
    await think(task)
    analysis = await brain_for(ctx).analyse(request_of(task), passages)
    report(analysis.usage)
    return analysis.model_dump()


agent = Specialist("analyst", topics=writing, handler=analyse, group="writing-analyst",
                   description="key points, figures and an outline from passages")
