"""with_fallbacks, without a broker: what it does with errors that no level can fix."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from mesh.agent import Agent, Context
from mesh.envelope import Envelope
from mesh.errors import SignatureInvalid
from mesh.resilience.fallback import with_fallbacks
from mesh.topic import Topic


class Task(BaseModel):
    tid: str


class Done(BaseModel):
    tid: str
    by: str


tasks = Topic("fbu.tasks", Task, key="tid")
done = Topic("fbu.done", Done, key="tid")


async def test_an_input_error_is_not_handed_to_the_next_level() -> None:
    """A forged task (SignatureInvalid, an InputError) is bad for every level: the
    fallback never runs it, the error escapes to the runtime (-> dead letters)."""
    ran: list[str] = []

    async def primary(task: Task, ctx: Context) -> Done:
        raise SignatureInvalid(f"task {task.tid} is not signed with the plan key")

    async def fallback(task: Task, ctx: Context) -> Done:
        ran.append(task.tid)
        return Done(tid=task.tid, by="fallback")

    wrapped = with_fallbacks(Agent("fbu", consumes=tasks, produces=done, handler=primary),
                             fallback)
    event = Envelope.new(Task(tid="t1"), source="test")
    with pytest.raises(SignatureInvalid, match="not signed"):
        await wrapped.handle(event.payload, Context(wrapped, event))
    assert ran == []
