"""The handled-input metrics: tallied per outcome, exported as Prometheus families at
scrape time (the names, labels and values mesh_handler_*, mesh_consumed_* and
mesh_produced_* always had)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from mesh.runtime.metrics import DURATION_BUCKETS, MeshMetrics
from mesh.runtime.process import Outcome


def outcome(agent: str, topic: str, *, ok: bool = True, result: str = "ok",
            duration_s: float = 0.002, error_class: str | None = None) -> Outcome:
    return Outcome(agent, topic, 0, 1, "e", "c", ok=ok, attempts=1, duration_s=duration_s,
                   outputs=2, error_class=error_class, bytes_in=100, bytes_out=30,
                   result=result)


def test_outcomes_are_counted_by_agent_topic_and_outcome() -> None:
    registry = CollectorRegistry()
    metrics = MeshMetrics(registry)
    metrics.observe(outcome("a", "in"))
    metrics.observe(outcome("a", "in", duration_s=0.5))
    metrics.observe(outcome("a", "in", ok=False, result="retry", error_class="Timeout",
                            duration_s=100.0))
    metrics.observe(outcome("a", "other", ok=False, result="dead_letter"))
    metrics.observe(outcome("b", "in"))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("mesh_handler_invocations_total", agent="a", topic="in", outcome="ok") == 2
    assert value("mesh_handler_invocations_total", agent="a", topic="in",
                 outcome="retry") == 1
    assert value("mesh_handler_failures_total", agent="a", topic="in",
                 error_class="Timeout") == 1
    assert value("mesh_handler_failures_total", agent="a", topic="other",
                 error_class="unknown") == 1
    assert value("mesh_consumed_bytes_total", agent="a", topic="in") == 300
    assert value("mesh_produced_events_total", agent="a") == 8
    assert value("mesh_produced_bytes_total", agent="b") == 30
    assert value("mesh_handler_duration_seconds_count", agent="a", topic="in") == 3
    assert value("mesh_handler_duration_seconds_sum", agent="a", topic="in") == 100.502
    assert value("mesh_handler_duration_seconds_bucket", agent="a", topic="in",
                 le="0.001") == 0
    assert value("mesh_handler_duration_seconds_bucket", agent="a", topic="in",
                 le="0.005") == 1
    assert value("mesh_handler_duration_seconds_bucket", agent="a", topic="in",
                 le="0.5") == 2  # le: a duration on a bound is in that bucket
    assert value("mesh_handler_duration_seconds_bucket", agent="a", topic="in",
                 le=str(float(DURATION_BUCKETS[-1]))) == 2
    assert value("mesh_handler_duration_seconds_bucket", agent="a", topic="in",
                 le="+Inf") == 3
