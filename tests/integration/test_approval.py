"""Budgets and human approval of delegated workflows on a real broker: a coordinator,
four specialists, and `mesh approve` / `mesh reject` as subprocesses."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from mesh import Codec, Mesh, MeshSettings, apply_topics
from mesh.patterns.delegation.budget import Budget, BudgetExceeded, Usage
from mesh.patterns.delegation.coordinator import DelegationTopics, WorkflowEvent
from mesh.kafka.reader import TopicReader
from tests.apps.delegation import Job, build, outcomes_of, request_records
from tests.conftest import BrokerUnderTest
from tests.integration.test_cli import Cli
from tests.support import inject, read_all

APP = "tests.apps.delegation"


async def wait_for_events(settings: MeshSettings, codec: Codec, topics: DelegationTopics,
                          done: Callable[[list[WorkflowEvent]], bool],
                          timeout: float = 60.0) -> list[WorkflowEvent]:
    """Follow the events topic until ``done(events so far)``."""
    events: list[WorkflowEvent] = []
    deadline = time.monotonic() + timeout
    async with TopicReader(settings.kafka, [topics.events.name]) as reader:
        async for record in reader.follow(idle_timeout=timeout):
            event = await codec.decode(topics.events, record.value or b"")
            assert isinstance(event, WorkflowEvent)
            events.append(event)
            if done(events) or time.monotonic() > deadline:
                break
    seen = [(e.workflow_id, e.kind) for e in events]
    assert done(events), f"not seen after {timeout:.0f} s: {seen}"
    return events


async def decoded(settings: MeshSettings, codec: Codec, topic: Any) -> list[Any]:
    records = sorted(await read_all(settings, [topic.name]), key=lambda r: (r.partition, r.offset))
    return [await codec.decode(topic, r.value or b"") for r in records]


async def dispatched(settings: MeshSettings, codec: Codec, topics: DelegationTopics
                     ) -> list[tuple[str, str]]:
    found = []
    for topic in topics.tasks.values():
        found += [(t.workflow_id, t.step_id) for t in await decoded(settings, codec, topic)]
    return sorted(found)


def asked(workflows: Sequence[str]) -> Callable[[list[WorkflowEvent]], bool]:
    def check(events: list[WorkflowEvent]) -> bool:
        return set(workflows) <= {e.workflow_id for e in events if e.kind == "ApprovalRequested"}
    return check


async def test_a_budget_below_what_the_workflow_needs_stops_it_with_the_budget_event(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: 100 tokens a step. A request allowing 250 tokens stops after analyse (300
    used): BudgetExceeded then WorkflowFailed, a failed outcome saying tokens 300 of 250
    with the three partial results; fact-check and write are never dispatched. A request
    allowing 1 s of wall time whose steps take 4 s is stopped by the coordinator's timer
    while they run (no results). A request within its budget completes and reports
    500 tokens in 5 calls. Every event of the stopped workflows carries the request's
    correlation id, the timer's too."""
    app = build(prefix)
    settings, codec = broker.settings(), Codec()
    await apply_topics(settings.kafka, app.topics.all())
    jobs = [Job(workflow_id="tokens", tokens=100, budget=Budget(tokens=250)),
            Job(workflow_id="slow", sleep_ms=4000, budget=Budget(wall_time_s=1)),
            Job(workflow_id="fine", tokens=100, budget=Budget(tokens=1000, calls=5))]
    async with Mesh(settings, [app.coordinator, *app.specialists]) as mesh:
        await mesh.wait_assigned()
        records, correlations = request_records(codec, app.topics, jobs)  # wall time from now
        await inject(settings, records)
        outcomes = await outcomes_of(settings, codec, app.topics, set(correlations), timeout=90)
    tokens, slow, fine = outcomes["tokens"], outcomes["slow"], outcomes["fine"]
    assert not tokens.success
    assert tokens.budget_exceeded == BudgetExceeded(limit="tokens", used=300, allowed=250)
    assert tokens.error == "Budget exceeded: tokens budget exceeded: 300 used of 250 allowed."
    assert list(tokens.step_results) == ["research-a", "research-b", "analyse"]
    assert tokens.usage == Usage(tokens=300, calls=3)
    assert not slow.success and slow.budget_exceeded is not None
    assert slow.budget_exceeded.limit == "wall_time_s" and slow.budget_exceeded.allowed == 1
    assert 1 < slow.budget_exceeded.used < 4 and slow.step_results == {}
    assert fine.success and fine.usage == Usage(tokens=500, calls=5)
    assert [s for w, s in await dispatched(settings, codec, app.topics) if w == "tokens"] == [
        "analyse", "research-a", "research-b"]
    events = await decoded(settings, codec, app.topics.events)
    stops = [(e.workflow_id, e.kind) for e in events
             if e.kind in ("BudgetExceeded", "WorkflowFailed", "WorkflowCompleted")]
    assert sorted(stops) == [("fine", "WorkflowCompleted"), ("slow", "BudgetExceeded"),
                             ("slow", "WorkflowFailed"), ("tokens", "BudgetExceeded"),
                             ("tokens", "WorkflowFailed")]
    records = sorted(await read_all(settings, [app.topics.events.name]),
                     key=lambda r: (r.partition, r.offset))
    for record in records:
        event = await codec.decode(app.topics.events, record.value or b"")
        headers = {k: v.decode() for k, v in record.headers}
        assert headers["mesh-correlation"] == correlations[event.workflow_id]  # type: ignore[attr-defined]


