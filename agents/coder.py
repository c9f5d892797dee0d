"""The coder: writes the document's code sample and runs it before handing it over.

    mesh run agents.coder:agent
"""

from __future__ import annotations

from typing import Any

from agents.brain import Analysis
from agents.sample import run_async
from agents.step import brain_for, latest, report, request_of, think
from mesh.agent import Context
from mesh.errors import HandlerError
from mesh.patterns.delegation.coordinator import Specialist
from mesh.patterns.delegation.plan import StepTask
from topics.writing import writing


async def code(task: StepTask, ctx: Context) -> dict[str, Any]:
    """A runnable sample on the subject; what it printed goes into the document."""
    analysis = Analysis.model_validate(latest(task, "outline"))
    await think(task)
    sample = await brain_for(ctx).code(request_of(task), analysis)
    report(sample.usage)
    ran = await run_async(sample.code)
    if ran.exit_code != 0:
        raise HandlerError(f"Code sample {sample.filename!r} of {task.workflow_id!r} exits "
                           f"with {ran.exit_code}: {ran.stderr.strip()[-300:]}. A sample "
                           "must run as written: fix the template or the instructions.")
    return sample.model_copy(update={"stdout": ran.stdout, "exit_code": 0}).model_dump()


agent = Specialist("coder", topics=writing, handler=code, group="writing-coder",
                   description="writes and runs the document's code sample")
