"""`mesh top`'s numbers (audit window, scraped metrics) and what it draws, on made-up
audit events and metric texts."""

from __future__ import annotations

import contextlib
import re
import uuid

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console

from mesh.kafka.embedded import free_port
from mesh.errors import BreakerOpen
from mesh.runtime.audit import AuditEvent
from mesh.runtime.metrics import MeshMetrics
from mesh.views.stats import (
    AuditWindow,
    Scrape,
    breakers_of,
    gauges_by_agent,
    percentile,
)
from mesh.views.top import Dashboard, TopOptions, metrics_url, render, scrape
from mesh.resilience.breaker import BreakerPolicy, CircuitBreaker

MIN = 60_000


def consumed(agent: str, at_ms: int, outcome: str = "ok", duration_ms: float = 10.0,
             **extra: object) -> AuditEvent:
    return AuditEvent.model_validate({
        "kind": "consumed", "agent": agent, "at_ms": at_ms, "outcome": outcome,
        "duration_ms": duration_ms, "topic": "shop.orders", "partition": 1, "offset": at_ms,
        **extra})


def produced(agent: str, at_ms: int) -> AuditEvent:
    return AuditEvent(kind="produced", agent=agent, at_ms=at_ms, topic="shop.out")


def window_with_workload(origin_ms: int = 0) -> AuditWindow:
    """writer: 30 inputs over the minute (27 ok, 2 retried, 1 dead-lettered), 10 outputs."""
    window = AuditWindow(60, origin_ms=origin_ms)
    outcomes = ["ok"] * 27 + ["retry"] * 2 + ["dead_letter"]
    for i, outcome in enumerate(outcomes):
        window.add(consumed("writer", origin_ms + i * 2_000, outcome, duration_ms=i + 1,
                            error_class=None if outcome == "ok" else "ValueError",
                            error=None if outcome == "ok" else f"bad input {i}"))
    for i in range(10):
        window.add(produced("writer", origin_ms + i * 5_000))
    return window


def test_rates_outcomes_success_rate_and_percentiles_over_the_window() -> None:
    """Pass: 30 inputs in 60 s are 0.5/s, 10 outputs 0.167/s, success 27/30, 2 retries,
    1 dead letter, p50/p99 of handling times 1..30 ms are 15 and 30 ms, the last error
    is the dead letter's."""
    [stats] = window_with_workload().stats(now_ms=MIN)
    assert (stats.agent, stats.consumed, stats.produced) == ("writer", 30, 10)
    assert stats.rate == pytest.approx(0.5)
    assert stats.produced_rate == pytest.approx(10 / 60)
    assert (stats.ok, stats.retries, stats.dead_letters) == (27, 2, 1)
    assert stats.success_rate == pytest.approx(0.9)
    assert (stats.p50_ms, stats.p99_ms) == (15, 30)
    assert stats.avg_ms == pytest.approx(15.5)  # the mean of 1..30 ms
    assert stats.last_error == "ValueError: bad input 29"
    assert stats.replicas == 0  # the events do not name a replica


def test_percentile_is_nearest_rank() -> None:
    assert percentile(list(range(1, 101)), 0.5) == 50
    assert percentile(list(range(1, 101)), 0.99) == 99
    assert percentile([7.5], 0.99) == 7.5
    assert percentile([], 0.5) is None


def test_events_older_than_the_window_expire_and_idle_agents_leave() -> None:
    """Pass: 20 s later, the 10 inputs of the first 20 s are gone from the counts; two
    minutes later the agent has no row."""
    window = window_with_workload()
    [later] = window.stats(now_ms=MIN + 20_000)
    assert later.consumed == 20
    assert later.rate == pytest.approx(20 / 60)
    assert window.stats(now_ms=3 * MIN) == []


def test_before_a_full_window_the_rate_is_over_the_time_covered() -> None:
    """Pass: reading started 10 s ago and 10 inputs came: 1/s, not 10/60."""
    now = 1_000_000
    window = AuditWindow(60, origin_ms=now - 10_000)
    for i in range(10):
        window.add(consumed("fast", now - 10_000 + i * 1_000))
    [stats] = window.stats(now_ms=now)
    assert stats.rate == pytest.approx(1.0)


def test_events_before_the_origin_and_other_kinds_are_not_counted() -> None:
    window = AuditWindow(60, origin_ms=10_000)
    window.add(consumed("a", 9_999))
    window.add(AuditEvent(kind="dlq_replayed", agent="a", at_ms=20_000))
    window.add(AuditEvent(kind="consumed", at_ms=20_000, outcome="ok"))  # no agent
    assert window.stats(now_ms=30_000) == []
    assert window.added == 0


def test_agent_globs_filter_the_rows() -> None:
    window = AuditWindow(60, origin_ms=0, agents=["shop-*"])
    for agent in ("shop-writer", "shop-reader", "billing"):
        window.add(consumed(agent, 1_000))
    assert [s.agent for s in window.stats(now_ms=2_000)] == ["shop-reader", "shop-writer"]


