"""Prometheus metrics of the agents in a process, served on ``/metrics``.

Names are ``mesh_<noun>_<unit>`` with ``_total`` on counters; labels are a fixed set
with bounded values (agent, topic, outcome, error class, partition, breaker name,
breaker state, fallback level and handler: declared names, never an event or
correlation id). Counters of handled inputs come from the runtime's outcomes; retries,
dead letters, holds, in-flight work and consumer lag are read from the runners at
scrape time. The registry is passed in, so tests get a fresh one.

Breakers and fallbacks need no wiring: every :class:`~mesh.resilience.breaker.
CircuitBreaker` and every :func:`~mesh.resilience.fallback.with_fallbacks` agent of the
process is listed by its module and read at scrape time:

* ``mesh_breaker_state{breaker,state}``: a state set (Prometheus' idiom for an enum):
  1 on the breaker's current state (``closed``, ``half_open``, ``open``), 0 on the
  others. A breaker that cycles open -> half-open -> open is never closed, so alert on
  ``max_over_time(mesh_breaker_state{state="closed"}[10m]) == 0`` (ops/alerts.yml).
  Every replica reports the shared state: aggregate with ``max by (breaker)``;
* ``mesh_breaker_transitions_total{breaker,to}``: transitions this process applied,
  its own and other replicas' (every replica counts every transition: ``max by``, not
  ``sum``, across replicas), not the state restored at start;
* ``mesh_breaker_rejections_total{breaker}``: calls this process's breaker refused;
* ``mesh_fallbacks_total{agent,level,handler}``: inputs answered by fallback level
  ``level`` (1 = the first fallback; the primary's answers are not counted here);
* ``mesh_fallbacks_exhausted_total{agent}``: inputs every level failed (dead-lettered).

Delegation specialists' step costs (what handlers report with
:func:`mesh.patterns.delegation.specialist.record_usage`) are read the same way:
``mesh_step_tokens_total{agent}``, ``mesh_step_calls_total{agent}`` (model calls) and
``mesh_step_cost_total{agent}`` (in the specialists' currency).

Two breakers of one name in a process (tests, two replicas in one process) are reported
once: the most open state, the most transitions, the sum of rejections.

Example:
    >>> registry = CollectorRegistry()
    >>> metrics = MeshMetrics(registry)
    >>> metrics.watch(runner)  # doctest: +SKIP
    >>> port = metrics.serve(0, host="127.0.0.1")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mesh.resilience.breaker import STATES, TRANSITIONS, CircuitBreaker, live_breakers
from mesh.resilience.fallback import FallbackStats, fallback_stats
from mesh.runtime.runner import AgentRunner, Outcome

logger = logging.getLogger(__name__)

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class MeshMetrics:
    """The metrics of every runner it watches."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        labels = ("agent", "topic")
        self.invocations = Counter("mesh_handler_invocations_total",
                                   "Inputs handled, by outcome as the audit names it (ok, retry: "
                                   "sent to a retry topic, dead_letter)",
                                   (*labels, "outcome"), registry=registry)
        self.failures = Counter("mesh_handler_failures_total",
                                "Inputs that failed (then retried or dead-lettered), by error",
                                (*labels, "error_class"), registry=registry)
        self.duration = Histogram("mesh_handler_duration_seconds",
                                  "Time from taking an input to its outputs being sent",
                                  labels, buckets=DURATION_BUCKETS, registry=registry)
        self.bytes_in = Counter("mesh_consumed_bytes_total", "Bytes of inputs consumed",
                                labels, registry=registry)
        self.bytes_out = Counter("mesh_produced_bytes_total",
                                 "Bytes of events produced by handlers (outputs and state "
                                 "writes)", ("agent",), registry=registry)
        self.produced = Counter("mesh_produced_events_total",
                                "Events produced by handlers (outputs and state writes)",
                                ("agent",), registry=registry)
        self._runners: list[AgentRunner] = []
        registry.register(_RunnerCollector(self._runners))
        registry.register(_ResilienceCollector(live_breakers, fallback_stats))
        registry.register(_LLMCollector(_llm_stats))
        registry.register(_StepUsageCollector(_step_usage))

    def watch(self, runner: AgentRunner) -> None:
        """Count ``runner``'s outcomes and read its state at every scrape."""
        self._runners.append(runner)
        runner.observers.append(self.observe)

    def observe(self, outcome: Outcome) -> None:
        labels = (outcome.agent, outcome.topic)
        self.invocations.labels(*labels, outcome.result).inc()
        if not outcome.ok:
            self.failures.labels(*labels, outcome.error_class or "unknown").inc()
        self.duration.labels(*labels).observe(outcome.duration_s)
        self.bytes_in.labels(*labels).inc(outcome.bytes_in)
        self.produced.labels(outcome.agent).inc(outcome.outputs)
        self.bytes_out.labels(outcome.agent).inc(outcome.bytes_out)

    def serve(self, port: int, *, host: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) in a daemon thread;
        returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(server.server_port)
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound


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