async def test_an_approval_step_waits_and_proceeds_on_approve_or_fails_on_reject_or_deadline(
        broker: BrokerUnderTest, prefix: str, cli: Cli) -> None:
    """Pass: three reports whose analyse step asks for approval. Once all three asked
    (ApprovalRequested, an ApprovalRequest on the approvals topic each), no analyse task
    exists. `mesh approve yes analyse --by ana` dispatches it and the workflow completes;
    `mesh reject no analyse --reason ...` fails its workflow naming the step, who and
    why, with the research results; `late` (a 2 s deadline) is rejected by the deadline.
    A second `mesh approve` of the approved step is a DecisionIgnored event."""
    app = build(prefix)
    settings, codec = broker.settings(), Codec()
    await apply_topics(settings.kafka, app.topics.all())
    jobs = [Job(workflow_id="yes", approval_step="analyse"),
            Job(workflow_id="no", approval_step="analyse"),
            Job(workflow_id="late", approval_step="analyse", approval_timeout_s=2)]
    records, correlations = request_records(codec, app.topics, jobs)
    async with Mesh(settings, [app.coordinator, *app.specialists]) as mesh:
        await mesh.wait_assigned()
        await inject(settings, records)
        await wait_for_events(settings, codec, app.topics, asked(["yes", "no", "late"]))
        waiting = await dispatched(settings, codec, app.topics)
        assert sorted(s for _, s in waiting) == ["research-a"] * 3 + ["research-b"] * 3
        await cli.ok("approve", "yes", "analyse", "--by", "ana", "-t", APP)
        await cli.ok("reject", "no", "analyse", "--reason", "off topic", "--by", "bob",
                     "-t", APP)
        outcomes = await outcomes_of(settings, codec, app.topics, set(correlations))
        await cli.ok("approve", "yes", "analyse", "--by", "carl", "-t", APP)
        await wait_for_events(settings, codec, app.topics, lambda events: any(
            e.kind == "DecisionIgnored" for e in events))
    assert outcomes["yes"].success
    no, late = outcomes["no"], outcomes["late"]
    assert (no.success, no.failed_step) == (False, "analyse")
    assert no.error == "Step 'analyse' (analyst) rejected by bob: off topic."
    assert list(no.step_results) == ["research-a", "research-b"]
    assert (late.success, late.error) == (False, "Step 'analyse' (analyst) rejected by "
                                                 "deadline: no decision within 2 s.")
    requests = await decoded(settings, codec, app.topics.approvals)
    assert sorted((r.workflow_id, r.step_id) for r in requests) == [
        ("late", "analyse"), ("no", "analyse"), ("yes", "analyse")]
    steps = await dispatched(settings, codec, app.topics)
    assert [s for w, s in steps if w != "yes"] == ["research-a", "research-b"] * 2
    events = await decoded(settings, codec, app.topics.events)
    assert [e.message for e in events if e.kind == "DecisionIgnored"] == [
        "Decision on step 'analyse' (approved by carl) ignored: the workflow is completed."]
    assert [e.message for e in events if e.kind == "StepApproved"] == [
        "Step 'analyse' (analyst) approved by ana."]

