"""A fallback test app: an ``answer`` agent (primary) with two fallbacks.

A request's ``fail`` lists the levels that fail for it (0 = primary, 1, 2): level 0
raises a retriable ``TimeoutError`` (so ``retries_per_level`` applies), levels 1 and 2
a ``ValueError``. ``breaker`` makes the primary raise ``BreakerOpen`` while the module's
``BREAKER_OPEN`` flag is set too (a test flips it to close the breaker). Topic names
come from ``MESH_TEST_PREFIX``.

``guarded`` is the same agent with a real circuit breaker: its primary calls a "model"
through breaker ``primary-model`` (``<prefix>.breakers``; opens after 2 failures and
stays open for 10 minutes), over a one-partition topic so inputs are handled in order.
"""

from __future__ import annotations

import os
import time
from collections import Counter

from pydantic import BaseModel, Field

from mesh import Agent, Context, Topic
from mesh.errors import BreakerOpen
from mesh.resilience.breaker import BreakerPolicy, BreakerRegistry, breaker_topics
from mesh.resilience.fallback import events_topic, fallback_result, with_fallbacks


class Ask(BaseModel):
    """A request; ``fail`` lists the levels that fail for it."""

    request_id: str
    question: str = ""
    fail: list[int] = Field(default_factory=list)
    breaker: bool = False


class Reply(BaseModel):
    """An answer and who wrote it."""

    request_id: str
    text: str
    by: str


BREAKER_OPEN = {"open": False}
CALLS: Counter[str] = Counter()  # handler name -> calls, for the in-process tests
GUARD = BreakerPolicy(failure_threshold=2, reset_timeout=600.0)


async def secondary(ask: Ask, ctx: Context) -> Reply:
    CALLS["secondary"] += 1
    if 1 in ask.fail:
        raise ValueError(f"secondary cannot answer {ask.request_id}")
    return Reply(request_id=ask.request_id, text=ask.question, by="secondary")


async def tertiary(ask: Ask, ctx: Context) -> Reply:
    CALLS["tertiary"] += 1
    if 2 in ask.fail:
        raise ValueError(f"tertiary cannot answer {ask.request_id}")
    return Reply(request_id=ask.request_id, text="canned answer", by="tertiary")


def build(prefix: str, *, retries_per_level: int = 2) -> Agent[Ask]:
    """The wrapped agent, its topics named ``<prefix>.*``."""
    asks = Topic(f"{prefix}.asks", Ask, key="request_id", partitions=2)
    replies = Topic(f"{prefix}.replies", fallback_result(Reply), key=None, partitions=2)

    async def primary(ask: Ask, ctx: Context) -> Reply:
        CALLS["primary"] += 1
        if ask.breaker and BREAKER_OPEN["open"]:
            raise BreakerOpen(f"breaker of primary open for {ask.request_id}",
                              until=time.time() + 30)
        if 0 in ask.fail:
            raise TimeoutError(f"primary timed out on {ask.request_id}")
        return Reply(request_id=ask.request_id, text=ask.question.upper(), by="primary")

    main = Agent(f"{prefix}-answer", consumes=asks, produces=replies, handler=primary)
    return with_fallbacks(main, secondary, tertiary, retries_per_level=retries_per_level,
                          events=events_topic(f"{prefix}.answer"))


def build_guarded(prefix: str) -> Agent[Ask]:
    """The wrapped agent whose primary goes through a real breaker (see the docstring)."""
    asks = Topic(f"{prefix}.guarded-asks", Ask, key="request_id", partitions=1)
    replies = Topic(f"{prefix}.guarded-replies", fallback_result(Reply), key=None,
                    partitions=1)
    breakers = BreakerRegistry(breaker_topics(prefix))

    async def primary(ask: Ask, ctx: Context) -> Reply:
        model = await breakers.get("primary-model", ctx.runner.settings, GUARD)
        async with model.guard(correlation_id=ctx.correlation_id):
            if 0 in ask.fail:
                raise TimeoutError(f"the model timed out on {ask.request_id}")
        return Reply(request_id=ask.request_id, text=ask.question.upper(), by="primary")

    main = Agent(f"{prefix}-guarded", consumes=asks, produces=replies, handler=primary)
    return with_fallbacks(main, secondary, tertiary, retries_per_level=1,
                          events=events_topic(f"{prefix}.guarded"))


answer = build(os.environ.get("MESH_TEST_PREFIX", "fallback"))
guarded = build_guarded(os.environ.get("MESH_TEST_PREFIX", "fallback"))
