"""Prometheus metrics of the agents in a process, served on ``/metrics``.

Names are ``mesh_<noun>_<unit>`` with ``_total`` on counters; labels are a fixed set
with bounded values (agent, topic, outcome, error class, partition, breaker name,
breaker state, fallback level and handler: declared names, never an event or
correlation id). Counters of handled inputs come from the runtime's outcomes; retries,
dead letters, holds, in-flight work and consumer lag are read from the runners at
scrape time. The registry is passed in, so tests get a fresh one.

Components above the runtime keep their own metrics in the same registry, as *parts*
(:meth:`MeshMetrics.part`: one collector of each kind per registry, which the
component's module defines and the runtime never imports): breakers
(:class:`mesh.resilience.breaker.BreakerMetrics`: ``mesh_breaker_*``), fallback agents
(:class:`mesh.resilience.fallback.FallbackMetrics`: ``mesh_fallbacks_*``), LLM agents
(:class:`mesh.llm.LLMMetrics`: ``mesh_llm_*``) and delegation specialists
(:class:`mesh.patterns.delegation.specialist.StepMetrics`: ``mesh_step_*``). A
component reports to the metrics given to it (``metrics=``), else to those of the host
that runs it: :class:`mesh.runtime.host.Mesh` owns a ``MeshMetrics`` and makes it
:func:`host_metrics` for the tasks of its agents, so ``mesh run`` serves every
breaker, fallback and LLM agent of the process with no wiring, and two hosts in one
process each serve their own. Nothing is process-wide.

Example:
    >>> registry = CollectorRegistry()
    >>> metrics = MeshMetrics(registry)
    >>> metrics.watch(runner)  # doctest: +SKIP
    >>> port = metrics.serve(0, host="127.0.0.1")  # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from mesh.runtime.runner import AgentRunner, Outcome

logger = logging.getLogger(__name__)

T = TypeVar("T")
C = TypeVar("C", bound=Collector)

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class MeshMetrics:
    """The metrics of every runner it watches, and the parts that components keep in
    its registry (see the module docstring).

    Handled inputs are tallied in plain numbers per (agent, topic, outcome) and turned
    into the ``mesh_handler_*``, ``mesh_consumed_*`` and ``mesh_produced_*`` families
    when Prometheus scrapes (:class:`_OutcomeCollector`): prometheus_client's counters and
    histograms take a lock and several calls per update, five updates per input, which
    cost more than the rest of the metrics' work on the hot path together.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._tallies: dict[tuple[str, str, str], _Tally] = {}
        self._failures: dict[tuple[str, str, str], int] = {}
        self._runners: list[AgentRunner] = []
        self._parts: dict[Callable[[], Collector], Collector] = {}
        self._lock = threading.Lock()
        registry.register(_OutcomeCollector(self._tallies, self._failures))
        registry.register(_RunnerCollector(self._runners))

    def watch(self, runner: AgentRunner) -> None:
        """Count ``runner``'s outcomes and read its state at every scrape."""
        self._runners.append(runner)
        runner.observers.append(self.observe)

    def observe(self, outcome: Outcome) -> None:
        """Count one handled input (called in the event loop, for every input)."""
        key = (outcome.agent, outcome.topic, outcome.result)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = _Tally()
        tally.count += 1
        tally.buckets[bisect.bisect_left(DURATION_BUCKETS, outcome.duration_s)] += 1
        tally.duration += outcome.duration_s
        tally.bytes_in += outcome.bytes_in
        tally.produced += outcome.outputs
        tally.bytes_out += outcome.bytes_out
        if not outcome.ok:
            failed = (outcome.agent, outcome.topic, outcome.error_class or "unknown")
            self._failures[failed] = self._failures.get(failed, 0) + 1

    def part(self, kind: Callable[[], C]) -> C:
        """The one collector of ``kind`` in this registry, created and registered on
        first use: how a component keeps its metrics here without the runtime knowing it.

        Example:
            >>> metrics = MeshMetrics(CollectorRegistry())
            >>> metrics.part(Members) is metrics.part(Members)
            True
        """
        with self._lock:
            found = self._parts.get(kind)
            if found is None:
                found = self._parts[kind] = kind()
                self.registry.register(found)
        return found  # type: ignore[return-value]

    @contextlib.contextmanager
    def hosting(self) -> Iterator[MeshMetrics]:
        """Make these the :func:`host_metrics` of the calling task and of the tasks it
        starts, until the block ends (what :class:`~mesh.runtime.host.Mesh` does while
        it runs its agents).

        Example:
            >>> metrics = MeshMetrics(CollectorRegistry())
            >>> with metrics.hosting():
            ...     host_metrics() is metrics
            True
            >>> host_metrics() is None
            True
        """
        token = _HOST.set(self)
        try:
            yield self
        finally:
            _HOST.reset(token)

    def serve(self, port: int, *, host: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) in a daemon thread;
        returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(server.server_port)
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound


_HOST: ContextVar[MeshMetrics | None] = ContextVar("mesh_host_metrics", default=None)


def host_metrics() -> MeshMetrics | None:
    """The metrics of the host running the calling task (see :meth:`MeshMetrics.
    hosting`), or None outside a host: where a component created or started under a
    host reports when it was given no metrics of its own."""
    return _HOST.get()


class Members(Collector, Generic[T]):
    """The components a part reads at scrape time: a set safe to change while
    ``/metrics`` reads it from the HTTP server's thread, which keeps no component alive
    (one dropped by its owner drops out). A part subclasses it and adds ``collect``.

    Example:
        >>> class Box: pass
        >>> members, box = Members[Box](), Box()
        >>> members.add(box)
        >>> members.snapshot() == [box], list(members.collect())
        (True, [])
    """

    def __init__(self) -> None:
        self._members: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, member: T) -> None:
        with self._lock:
            self._members.add(member)

    def discard(self, member: T) -> None:
        with self._lock:
            self._members.discard(member)

    def snapshot(self) -> list[T]:
        """The members now, in no order."""
        with self._lock:
            return list(self._members)

    def collect(self) -> Iterator[Any]:
        """No families: a part yields its own."""
        return iter(())


class _Tally:
    """What the inputs of one (agent, topic, outcome) added up to; read at scrape time
    from another thread (plain numbers, so a scrape sees each one whole)."""

    __slots__ = ("buckets", "bytes_in", "bytes_out", "count", "duration", "produced")

    def __init__(self) -> None:
        self.count = self.bytes_in = self.produced = self.bytes_out = 0
        self.duration = 0.0
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # per bucket, the last: +Inf


class _OutcomeCollector(Collector):
    """The handled-input families, from the tallies of :meth:`MeshMetrics.observe`."""

    def __init__(self, tallies: dict[tuple[str, str, str], _Tally],
                 failures: dict[tuple[str, str, str], int]) -> None:
        self._tallies, self._failures = tallies, failures

    def collect(self) -> Iterator[Any]:
        invocations = CounterMetricFamily(
            "mesh_handler_invocations", "Inputs handled, by outcome as the audit names it "
            "(ok, retry: sent to a retry topic, dead_letter)",
            labels=["agent", "topic", "outcome"])
        failures = CounterMetricFamily("mesh_handler_failures", "Inputs that failed (then "
                                       "retried or dead-lettered), by error",
                                       labels=["agent", "topic", "error_class"])
        duration = HistogramMetricFamily("mesh_handler_duration_seconds", "Time from taking "
                                         "an input to its outputs being sent",
                                         labels=["agent", "topic"])
        bytes_in = CounterMetricFamily("mesh_consumed_bytes", "Bytes of inputs consumed",
                                       labels=["agent", "topic"])
        produced = CounterMetricFamily("mesh_produced_events", "Events produced by handlers "
                                       "(outputs and state writes)", labels=["agent"])
        bytes_out = CounterMetricFamily("mesh_produced_bytes", "Bytes of events produced by "
                                        "handlers (outputs and state writes)", labels=["agent"])
        by_topic: dict[tuple[str, str], list[Any]] = {}  # buckets..., duration, bytes in
        by_agent: dict[str, list[int]] = {}
        for (agent, topic, result), tally in sorted(dict(self._tallies).items()):
            buckets = list(tally.buckets)
            invocations.add_metric([agent, topic, result], sum(buckets))
            sums = by_topic.setdefault((agent, topic), [0] * (len(buckets) + 2))
            for i, n in enumerate(buckets):
                sums[i] += n
            sums[-2] += tally.duration
            sums[-1] += tally.bytes_in
            agent_sums = by_agent.setdefault(agent, [0, 0])
            agent_sums[0] += tally.produced
            agent_sums[1] += tally.bytes_out
        for (agent, topic), sums in by_topic.items():
            cumulative = list(itertools.accumulate(sums[:-2]))
            # How prometheus_client writes them (floatToGoString, the same for < 1e6).
            bounds = [*(repr(float(b)) for b in DURATION_BUCKETS), "+Inf"]
            duration.add_metric([agent, topic], list(zip(bounds, cumulative, strict=True)),
                                sums[-2])
            bytes_in.add_metric([agent, topic], sums[-1])
        for agent, (events, size) in by_agent.items():
            produced.add_metric([agent], events)
            bytes_out.add_metric([agent], size)
        for labels, count in sorted(dict(self._failures).items()):
            failures.add_metric(list(labels), count)
        yield from (invocations, failures, duration, bytes_in, produced, bytes_out)


