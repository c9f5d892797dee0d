"""Breakers sharing one compacted topic: replicas agree, a restart keeps the state."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from mesh import Codec
from mesh.errors import BreakerOpen
from mesh.resilience.breaker import (
    BreakerPolicy,
    BreakerTransition,
    CircuitBreaker,
    breaker_topics,
)
from tests.conftest import BrokerUnderTest
from tests.support import read_all


async def until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not seen within {timeout:.0f} s: {what}"
        await asyncio.sleep(0.05)  # polling a local attribute, not waiting for time


async def down() -> None:
    raise ConnectionError("503")


async def ok() -> str:
    return "ok"


async def test_two_replicas_see_each_others_open_and_close_and_a_restart_keeps_it(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: replica A opens after 2 failures and B (same topic) then refuses calls with
    BreakerOpen; B's successful probe closes it and A sees that; a new instance started
    after A opened again starts open; the events topic holds the transitions in order."""
    settings = broker.settings()
    topics = breaker_topics(prefix)
    policy = BreakerPolicy(failure_threshold=2, reset_timeout=1.0)
    a = CircuitBreaker("api", policy, settings=settings, topics=topics, replica="a")
    b = CircuitBreaker("api", policy, settings=settings, topics=topics, replica="b")
    async with a, b:
        for _ in range(2):
            with contextlib.suppress(ConnectionError, BreakerOpen):  # the tripping call is held
                await a.call(down)
        assert a.state == "open"
        await until(lambda: b.state == "open", "replica b sees the opening")
        held_until = 0.0
        try:
            await b.call(ok)
            raise AssertionError("b let a call through while open")
        except BreakerOpen as exc:
            held_until = exc.until
        assert held_until == (a.record.opened_at or 0) + 1.0
        while time.time() < held_until:  # the reset timeout is the behaviour under test
            await asyncio.sleep(0.05)
        assert await b.call(ok) == "ok"
        assert b.state == "closed"
        await until(lambda: a.state == "closed" and a.record.version == 3,
                    "replica a sees b's probe close it")
        for _ in range(2):
            with contextlib.suppress(ConnectionError, BreakerOpen):  # the tripping call is held
                await a.call(down)
        assert a.state == "open" and a.record.version == 4
    restarted = CircuitBreaker("api", policy, settings=settings, topics=topics, replica="a2")
    async with restarted:
        assert restarted.state == "open" and restarted.record.version == 4
        assert restarted.record.updated_by == "a"
    codec = Codec()
    events = [await codec.decode(topics.events, r.value or b"")
              for r in await read_all(settings, [topics.events.name])]
    assert all(isinstance(e, BreakerTransition) for e in events)
    assert [(e.transition, e.by) for e in events] == [  # type: ignore[attr-defined]
        ("opened", "a"), ("half_open", "b"), ("closed", "b"), ("opened", "a")]
