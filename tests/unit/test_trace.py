"""The trace tree built from made-up audit histories, and how it is rendered."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console

from mesh.runtime.audit import AuditEvent
from mesh.views.trace import Trace, build_trace
from mesh.views.trace_tree import render_trace

CID = "wf-1"


def produced(event_id: str, topic: str, agent: str, at: int, *, cause: str | None = None,
             cid: str = CID, size: int = 100) -> AuditEvent:
    return AuditEvent(kind="produced", at_ms=at, agent=agent, topic=topic, event_id=event_id,
                      correlation_id=cid, causation_id=cause, size=size, attempt=1)


def consumed(event_id: str, topic: str, agent: str, at: int, *, outcome: str = "ok",
             duration: float = 10.0, attempt: int = 1, cause: str | None = None,
             error: str | None = None, offset: int = 0, cid: str = CID) -> AuditEvent:
    return AuditEvent(kind="consumed", at_ms=at, agent=agent, topic=topic, partition=0,
                      offset=offset, event_id=event_id, correlation_id=cid,
                      causation_id=cause, outcome=outcome, duration_ms=duration,
                      attempt=attempt, error_class="ValueError" if error else None,
                      error=error)


def shape(trace: Trace) -> list[Any]:
    """The tree as nested (event id, producer, [(agent, [outcomes])], children)."""
    def node(n: Any) -> Any:
        return (n.event_id, n.producer,
                [(h.agent, [a.outcome for a in h.attempts]) for h in n.handlings],
                [node(c) for c in n.children])
    return [node(r) for r in trace.roots]


def rendered(trace: Trace) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(render_trace(trace))
    return console.export_text()


def chain() -> list[AuditEvent]:
    """emit -> in (e1) -> stage1 -> a (e2) -> stage2 -> b (e3), nobody consumes b."""
    return [
        produced("e1", "in", "emit", 1000),
        consumed("e1", "in", "stage1", 1005, duration=12.5),
        produced("e2", "a", "stage1", 1017, cause="e1"),
        consumed("e2", "a", "stage2", 1030, duration=4.0, cause="e1"),
        produced("e3", "b", "stage2", 1034, cause="e2"),
    ]


def test_a_chain_nests_each_output_under_the_event_that_caused_it() -> None:
    trace = build_trace(CID, reversed(chain()))  # audit order must not matter

    assert shape(trace) == [
        ("e1", "emit", [("stage1", ["ok"])], [
            ("e2", "stage1", [("stage2", ["ok"])], [
                ("e3", "stage2", [], [])])])]
    assert trace.start_ms == 1000 and trace.wall_ms == 34.0
    assert [n.topic for n in trace.walk()] == ["in", "a", "b"]
    assert trace.counts() == {"events": 3, "handlings": 2, "retries": 0, "dead_letters": 0,
                              "redeliveries": 0}


def test_events_of_other_correlation_ids_are_left_out() -> None:
    other = [produced("x1", "in", "emit", 900, cid="wf-2"),
             consumed("x1", "in", "stage1", 905, cid="wf-2")]

    trace = build_trace(CID, other + chain())

    assert {n.event_id for n in trace.walk()} == {"e1", "e2", "e3"}
    assert trace.events == len(chain()) and trace.start_ms == 1000


def test_no_audit_events_is_an_empty_trace() -> None:
    trace = build_trace("nowhere", chain())

    assert not trace.found and trace.roots == [] and trace.events == 0


def test_fan_out_to_two_agents_then_gather_under_the_input_that_completed_it() -> None:
    events = [
        produced("q", "questions", "emit", 0),
        consumed("q", "questions", "fan1", 2, duration=30),
        consumed("q", "questions", "fan2", 3, duration=50),
        produced("r1", "answers", "fan1", 32, cause="q"),
        produced("r2", "answers", "fan2", 53, cause="q"),
        consumed("r1", "answers", "gather", 40, duration=1, cause="q"),
        consumed("r2", "answers", "gather", 60, duration=2, cause="q"),
        produced("m", "merged", "gather", 62, cause="r2"),
    ]

    trace = build_trace(CID, events)

    assert shape(trace) == [
        ("q", "emit", [("fan1", ["ok"]), ("fan2", ["ok"])], [
            ("r1", "fan1", [("gather", ["ok"])], []),
            ("r2", "fan2", [("gather", ["ok"])], [("m", "gather", [], [])])])]
    assert trace.wall_ms == 62.0
    text = rendered(trace)
    # each result sits under the agent that produced it, the merge under the last result
    lines = text.splitlines()
    fan1 = next(i for i, line in enumerate(lines) if "→ fan1: ok 30.0 ms (+2 ms)" in line)
    assert "answers [evt r1] ← fan1 @ +32 ms" in lines[fan1 + 1]
    merged = next(line for line in lines if "merged [evt m] ← gather @ +62 ms" in line)
    assert merged.index("merged") > lines[fan1 + 1].index("answers")


def test_a_retry_then_success_is_one_handling_with_both_attempts() -> None:
    events = [
        produced("e1", "in", "emit", 0),
        consumed("e1", "in", "stage1", 5, outcome="retry", duration=2.0,
                 error="flaky downstream"),
        consumed("e1", "in.retry.1", "stage1", 510, attempt=2, duration=3.0),
        produced("e2", "a", "stage1", 513, cause="e1"),
    ]

    trace = build_trace(CID, events)

    [handling] = trace.node("e1").handlings
    assert [(a.attempt, a.outcome, a.delivery, a.topic) for a in handling.attempts] == [
        (1, "retry", "first", "in"), (2, "ok", "retry", "in.retry.1")]
    assert handling.outcome == "ok"
    assert trace.counts()["retries"] == 1
    assert [c.event_id for c in trace.node("e1").children] == ["e2"]
    lines = rendered(trace).splitlines()
    at = next(i for i, line in enumerate(lines) if "→ stage1: ok after 2 consumptions" in line)
    assert "(+5 ms … +510 ms)" in lines[at]
    assert "#1 retry 2.0 ms (+5 ms) ValueError: flaky downstream" in lines[at + 1]
    assert "#2 ok 3.0 ms (+510 ms) via in.retry.1" in lines[at + 2]
    assert "a [evt e2] ← stage1 @ +513 ms" in lines[at + 3]


def test_a_dead_letter_shows_its_outcome_and_error_and_stops_the_branch() -> None:
    events = [
        produced("e1", "in", "emit", 0),
        consumed("e1", "in", "stage1", 5, outcome="retry", error="boom 1"),
        consumed("e1", "in.retry.1", "stage1", 100, outcome="retry", attempt=2,
                 error="boom 2"),
        consumed("e1", "in.retry.2", "stage1", 300, outcome="dead_letter", attempt=3,
                 error="stage stage1 cannot handle poison item s1"),
    ]

    trace = build_trace(CID, events)

    [handling] = trace.node("e1").handlings
    assert handling.outcome == "dead_letter"
    assert handling.attempts[-1].error == "stage stage1 cannot handle poison item s1"
    assert trace.node("e1").children == []
    assert trace.counts()["dead_letters"] == 1 and trace.counts()["retries"] == 2
    text = rendered(trace)
    assert "2 retries, 1 dead letter" in text.splitlines()[0]
    assert "→ stage1: dead_letter after 3 consumptions" in text
    assert ("#3 dead_letter 10.0 ms (+300 ms) via in.retry.2 ValueError: stage stage1 "
            "cannot handle poison item s1") in text


def test_an_event_whose_cause_is_not_in_the_audit_is_a_root_saying_so() -> None:
    events = [  # e1 came from a system that does not audit, and its cause is unknown
        consumed("e1", "in", "stage1", 10, cause="upstream-7"),
        produced("e2", "a", "stage1", 20, cause="e1"),
    ]

    trace = build_trace(CID, events)

    [root] = trace.roots
    assert (root.event_id, root.producer, root.topic, root.at_ms) == ("e1", None, "in", 10)
    assert root.causation_id == "upstream-7" and not root.cause_in_audit
    assert [c.event_id for c in root.children] == ["e2"]
    text = rendered(trace)
    assert "in [evt e1] ← ? (its production is not in the audit) @ +0 ms" in text
    assert "(cause upstream… not in the audit)" in text


def test_two_roots_are_listed_in_time_order() -> None:
    events = [produced("late", "in", "emit", 50), produced("early", "in", "emit", 10)]

    assert [r.event_id for r in build_trace(CID, events).roots] == ["early", "late"]


def test_a_redelivery_after_a_crash_is_labelled_and_the_reproduced_output_counted() -> None:
    events = [  # stage1 handled e1, produced e2, crashed before committing: again
        produced("e1", "in", "emit", 0),
        consumed("e1", "in", "stage1", 5, offset=7),
        produced("e2", "a", "stage1", 15, cause="e1"),
        consumed("e1", "in", "stage1", 9000, offset=7),
        produced("e2", "a", "stage1", 9010, cause="e1"),
        consumed("e2", "a", "stage2", 9020, cause="e1"),
    ]

    trace = build_trace(CID, events)

    [handling] = trace.node("e1").handlings
    assert [a.delivery for a in handling.attempts] == ["first", "redelivery"]
    node = trace.node("e2")
    assert node.produced == 2 and node.at_ms == 15  # the first production
    assert [n.event_id for n in trace.walk()] == ["e1", "e2"]
    assert trace.counts()["redeliveries"] == 2
    text = rendered(trace)
    assert "ok 10.0 ms (+9000 ms) [redelivery]" in text
    assert "(produced 2 times: at-least-once redelivery)" in text


def test_a_consumption_after_a_dead_letter_replay_is_labelled_replay() -> None:
    events = [
        produced("e1", "in", "emit", 0),
        consumed("e1", "in", "stage1", 5, outcome="dead_letter", error="bad"),
        AuditEvent(kind="dlq_replayed", at_ms=500, agent="stage1", topic="in.dlq",
                   event_id="e1", correlation_id=CID, outcome="replayed",
                   details={"to": "in"}),
        consumed("e1", "in", "stage1", 600),
    ]

    trace = build_trace(CID, events)

    node = trace.node("e1")
    assert [a.delivery for a in node.handlings[0].attempts] == ["first", "replay"]
    assert [(n.kind, n.details) for n in node.notes] == [("dlq_replayed", {"to": "in"})]
    text = rendered(trace)
    assert "↺ dlq_replayed by stage1 (to=in) @ +500 ms" in text
    assert "ok 10.0 ms (+600 ms) [replay]" in text


def test_a_cycle_of_causes_is_cut_instead_of_looping() -> None:
    events = [produced("x", "t", "a", 10, cause="y"), produced("y", "t", "b", 20, cause="x")]

    trace = build_trace(CID, events)

    assert shape(trace) == [("x", "a", [], [("y", "b", [], [])])]
    assert not trace.roots[0].cause_in_audit


def test_json_has_the_tree_with_relative_times_and_survives_a_round_trip() -> None:
    trace = build_trace(CID, chain())

    data = json.loads(json.dumps(trace.to_dict()))

    assert data["correlation_id"] == CID and data["wall_ms"] == 34.0
    assert data["events"] == 3 and data["audit_events"] == 5
    [root] = data["roots"]
    assert (root["event_id"], root["topic"], root["producer"], root["rel_ms"]) == (
        "e1", "in", "emit", 0)
    [handling] = root["consumed_by"]
    assert handling["agent"] == "stage1" and handling["outcome"] == "ok"
    assert handling["attempts"][0]["rel_ms"] == 5
    assert handling["attempts"][0]["duration_ms"] == 12.5
    [child] = root["children"]
    assert (child["event_id"], child["producer"], child["causation_id"]) == (
        "e2", "stage1", "e1")
    assert child["children"][0]["event_id"] == "e3"


def test_the_rendered_tree_has_the_wall_time_on_top_and_the_chain_nested() -> None:
    lines = rendered(build_trace(CID, chain())).splitlines()

    assert lines[0].startswith(f"trace {CID}: 34.0 ms wall time, 3 event(s), 2 handling(s)")
    order = ["in [evt e1] ← emit @ +0 ms", "→ stage1: ok 12.5 ms (+5 ms)",
             "a [evt e2] ← stage1 @ +17 ms", "→ stage2: ok 4.0 ms (+30 ms)",
             "b [evt e3] ← stage2 @ +34 ms"]
    found = [next(i for i, line in enumerate(lines) if part in line) for part in order]
    assert found == sorted(found)
    indents = [lines[i].index(part[0]) for i, part in zip(found, order, strict=True)]
    assert indents == sorted(indents) and len(set(indents)) == len(indents)


def test_markup_in_names_and_errors_is_printed_as_is() -> None:
    events = [produced("e1", "in", "[bold]emit[/]", 0),
              consumed("e1", "in", "stage1", 1, outcome="dead_letter", error="[/b] broke")]

    text = rendered(build_trace(CID, events))

    assert "← [bold]emit[/]" in text and "ValueError: [/b] broke" in text


def test_a_single_consumption_at_a_later_attempt_shows_its_number() -> None:
    events = [produced("e1", "in", "emit", 0),  # retried in place: one audit, attempt 2
              consumed("e1", "in", "stage1", 5, attempt=2, duration=120.0)]

    trace = build_trace(CID, events)

    [attempt] = trace.node("e1").handlings[0].attempts
    assert (attempt.attempt, attempt.delivery, attempt.outcome) == (2, "retry", "ok")
    assert "→ stage1: #2 ok 120.0 ms (+5 ms)" in rendered(trace)
