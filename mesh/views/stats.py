"""What ``mesh top`` shows, computed from audit events and scraped metrics (pure).

Two sources, joined by agent name:

* the audit topic (:mod:`mesh.runtime.audit`): an :class:`AuditWindow` keeps the
  ``consumed`` and ``produced`` events of the last ``window_s`` seconds (by the event's
  ``at_ms``, when handling started) and gives per agent the rate in and out, the
  outcomes (``ok``, ``retry``, ``dead_letter``), the success rate, mean and p50/p99 handling time,
  the distinct replicas (``details["replica"]`` when the publisher sets it) and the last
  error; it also keeps the last failures for the errors panel;
* ``/metrics`` of agent processes (:mod:`mesh.runtime.metrics`): a :class:`Scrape` per
  target, from which :func:`gauges_by_agent` sums consumer lag and in-flight inputs and
  counts holding processes, and :func:`breakers_of` reads breaker states.

Nothing here does I/O or reads a clock: the caller passes ``now_ms``, so every number
is unit-testable.

Example:
    >>> window = AuditWindow(60, origin_ms=0)
    >>> window.add(AuditEvent(kind="consumed", agent="writer", at_ms=1_000,
    ...                       outcome="ok", duration_ms=12.0))
    >>> [(s.agent, s.consumed, s.success_rate) for s in window.stats(now_ms=2_000)]
    [('writer', 1, 1.0)]
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from mesh.runtime.audit import (
    CONSUMED,
    DEAD_LETTER,
    OK,
    PRODUCED,
    RETRY,
    AuditEvent,
    expand,
)

REPLICA = "replica"  # details key naming the process that published an audit event
FINISHED = (OK, RETRY, DEAD_LETTER)  # outcomes the success rate is taken over
_OPENNESS = {"closed": 0, "half_open": 1, "open": 2}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of ``values``; None when empty.

    Example:
        >>> percentile(range(1, 101), 0.99)
        99
    """
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def matches(agent: str, patterns: Sequence[str]) -> bool:
    """Whether ``agent`` matches one of the glob ``patterns`` (all match when empty)."""
    return not patterns or any(fnmatchcase(agent, p) for p in patterns)


class _Handled(NamedTuple):
    at_ms: int
    duration_ms: float | None
    outcome: str
    replica: str | None


@dataclass(frozen=True, slots=True)
class AgentStats:
    """One agent over the window: counts are of audit events with ``at_ms`` in it."""

    agent: str
    consumed: int
    rate: float  # consumed per second
    produced: int
    produced_rate: float
    ok: int
    retries: int
    dead_letters: int
    success_rate: float | None  # ok / (ok + retry + dead_letter); None: nothing finished
    avg_ms: float | None  # the mean handling time (the seed's dashboard shows it)
    p50_ms: float | None
    p99_ms: float | None
    replicas: int  # distinct details["replica"]; 0 when the publishers do not say
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Failure:
    """A consumed input whose outcome was not ok, for the errors panel."""

    at_ms: int
    agent: str
    outcome: str
    where: str  # topic[partition]@offset
    error: str
    attempt: int | None


@dataclass
class _Agent:
    handled: deque[_Handled] = field(default_factory=deque)
    produced: deque[int] = field(default_factory=deque)
    last_error: tuple[int, str] | None = None  # (at_ms, error) of the newest failure