def test_replicas_are_the_distinct_replica_ids_in_the_window() -> None:
    window = AuditWindow(60, origin_ms=0)
    for i, replica in enumerate(["h1:10", "h1:11", "h2:10", "h1:10"]):
        window.add(consumed("w", 1_000 + i, details={"replica": replica}))
    [stats] = window.stats(now_ms=2_000)
    assert stats.replicas == 3


def test_failures_are_listed_newest_first_with_where_and_what() -> None:
    window = AuditWindow(60, origin_ms=0, recent=2)
    window.add(consumed("w", 1_000, "retry", error_class="TimeoutError", error="slow",
                        attempt=1))
    window.add(consumed("w", 2_000, "dead_letter", error_class="ValueError", error="bad",
                        attempt=3))
    window.add(consumed("w", 3_000, "dead_letter", error_class="DecodeError", error="junk"))
    failures = window.failures()
    assert [(f.at_ms, f.outcome, f.error) for f in failures] == [
        (3_000, "dead_letter", "DecodeError: junk"), (2_000, "dead_letter", "ValueError: bad")]
    assert failures[1].where == "shop.orders[1]@2000"
    assert failures[1].attempt == 3


def test_the_last_error_and_recent_failures_go_by_time_not_by_arrival() -> None:
    """Pass: audit events arrive by partition, out of time order; the newest failure by
    ``at_ms`` is the last error, and the failures panel keeps the newest ones."""
    window = AuditWindow(60, origin_ms=0, recent=2)
    for at, error in ((3_000, "newest"), (1_000, "oldest"), (2_000, "middle")):
        window.add(consumed("w", at, "retry", error_class="E", error=error))
    [stats] = window.stats(now_ms=4_000)
    assert stats.last_error == "E: newest"
    assert [f.error for f in window.failures()] == ["E: newest", "E: middle"]


# As mesh.runtime.metrics serves them (breakers: a state set, no agent label).
REPLICA_1 = """\
# TYPE mesh_consumer_lag_events gauge
mesh_consumer_lag_events{agent="writer",topic="shop.orders",partition="0"} 5.0
mesh_consumer_lag_events{agent="writer",topic="shop.orders",partition="1"} 2.0
mesh_consumer_lag_events{agent="reader",topic="shop.out",partition="0"} 0.0
# TYPE mesh_in_flight_events gauge
mesh_in_flight_events{agent="writer"} 3.0
mesh_in_flight_events{agent="reader"} 0.0
# TYPE mesh_held_state gauge
mesh_held_state{agent="writer"} 1.0
mesh_held_state{agent="reader"} 0.0
# TYPE mesh_breaker_state gauge
mesh_breaker_state{breaker="llm",state="closed"} 0.0
mesh_breaker_state{breaker="llm",state="half_open"} 0.0
mesh_breaker_state{breaker="llm",state="open"} 1.0
mesh_breaker_state{breaker="search",state="closed"} 1.0
mesh_breaker_state{breaker="search",state="half_open"} 0.0
mesh_breaker_state{breaker="search",state="open"} 0.0
# TYPE mesh_breaker_transitions counter
mesh_breaker_transitions_total{breaker="llm",to="open"} 2.0
mesh_breaker_transitions_total{breaker="llm",to="half_open"} 1.0
# TYPE mesh_breaker_rejections counter
mesh_breaker_rejections_total{breaker="llm"} 7.0
# TYPE mesh_fallbacks counter
mesh_fallbacks_total{agent="writer",level="1",handler="cheap"} 3.0
mesh_fallbacks_total{agent="writer",level="2",handler="canned"} 1.0
mesh_fallbacks_created{agent="writer",level="1",handler="cheap"} 1.7e9
"""

REPLICA_2 = """\
# TYPE mesh_consumer_lag_events gauge
mesh_consumer_lag_events{agent="writer",topic="shop.orders",partition="2"} 1.0
# TYPE mesh_in_flight_events gauge
mesh_in_flight_events{agent="writer"} 1.0
# TYPE mesh_held_state gauge
mesh_held_state{agent="writer"} 0.0
# TYPE mesh_breaker_state gauge
mesh_breaker_state{breaker="llm",state="closed"} 0.0
mesh_breaker_state{breaker="llm",state="half_open"} 1.0
mesh_breaker_state{breaker="llm",state="open"} 0.0
# TYPE mesh_breaker_transitions counter
mesh_breaker_transitions_total{breaker="llm",to="open"} 1.0
# TYPE mesh_breaker_rejections counter
mesh_breaker_rejections_total{breaker="llm"} 2.0
"""


def scrapes() -> list[Scrape]:
    return [Scrape.parse("http://127.0.0.1:1/metrics", REPLICA_1),
            Scrape.parse("http://127.0.0.1:2/metrics", REPLICA_2),
            Scrape("http://127.0.0.1:3/metrics", error="URLError: connection refused")]