class _RunnerCollector(Collector):
    """Reads the runners' own counters and gauges when Prometheus scrapes."""

    def __init__(self, runners: list[AgentRunner]) -> None:
        self._runners = runners

    def collect(self) -> Iterator[Any]:
        retries = CounterMetricFamily("mesh_retries", "Inputs sent to a retry topic or "
                                      "retried in place", labels=["agent"])
        dead = CounterMetricFamily("mesh_dead_letters", "Inputs sent to a dead-letter topic",
                                   labels=["agent"])
        holds = CounterMetricFamily("mesh_holds", "Times an input was held (a breaker open)",
                                    labels=["agent"])
        invalid_headers = CounterMetricFamily(
            "mesh_invalid_headers", "Malformed optional headers of inputs, ignored and "
            "replaced (the input was handled)", labels=["agent"])
        rebalances = CounterMetricFamily("mesh_revocations", "Partition revocations while "
                                         "running", labels=["agent"])
        in_flight = GaugeMetricFamily("mesh_in_flight_events", "Inputs taken, outputs not yet "
                                      "acknowledged", labels=["agent"])
        held = GaugeMetricFamily("mesh_held_state", "1 while the agent holds its partitions",
                                 labels=["agent"])
        lag = GaugeMetricFamily("mesh_consumer_lag_events", "Records behind the end of each "
                                "assigned partition", labels=["agent", "topic", "partition"])
        misplaced = CounterMetricFamily("mesh_misplaced_records", "Keyed inputs in another "
                                        "partition than murmur2 gives their key (a foreign "
                                        "producer's partitioner)", labels=["agent", "topic"])
        unreadable = CounterMetricFamily("mesh_unreadable_batches", "Fetched batches that could "
                                         "not be read (codec missing, corrupt): the agent "
                                         "stopped", labels=["agent", "topic"])
        for runner in self._runners:
            name = runner.agent.name
            retries.add_metric([name], runner.retried)
            invalid_headers.add_metric([name], runner.invalid_headers)
            dead.add_metric([name], runner.dead_lettered)
            holds.add_metric([name], runner.holds)
            rebalances.add_metric([name], runner.revocations)
            in_flight.add_metric([name], runner.in_flight())
            held.add_metric([name], 1 if runner.held else 0)
            for (topic, partition), behind in runner.lag().items():
                lag.add_metric([name, topic, str(partition)], behind)
            for topic, count in sorted(runner.placement.misplaced.items()):
                misplaced.add_metric([name, topic], count)
            for topic, count in sorted(runner.unreadable.items()):
                unreadable.add_metric([name, topic], count)
        yield from (retries, dead, holds, invalid_headers, rebalances, in_flight, held, lag)
        yield from (misplaced, unreadable)