class AuditWindow:
    """Audit events of the last ``window_s`` seconds, per agent.

    ``origin_ms`` is when the data starts (the dashboard read the topic from there):
    until a whole window has passed since, rates are over the time actually covered.
    Events arrive by partition, so slightly out of ``at_ms`` order; late ones older than
    the window are dropped on arrival. ``agents``: glob patterns to keep (all if empty).
    """

    def __init__(self, window_s: float, *, origin_ms: int, agents: Sequence[str] = (),
                 recent: int = 8) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s={window_s!r}: the window must be positive; "
                             "pass the number of seconds to aggregate over, e.g. 60.")
        self.window_ms = int(window_s * 1000)
        self.origin_ms = origin_ms
        self.patterns = tuple(agents)
        self.added = 0
        self._agents: dict[str, _Agent] = {}
        self._recent = recent
        self._failures: list[Failure] = []  # the newest ``recent`` by at_ms, newest first
        self._newest_ms = origin_ms

    def add(self, event: AuditEvent) -> None:
        """Count ``event`` (other kinds than consumed/produced are ignored)."""
        if event.outputs:  # a consumed event listing its outputs: count each
            for one in expand(event):
                self.add(one)
            return
        if event.agent is None or event.kind not in (CONSUMED, PRODUCED):
            return
        if not matches(event.agent, self.patterns):
            return
        if event.at_ms < max(self.origin_ms, self._newest_ms - self.window_ms):
            return
        self._newest_ms = max(self._newest_ms, event.at_ms)
        self.added += 1
        agent = self._agents.setdefault(event.agent, _Agent())
        if event.kind == PRODUCED:
            agent.produced.append(event.at_ms)
            return
        outcome = event.outcome or "unknown"
        agent.handled.append(_Handled(event.at_ms, event.duration_ms, outcome,
                                      event.details.get(REPLICA)))
        if outcome != OK:
            error = f"{event.error_class or outcome}: {event.error or ''}".rstrip(": ")
            if agent.last_error is None or event.at_ms >= agent.last_error[0]:
                agent.last_error = (event.at_ms, error)
            self._failures.append(Failure(
                event.at_ms, event.agent, outcome,
                f"{event.topic}[{event.partition}]@{event.offset}", error, event.attempt))
            self._failures.sort(key=lambda f: f.at_ms, reverse=True)
            del self._failures[self._recent:]

    def expire(self, now_ms: int) -> None:
        """Forget events older than the window (agents with none left go too)."""
        cutoff = now_ms - self.window_ms
        for name in list(self._agents):
            agent = self._agents[name]
            while agent.handled and agent.handled[0].at_ms < cutoff:
                agent.handled.popleft()
            while agent.produced and agent.produced[0] < cutoff:
                agent.produced.popleft()
            if not agent.handled and not agent.produced:
                del self._agents[name]

    def stats(self, now_ms: int) -> list[AgentStats]:
        """Every agent with events in the window, by name."""
        self.expire(now_ms)
        cutoff = now_ms - self.window_ms
        span_s = max((now_ms - max(cutoff, self.origin_ms)) / 1000, 1.0)
        return [self._stats_of(name, agent, cutoff, span_s)
                for name, agent in sorted(self._agents.items())]

    @staticmethod
    def _stats_of(name: str, agent: _Agent, cutoff: int, span_s: float) -> AgentStats:
        handled = [h for h in agent.handled if h.at_ms >= cutoff]
        produced = sum(1 for at in agent.produced if at >= cutoff)
        outcomes = [h.outcome for h in handled]
        ok, retries, dead = (outcomes.count(o) for o in FINISHED)
        durations = [h.duration_ms for h in handled if h.duration_ms is not None]
        finished = ok + retries + dead
        return AgentStats(
            agent=name, consumed=len(handled), rate=len(handled) / span_s,
            produced=produced, produced_rate=produced / span_s, ok=ok, retries=retries,
            dead_letters=dead, success_rate=ok / finished if finished else None,
            avg_ms=sum(durations) / len(durations) if durations else None,
            p50_ms=percentile(durations, 0.5), p99_ms=percentile(durations, 0.99),
            replicas=len({h.replica for h in handled if h.replica}),
            last_error=agent.last_error[1] if agent.last_error else None)

    def failures(self) -> list[Failure]:
        """The newest failures (by ``at_ms``, newest first), window or not."""
        return list(self._failures)


