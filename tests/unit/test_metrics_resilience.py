"""Breaker and fallback metrics, read at scrape time from the breakers and fallback
agents that report to a registry (no broker: local breakers and a hand-fed
FallbackStats), and how a component finds the registry: the one given, else its host's."""

from __future__ import annotations

import contextlib
import uuid

from prometheus_client import CollectorRegistry

from mesh import Agent, Topic
from mesh.errors import BreakerOpen
from mesh.resilience.breaker import BreakerMetrics, BreakerPolicy, CircuitBreaker
from mesh.resilience.fallback import FallbackMetrics, FallbackStats, with_fallbacks
from mesh.runtime.metrics import MeshMetrics
from tests.apps.stages import Item


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
    metrics = MeshMetrics(registry)
    name = f"b{uuid.uuid4().hex[:8]}"
    breaker = CircuitBreaker(name, BreakerPolicy(failure_threshold=1, reset_timeout=5),
                             clock=clock, metrics=metrics)
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
    metrics = MeshMetrics(registry)
    name = f"b{uuid.uuid4().hex[:8]}"
    tripped = CircuitBreaker(name, BreakerPolicy(failure_threshold=1), clock=clock,
                             metrics=metrics)
    calm = CircuitBreaker(name, BreakerPolicy(failure_threshold=1), clock=clock,
                          metrics=metrics)
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
    fallbacks = MeshMetrics(registry).part(FallbackMetrics)
    agent = f"a{uuid.uuid4().hex[:8]}"
    first = FallbackStats(agent, [agent, "cheap", "canned"])
    second = FallbackStats(agent, [agent, "cheap", "canned"])
    fallbacks.add(first)
    fallbacks.add(second)
    first.answered[:] = [7, 3, 1]
    second.answered[:] = [0, 2, 0]
    first.exhausted, second.exhausted = 1, 1
    assert samples(registry, "mesh_fallbacks_total", agent=agent) == {
        "handler=cheap,level=1": 5, "handler=canned,level=2": 1}
    assert samples(registry, "mesh_fallbacks_exhausted_total", agent=agent) == {"": 2}


async def test_a_breaker_reports_to_the_host_it_is_created_or_called_under_and_no_other(
) -> None:
    """Pass: a breaker created under host A's metrics is served by A only; one created
    outside any host is served by none until its first call under host B, then by B
    only; a fresh registry (no host, nothing given) serves no breaker at all."""
    host_a, host_b = MeshMetrics(CollectorRegistry()), MeshMetrics(CollectorRegistry())
    with host_a.hosting():
        under_a = CircuitBreaker(f"a{uuid.uuid4().hex[:8]}")
    outside = CircuitBreaker(f"o{uuid.uuid4().hex[:8]}")

    def served(metrics: MeshMetrics) -> set[str]:
        return {b.name for b in metrics.part(BreakerMetrics).snapshot()}

    assert (served(host_a), served(host_b)) == ({under_a.name}, set())
    with host_b.hosting():
        assert await outside.call(ok) == "ok"
    assert (served(host_a), served(host_b)) == ({under_a.name}, {outside.name})
    assert samples(MeshMetrics(CollectorRegistry()).registry, "mesh_breaker_state") == {}


async def test_a_fallback_agent_reports_to_the_host_that_starts_it() -> None:
    """Pass: with_fallbacks is a Fallbacks agent; before its start no registry serves
    its stats; started under a host, that host serves its answers by level."""
    topic = Topic(f"fbm.{uuid.uuid4().hex[:8]}", Item, key="key")
    wrapped = with_fallbacks(Agent("fbm", consumes=topic, handler=None), lambda *_: ok())
    host = MeshMetrics(CollectorRegistry())
    assert host.part(FallbackMetrics).snapshot() == []
    with host.hosting():
        await wrapped.on_start(None)
    wrapped.stats.answered[1] = 3
    assert samples(host.registry, "mesh_fallbacks_total", agent="fbm") == {
        "handler=<lambda>,level=1": 3}

