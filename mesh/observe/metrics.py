"""Prometheus metrics of the agents in a process, served on ``/metrics``.

Names are ``mesh_<noun>_<unit>`` with ``_total`` on counters; labels are a fixed set
with bounded values (agent, topic, outcome, error class, partition: never an event or
correlation id). Counters of handled inputs come from the runtime's outcomes; retries,
dead letters, holds, in-flight work and consumer lag are read from the runners at
scrape time. The registry is passed in, so tests get a fresh one.

Example:
    >>> registry = CollectorRegistry()
    >>> metrics = MeshMetrics(registry)
    >>> metrics.watch(runner)  # doctest: +SKIP
    >>> port = metrics.serve(0, host="127.0.0.1")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mesh.runtime import AgentRunner, Outcome

logger = logging.getLogger(__name__)

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class MeshMetrics:
    """The metrics of every runner it watches."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        labels = ("agent", "topic")
        self.invocations = Counter("mesh_handler_invocations_total",
                                   "Inputs handled, by outcome (success or failure)",
                                   (*labels, "outcome"), registry=registry)
        self.failures = Counter("mesh_handler_failures_total",
                                "Inputs that failed (then retried or dead-lettered), by error",
                                (*labels, "error_class"), registry=registry)
        self.duration = Histogram("mesh_handler_duration_seconds",
                                  "Time from taking an input to its outputs being sent",
                                  labels, buckets=DURATION_BUCKETS, registry=registry)
        self.bytes_in = Counter("mesh_consumed_bytes_total", "Bytes of inputs consumed",
                                labels, registry=registry)
        self.produced = Counter("mesh_produced_events_total",
                                "Events produced by handlers (outputs and state writes)",
                                ("agent",), registry=registry)
        self._runners: list[AgentRunner] = []
        registry.register(_RunnerCollector(self._runners))

    def watch(self, runner: AgentRunner) -> None:
        """Count ``runner``'s outcomes and read its state at every scrape."""
        self._runners.append(runner)
        runner.observers.append(self.observe)

    def observe(self, outcome: Outcome) -> None:
        labels = (outcome.agent, outcome.topic)
        self.invocations.labels(*labels, "success" if outcome.ok else "failure").inc()
        if not outcome.ok:
            self.failures.labels(*labels, outcome.error_class or "unknown").inc()
        self.duration.labels(*labels).observe(outcome.duration_s)
        self.bytes_in.labels(*labels).inc(outcome.bytes_in)
        self.produced.labels(outcome.agent).inc(outcome.outputs)

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
        rebalances = CounterMetricFamily("mesh_revocations", "Partition revocations while "
                                         "running", labels=["agent"])
        in_flight = GaugeMetricFamily("mesh_in_flight_events", "Inputs taken, outputs not yet "
                                      "acknowledged", labels=["agent"])
        held = GaugeMetricFamily("mesh_held_state", "1 while the agent holds its partitions",
                                 labels=["agent"])
        lag = GaugeMetricFamily("mesh_consumer_lag_events", "Records behind the end of each "
                                "assigned partition", labels=["agent", "topic", "partition"])
        for runner in self._runners:
            name = runner.agent.name
            retries.add_metric([name], runner.retried)
            dead.add_metric([name], runner.dead_lettered)
            holds.add_metric([name], runner.holds)
            rebalances.add_metric([name], runner.revocations)
            in_flight.add_metric([name], runner.in_flight())
            held.add_metric([name], 1 if runner.held else 0)
            for (topic, partition), behind in runner.lag().items():
                lag.add_metric([name, topic, str(partition)], behind)
        yield from (retries, dead, holds, rebalances, in_flight, held, lag)
