"""What every specialist of the writing mesh reads from its task, and its brain.

A task's ``input`` carries the request (``input["request"]``) and the step's own
arguments; its ``context`` carries the outputs of the steps it depends on, recognised
by shape (an analysis has an ``outline``, a draft ``markdown``, a code sample
``code``), the latest one winning, so a re-planned step finds the newest analysis
or draft whatever its step id.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from agents.brain import Brain, Usage, brain
from mesh.agent import Context
from mesh.patterns.delegation.coordinator import record_usage
from mesh.patterns.delegation.plan import StepTask
from topics.writing import WritingRequest

logger = logging.getLogger(__name__)

THINK_ENV = "AGENTS_THINK_S"  # seconds each step takes on top of its work (0)

_brains: dict[int, Brain] = {}


def request_of(task: StepTask) -> WritingRequest:
    """The request the task's workflow serves."""
    return WritingRequest.model_validate(task.input["request"])


def latest(task: StepTask, key: str) -> Any:
    """The last dependency output holding ``key`` (None when none does)."""
    found = [out for out in task.context.values() if isinstance(out, dict) and key in out]
    return found[-1] if found else None


def brain_for(ctx: Context) -> Brain:
    """The brain for this process's settings (chosen once)."""
    settings = getattr(ctx.runner, "settings", None)
    key = id(settings)
    if key not in _brains:
        _brains[key] = brain(settings)
    return _brains[key]


def report(usage: Usage) -> None:
    """Tell the coordinator what a step's model calls cost (tokens, calls, USD), for
    the workflow's budget, its events, the audit and the specialist's metrics (nothing
    offline)."""
    if usage.calls or usage.tokens or usage.cost:
        record_usage(tokens=usage.tokens, calls=usage.calls, cost=usage.cost)


async def think(task: StepTask) -> None:
    """Take ``AGENTS_THINK_S`` seconds: a model's latency offline, for demos and the
    fault tests that kill a specialist mid-step (logged, so they see it started)."""
    delay = float(os.environ.get(THINK_ENV, "0") or 0)
    if delay > 0:
        logger.info("workflow %s step %s: working (%.1f s)", task.workflow_id, task.step_id,
                    delay)
        await asyncio.sleep(delay)