def test_lag_and_in_flight_sum_over_replicas_and_holding_ones_are_counted() -> None:
    gauges = gauges_by_agent(scrapes())
    writer, reader = gauges["writer"], gauges["reader"]
    assert (writer.targets, writer.lag, writer.in_flight, writer.holding) == (2, 8, 4, 1)
    assert writer.fallbacks == 4  # the _created sample is not a count
    assert (reader.targets, reader.lag, reader.in_flight, reader.holding) == (1, 0, 0, 0)
    assert list(gauges_by_agent(scrapes(), ["read*"])) == ["reader"]


def test_breakers_show_the_most_open_state_any_target_reports() -> None:
    """Pass: llm is open on one replica and half-open on the other: open; its
    transitions are the largest count of one process (3), not a sum (4); rejections are
    summed (each process refuses its own calls)."""
    llm, search = breakers_of(scrapes())
    assert (llm.name, llm.state, llm.transitions, llm.rejections, llm.targets) == (
        "llm", "open", 3, 9, 2)
    assert (search.name, search.state, search.transitions, search.targets) == (
        "search", "closed", 0, 1)


async def test_a_tripped_breaker_reads_open_from_the_real_exposition() -> None:
    """Pass: the text MeshMetrics serves for a local breaker that tripped and refused a
    call parses to state open, 1 transition, 1 rejection."""
    registry = CollectorRegistry()
    name = f"b{uuid.uuid4().hex[:8]}"
    breaker = CircuitBreaker(name, BreakerPolicy(failure_threshold=1, reset_timeout=60),
                             metrics=MeshMetrics(registry))

    async def down() -> None:
        raise ConnectionError("503")

    for _ in range(2):  # the first call trips it, the second is refused
        with contextlib.suppress(ConnectionError, BreakerOpen):
            await breaker.call(down)
    text = generate_latest(registry).decode()
    [view] = [b for b in breakers_of([Scrape.parse("u", text)]) if b.name == name]
    assert (view.state, view.transitions, view.rejections, view.targets) == ("open", 1, 1, 1)


def test_a_target_that_does_not_answer_or_serves_garbage_is_down() -> None:
    down = scrape(f"http://127.0.0.1:{free_port()}/metrics", timeout=5)
    assert not down.up
    assert "refused" in (down.error or "").lower()
    garbage = Scrape.parse("x", "mesh_in_flight_events{agent=oops 1\n")
    assert not garbage.up and "unparsable" in (garbage.error or "")
    assert metrics_url("127.0.0.1:9101") == "http://127.0.0.1:9101/metrics"


def rendered(dash: Dashboard, now_ms: int) -> str:
    console = Console(record=True, width=220, color_system=None)
    console.print(render(dash.frame(now_ms)))
    return console.export_text()


def row_of(text: str, agent: str) -> list[str]:
    [line] = [ln for ln in text.splitlines() if ln.startswith(f"│ {agent} ")]
    return [cell.strip() for cell in line.strip("│").split("│")]


def test_the_dashboard_draws_a_row_per_agent_with_audit_and_metrics_numbers() -> None:
    """Pass: writer's row has 2 replicas, 0.5/s in, 0.2/s out, 30 handled, 90.0 % ok,
    average 15.5, p50 15.0 and p99 30.0 ms, 2 retries, 1 dead, lag 8, 4 in flight, held
    and its last error; the open breaker, the down target and the dead letter are on
    screen too."""
    dash = Dashboard(window_with_workload())
    dash.update(scrapes())
    text = rendered(dash, MIN)
    assert row_of(text, "writer") == [
        "writer", "2", "0.5", "0.2", "30", "90.0", "15.5", "15.0", "30.0", "2", "1", "8", "4",
        "held", "ValueError: bad input 29"]
    assert row_of(text, "reader") == [
        "reader", "1", "-", "-", "-", "-", "-", "-", "-", "-", "-", "0", "0", "up", ""]
    assert "down: http://127.0.0.1:3/metrics (URLError: connection refused)" in text
    assert "metrics: 2/3 targets up" in text
    assert re.search(r"│ +llm +open +3 +9 +2 +│", text)
    assert re.search(r"│ +search +closed +0 +0 +1 +│", text)
    assert "fallbacks: writer 4" in text
    assert "dead_letter  shop.orders[1]@58000" in text


def test_agents_of_a_target_that_went_down_show_as_down() -> None:
    dash = Dashboard(AuditWindow(60, origin_ms=0))
    dash.update(scrapes()[:2])
    dash.update([scrapes()[0], Scrape("http://127.0.0.1:2/metrics", error="refused")])
    dash.update([Scrape("http://127.0.0.1:1/metrics", error="refused"),
                 Scrape("http://127.0.0.1:2/metrics", error="refused")])
    text = rendered(dash, MIN)
    assert row_of(text, "writer")[-2] == "down"
    assert row_of(text, "reader")[-2] == "down"


def test_an_empty_mesh_says_so() -> None:
    text = rendered(Dashboard(AuditWindow(60, origin_ms=0)), MIN)
    assert "no agents" in text
    assert "no breaker metrics" in text


@pytest.mark.parametrize(("field", "value"), [
    ("interval_s", 0), ("window_s", -1), ("since_s", -5), ("frames", 0), ("backlog", -1)])
def test_options_refuse_values_that_make_no_sense(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        TopOptions(**{field: value})