@dataclass(frozen=True, slots=True)
class Scrape:
    """One ``/metrics`` target at one refresh: its samples, or why it is down."""

    url: str
    samples: tuple[Sample, ...] = ()
    error: str | None = None

    @property
    def up(self) -> bool:
        return self.error is None

    @classmethod
    def parse(cls, url: str, text: str) -> Scrape:
        """The samples of a Prometheus text exposition (a parse error makes it down)."""
        try:
            samples = tuple(s for family in text_string_to_metric_families(text)
                            for s in family.samples)
        except ValueError as exc:
            return cls(url, error=f"unparsable metrics: {exc}")
        return cls(url, samples)

    def agents(self) -> set[str]:
        return {s.labels["agent"] for s in self.samples if "agent" in s.labels}


@dataclass(frozen=True, slots=True)
class AgentGauges:
    """One agent's process state summed over the targets serving it."""

    agent: str
    targets: int  # up processes serving the agent
    lag: float
    in_flight: float
    holding: int  # processes holding their partitions (a breaker open)
    fallbacks: float


def gauges_by_agent(scrapes: Iterable[Scrape], agents: Sequence[str] = ()
                    ) -> dict[str, AgentGauges]:
    """Lag and in-flight inputs summed over every up target (replicas own disjoint
    partitions), holding processes counted, fallbacks summed; ``agents``: glob filter."""
    acc: dict[str, dict[str, float]] = {}
    for scrape in scrapes:
        if not scrape.up:
            continue
        for name in scrape.agents():
            if matches(name, agents):
                acc.setdefault(name, dict.fromkeys(("targets", *_SUMMED.values()), 0.0))
                acc[name]["targets"] += 1
        for sample in scrape.samples:
            key, agent = _SUMMED.get(sample.name), sample.labels.get("agent")
            if key is None or agent not in acc:
                continue
            acc[agent][key] += (1.0 if sample.value else 0.0) if key == "holding" \
                else sample.value
    return {name: AgentGauges(name, int(v["targets"]), v["lag"], v["in_flight"],
                              int(v["holding"]), v["fallbacks"])
            for name, v in sorted(acc.items())}


_SUMMED = {"mesh_consumer_lag_events": "lag", "mesh_in_flight_events": "in_flight",
           "mesh_held_state": "holding", "mesh_fallbacks_total": "fallbacks"}


@dataclass(frozen=True, slots=True)
class BreakerView:
    """One breaker as the targets report it (the most open state any reports)."""

    name: str
    state: str
    transitions: float  # the highest count any one process reports
    rejections: float  # calls refused, summed over the processes
    targets: int


def breakers_of(scrapes: Iterable[Scrape]) -> list[BreakerView]:
    """Breakers from ``mesh_breaker_state{breaker,state}`` (a state set: 1 on the
    current state), ``mesh_breaker_transitions_total`` and
    ``mesh_breaker_rejections_total``. Every instance follows the shared breaker topic,
    so the transition count is the largest one, not a sum over replicas."""
    states: dict[str, str] = {}
    targets: dict[str, set[str]] = {}
    transitions: dict[tuple[str, str], float] = {}
    rejections: dict[str, float] = {}
    for scrape in (s for s in scrapes if s.up):
        for sample in scrape.samples:
            name = sample.labels.get("breaker")
            if name is None:
                continue
            if sample.name == "mesh_breaker_state":
                state = sample.labels.get("state") if sample.value else None
                if state is not None and _OPENNESS.get(state, 3) >= _OPENNESS.get(
                        states.get(name, "closed"), 0):
                    states[name] = state
                targets.setdefault(name, set()).add(scrape.url)
            elif sample.name == "mesh_breaker_transitions_total":
                key = (name, scrape.url)
                transitions[key] = transitions.get(key, 0.0) + sample.value
            elif sample.name == "mesh_breaker_rejections_total":
                rejections[name] = rejections.get(name, 0.0) + sample.value
    return [BreakerView(name, states.get(name, "closed"),
                        max((v for (b, _), v in transitions.items() if b == name), default=0),
                        rejections.get(name, 0.0), len(targets[name]))
            for name in sorted(targets)]

