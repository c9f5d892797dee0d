"""Breaker and fallback metrics, read from the process's breakers and fallback agents
at scrape time (no broker: local breakers and a hand-fed FallbackStats)."""

from __future__ import annotations

import contextlib
import uuid

from prometheus_client import CollectorRegistry

from mesh.errors import BreakerOpen
from mesh.runtime.metrics import MeshMetrics
from mesh.resilience.breaker import BreakerPolicy, CircuitBreaker
from mesh.resilience.fallback import FallbackStats


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def samples(registry: CollectorRegistry, name: str, **labels: str) -> dict[str, float]:
    """Sample values of ``name`` whose labels include ``labels``, by their other labels."""
    found = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                rest = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())
                                if k not in labels)
                found[rest] = s.value
    return found


async def down() -> None:
    raise ConnectionError("503")


async def ok() -> str:
    return "ok"


async def test_breaker_state_transitions_and_rejections_follow_the_breaker() -> None:
    """Pass: a fresh breaker reads closed=1; after it trips, open=1 (the others 0),
    one transition to open and the refused call counted; after a probe closes it,
    closed=1 and one transition to each of half_open and closed."""
    registry, clock = CollectorRegistry(), Clock()
    MeshMetrics(registry)
    name = f"b{uuid.uuid4().hex[:8]}"
    breaker = CircuitBreaker(name, BreakerPolicy(failure_threshold=1, reset_timeout=5),
                             clock=clock)
    assert samples(registry, "mesh_breaker_state", breaker=name) == {
        "state=closed": 1, "state=half_open": 0, "state=open": 0}
    with contextlib.suppress(BreakerOpen):
        await breaker.call(down)
    with contextlib.suppress(BreakerOpen):
        await breaker.call(ok)  # refused
    assert samples(registry, "mesh_breaker_state", breaker=name) == {
        "state=closed": 0, "state=half_open": 0, "state=open": 1}
    assert samples(registry, "mesh_breaker_transitions_total", breaker=name) == {
        "to=closed": 0, "to=half_open": 0, "to=open": 1}
    assert samples(registry, "mesh_breaker_rejections_total", breaker=name) == {"": 1}
    clock.now += 5
    assert await breaker.call(ok) == "ok"
    assert samples(registry, "mesh_breaker_state", breaker=name)["state=closed"] == 1
    assert samples(registry, "mesh_breaker_transitions_total", breaker=name) == {
        "to=closed": 1, "to=half_open": 1, "to=open": 1}


async def test_two_instances_of_one_breaker_are_reported_once() -> None:
    """Pass: with two instances of one name (one open, one closed), one series per
    state: open=1 (the most open wins), closed=0; rejections are summed; a stopped
    instance is no longer reported."""
    registry, clock = CollectorRegistry(), Clock()
    MeshMetrics(registry)
    name = f"b{uuid.uuid4().hex[:8]}"
    tripped = CircuitBreaker(name, BreakerPolicy(failure_threshold=1), clock=clock)
    calm = CircuitBreaker(name, BreakerPolicy(failure_threshold=1), clock=clock)
    with contextlib.suppress(BreakerOpen):
        await tripped.call(down)
    for _ in range(2):
        with contextlib.suppress(BreakerOpen):
            await tripped.call(ok)
    assert samples(registry, "mesh_breaker_state", breaker=name) == {
        "state=closed": 0, "state=half_open": 0, "state=open": 1}
    assert samples(registry, "mesh_breaker_rejections_total", breaker=name) == {"": 2}
    await tripped.stop()
    assert samples(registry, "mesh_breaker_state", breaker=name)["state=closed"] == 1
    assert calm.state == "closed"


def test_fallbacks_are_counted_by_level_and_handler_and_exhausted_by_agent() -> None:
    """Pass: level 1 and 2 answers appear under their level and handler (the primary's
    answers do not), summed over two wrappers of the same agent; exhausted per agent."""
    registry = CollectorRegistry()
    MeshMetrics(registry)
    agent = f"a{uuid.uuid4().hex[:8]}"
    first = FallbackStats(agent, [agent, "cheap", "canned"])
    second = FallbackStats(agent, [agent, "cheap", "canned"])
    first.answered[:] = [7, 3, 1]
    second.answered[:] = [0, 2, 0]
    first.exhausted, second.exhausted = 1, 1
    assert samples(registry, "mesh_fallbacks_total", agent=agent) == {
        "handler=cheap,level=1": 5, "handler=canned,level=2": 1}
    assert samples(registry, "mesh_fallbacks_exhausted_total", agent=agent) == {"": 2}