class _ResilienceCollector(Collector):
    """Reads the process's breakers and fallback agents when Prometheus scrapes."""

    def __init__(self, breakers: Callable[[], list[CircuitBreaker]],
                 fallbacks: Callable[[], list[FallbackStats]]) -> None:
        self._breakers, self._fallbacks = breakers, fallbacks

    def collect(self) -> Iterator[Any]:
        state = GaugeMetricFamily("mesh_breaker_state", "1 on the state each breaker is in "
                                  "(closed, half_open, open), 0 on the others",
                                  labels=["breaker", "state"])
        transitions = CounterMetricFamily("mesh_breaker_transitions", "Breaker transitions "
                                          "applied (this replica's and others'), by state "
                                          "entered", labels=["breaker", "to"])
        rejections = CounterMetricFamily("mesh_breaker_rejections", "Calls refused by a "
                                         "breaker (open, or half-open probes taken)",
                                         labels=["breaker"])
        by_name: dict[str, list[CircuitBreaker]] = {}
        for breaker in self._breakers():
            by_name.setdefault(breaker.name, []).append(breaker)
        for name, group in sorted(by_name.items()):
            current = max((b.state for b in group), key=STATES.index)  # the most open
            for each in STATES:
                state.add_metric([name, each], 1 if each == current else 0)
                transitions.add_metric([name, each], max(
                    b.transitions.get(TRANSITIONS[each], 0) for b in group))
            rejections.add_metric([name], sum(b.rejected for b in group))
        yield from (state, transitions, rejections)
        yield from self._collect_fallbacks()

    def _collect_fallbacks(self) -> Iterator[Any]:
        used = CounterMetricFamily("mesh_fallbacks", "Inputs answered by a fallback level "
                                   "(1 = the first fallback)",
                                   labels=["agent", "level", "handler"])
        exhausted = CounterMetricFamily("mesh_fallbacks_exhausted", "Inputs every fallback "
                                        "level failed (then dead-lettered)", labels=["agent"])
        answered: dict[tuple[str, int, str], int] = {}
        failed: dict[str, int] = {}
        for stats in self._fallbacks():
            for level in range(1, len(stats.handlers)):
                key = (stats.agent, level, stats.handlers[level])
                answered[key] = answered.get(key, 0) + stats.answered[level]
            failed[stats.agent] = failed.get(stats.agent, 0) + stats.exhausted
        for (agent, level, handler), count in sorted(answered.items()):
            used.add_metric([agent, str(level), handler], count)
        for agent, count in sorted(failed.items()):
            exhausted.add_metric([agent], count)
        yield from (used, exhausted)


def _llm_stats() -> list[Any]:
    """The LLM agents' stats if mesh.llm is in use; never imports pydantic-ai."""
    module = sys.modules.get("mesh.llm")
    return list(module.llm_stats()) if module is not None else []


class _LLMCollector(Collector):
    """Reads the process's LLM agents' usage when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], list[Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        tokens = CounterMetricFamily("mesh_llm_tokens", "Tokens of LLM agents' model runs "
                                     "(failed runs included), by kind", labels=["agent", "kind"])
        requests = CounterMetricFamily("mesh_llm_requests", "Model requests of LLM agents "
                                       "that got a response", labels=["agent"])
        runs = CounterMetricFamily("mesh_llm_runs", "Model runs of LLM agents, by outcome "
                                   "(ok, failed)", labels=["agent", "outcome"])
        totals: dict[str, list[int]] = {}
        for stats in self._stats():
            total = totals.setdefault(stats.agent, [0, 0, 0, 0, 0])
            for i, count in enumerate((stats.input_tokens, stats.output_tokens,
                                       stats.requests, stats.runs, stats.failures)):
                total[i] += count
        for agent, (tokens_in, tokens_out, requested, ran, failed) in sorted(totals.items()):
            tokens.add_metric([agent, "input"], tokens_in)
            tokens.add_metric([agent, "output"], tokens_out)
            requests.add_metric([agent], requested)
            runs.add_metric([agent, "ok"], ran - failed)
            runs.add_metric([agent, "failed"], failed)
        yield from (tokens, requests, runs)


def _step_usage() -> list[Any]:
    """The delegation specialists' step usage if they are in use (imports nothing)."""
    module = sys.modules.get("mesh.patterns.delegation.specialist")
    return list(module.step_usage()) if module is not None else []


class _StepUsageCollector(Collector):
    """Reads what the process's specialists' steps reported they cost, at scrape time."""

    def __init__(self, stats: Callable[[], list[Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        families = [CounterMetricFamily(f"mesh_step_{what}", help_text, labels=["agent"])
                    for what, help_text in (
                        ("tokens", "Tokens delegated steps reported (record_usage)"),
                        ("calls", "Model calls delegated steps reported (record_usage)"),
                        ("cost", "Cost delegated steps reported (record_usage)"))]
        totals: dict[str, list[float]] = {}
        for stats in self._stats():
            total = totals.setdefault(stats.agent, [0, 0, 0.0])
            for i, value in enumerate((stats.tokens, stats.calls, stats.cost)):
                total[i] += value
        for agent, values in sorted(totals.items()):
            for family, value in zip(families, values, strict=True):
                family.add_metric([agent], value)
        yield from families
