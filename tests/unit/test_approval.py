"""Approvals and budgets of delegated workflows: the coordinator's transitions on
in-memory tables (what a handler emits), the budget rule, decision signing and the
timer's markers. The same behaviours on a real broker: tests/integration/test_approval.py."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr

from mesh import Codec, Envelope
from mesh.agent import Context
from mesh.config import KafkaSettings
from mesh.errors import SignatureInvalid
from mesh.patterns.delegation.approval import Decision, decision_topic, sign_decision
from mesh.patterns.delegation.budget import Budget, BudgetExceeded, Usage
from mesh.patterns.delegation.coordinator import StepResult, WorkflowEvent, WorkflowOutcome
from mesh.patterns.delegation.signing import PlanSigner
from mesh.patterns.delegation.specialist import record_usage
from mesh.patterns.delegation.transition import due_markers
from mesh.state import CompactedTable
from tests.apps.delegation import Job, build

KEY = SecretStr("a unit-test plan key of more than 32 characters")


class Harness:
    """Delivers inputs to the coordinator like the runtime, at chosen production times."""

    def __init__(self) -> None:
        self.app = build("unit")
        self.topics = self.app.topics
        self.table = CompactedTable(self.topics.workflows, KafkaSettings(), Codec())
        self.offset = 0
        self.sent: dict[str, Any] = {}  # step id -> its last task

    async def deliver(self, payload: Any, *, event_id: str, at_ms: int = 1_000_000,
                      settings: Any = None) -> list[tuple[str, Any]]:
        topic = (self.topics.results if isinstance(payload, StepResult)
                 else self.topics.decisions if isinstance(payload, Decision)
                 else self.topics.requests)
        assert topic is not None
        self.offset += 1
        event = Envelope(payload, event_id, "corr", topic=topic.name, partition=0,
                         offset=self.offset, produced_at_ms=at_ms)
        runner = type("Runner", (), {"settings": settings})() if settings else None
        ctx = Context(self.app.coordinator, event, tables={self.table.topic.name: self.table},
                      runner=runner)
        await self.app.coordinator.handle(payload, ctx)
        ctx.commit_state()
        out = [(e.topic.name.removeprefix("unit."), e.payload) for e in ctx.outputs]
        self.sent.update({p.step_id: p for t, p in out if t.startswith("tasks.")})
        return out

    async def finish(self, step: str, *, tokens: int = 0, at_ms: int = 1_000_000
                     ) -> list[tuple[str, Any]]:
        task = self.sent[step]
        return await self.deliver(StepResult(
            workflow_id=task.workflow_id, step_id=step, dispatch_id=task.dispatch_id,
            specialist=task.specialist, ok=True, output={"from": step},
            usage=Usage(tokens=tokens, calls=1) if tokens else None),
            event_id=f"done-{step}-{self.offset}", at_ms=at_ms)


def tasks(out: list[tuple[str, Any]]) -> list[str]:
    return [p.step_id for t, p in out if t.startswith("tasks.")]


def kinds(out: list[tuple[str, Any]]) -> list[str]:
    return [p.kind for _, p in out if isinstance(p, WorkflowEvent)]


def outcome(out: list[tuple[str, Any]]) -> WorkflowOutcome:
    (found,) = [p for _, p in out if isinstance(p, WorkflowOutcome)]
    return found


def test_the_budget_rule_stops_over_a_limit_and_at_it_when_steps_remain() -> None:
    budget = Budget(tokens=100, calls=3, cost=0.5, wall_time_s=10)
    assert budget.exceeded(Usage(tokens=99, calls=2), elapsed_s=1, more=True) is None
    assert budget.exceeded(Usage(tokens=100), elapsed_s=1, more=False) is None
    assert budget.exceeded(Usage(tokens=100), elapsed_s=1, more=True) == BudgetExceeded(
        limit="tokens", used=100, allowed=100, steps_remained=True)
    assert budget.exceeded(Usage(cost=0.6), elapsed_s=1, more=False).limit == "cost"  # type: ignore[union-attr]
    over = budget.exceeded(Usage(), elapsed_s=10.5, more=False)
    assert over is not None and over.message() == (
        "wall time budget exceeded: 10.5 s used of 10 s allowed")
    assert Budget(tokens=5).merged(Budget(calls=1)) == Budget(tokens=5, calls=1)
    assert not Budget() and Budget(calls=0)


async def test_a_token_budget_stops_the_workflow_before_the_next_dispatch() -> None:
    """The request's budget (250 tokens) with 100 tokens a step: after the research
    steps (200) analyse is dispatched; its result makes 300, over: BudgetExceeded, then
    WorkflowFailed, a failed outcome with the partial results and the usage (the event
    carries them too); the
    fact-check the reviewer added is not dispatched; a late result is ignored."""
    h = Harness()
    await h.deliver(Job(workflow_id="b1", budget=Budget(tokens=250)), event_id="req")
    await h.finish("research-a", tokens=100)
    assert tasks(await h.finish("research-b", tokens=100)) == ["analyse"]
    out = await h.finish("analyse", tokens=100)
    assert tasks(out) == []
    assert kinds(out) == ["StepCompleted", "CheckpointReviewed", "PlanPublished",
                          "BudgetExceeded", "WorkflowFailed"]
    result = outcome(out)
    assert not result.success and result.failed_step is None
    assert result.budget_exceeded == BudgetExceeded(limit="tokens", used=300, allowed=250)
    assert result.error == "Budget exceeded: tokens budget exceeded: 300 used of 250 allowed."
    assert list(result.step_results) == ["research-a", "research-b", "analyse"]
    assert result.usage == Usage(tokens=300, calls=3)
    completed = [p for _, p in out if isinstance(p, WorkflowEvent) and p.kind == "StepCompleted"]
    assert completed[0].usage == Usage(tokens=100, calls=1)
    (stopped,) = [p for _, p in out if isinstance(p, WorkflowEvent)
                  and p.kind == "BudgetExceeded"]
    assert stopped.step_results == result.step_results  # the event carries them too
    assert stopped.usage == Usage(tokens=300, calls=3)


async def test_the_coordinator_budget_applies_unless_the_request_overrides_it() -> None:
    h = Harness()
    h.app.coordinator.budget = Budget(calls=2)
    await h.deliver(Job(workflow_id="c1"), event_id="req")
    await h.finish("research-a", tokens=1)
    out = await h.finish("research-b", tokens=1)  # 2 calls of 2, analyse remains
    assert tasks(out) == [] and outcome(out).budget_exceeded == BudgetExceeded(
        limit="calls", used=2, allowed=2, steps_remained=True)
    await h.deliver(Job(workflow_id="c2", budget=Budget(calls=10)), event_id="req2")
    await h.finish("research-a", tokens=1)
    assert tasks(await h.finish("research-b", tokens=1)) == ["analyse"]


async def test_wall_time_is_checked_on_every_input_and_by_the_timer() -> None:
    h = Harness()
    await h.deliver(Job(workflow_id="t1", budget=Budget(wall_time_s=5)), event_id="req",
                    at_ms=1_000_000)
    state = h.table.get("t1")
    assert state is not None
    assert due_markers(state, 1_004_000) == [] and due_markers(state, 1_006_000) == [
        ("wall_time", "")]
    assert kinds(await h.finish("research-a", at_ms=1_003_000)) == ["StepCompleted"]
    out = await h.deliver(Decision(workflow_id="t1", kind="wall_time"), event_id="m1",
                          at_ms=1_006_000)
    assert kinds(out) == ["BudgetExceeded", "WorkflowFailed"]
    assert outcome(out).budget_exceeded == BudgetExceeded(limit="wall_time_s", used=6,
                                                          allowed=5)
    assert list(outcome(out).step_results) == ["research-a"]


async def test_an_approval_step_waits_then_runs_when_approved() -> None:
    """analyse asks for approval once the research is done: an ApprovalRequest and an
    ApprovalRequested event, no task; a decision for another step is ignored visibly;
    approval dispatches it; a second decision is ignored; the workflow completes."""
    h = Harness()
    await h.deliver(Job(workflow_id="a1", approval_step="analyse"), event_id="req")
    await h.finish("research-a")
    out = await h.finish("research-b")
    assert tasks(out) == [] and kinds(out) == ["StepCompleted", "ApprovalRequested"]
    (request,) = [p for t, p in out if t == "approvals"]
    assert (request.step_id, request.specialist) == ("analyse", "analyst")
    assert request.deadline_at_ms - request.requested_at_ms == 3_600_000
    assert "mesh approve a1 analyse" in request.message
    out = await h.deliver(Decision(workflow_id="a1", step_id="write", approved=True, by="ana"),
                          event_id="d0")
    assert [p.message for _, p in out] == [
        "Decision on step 'write' (approved by ana) ignored: step 'write' did not ask for "
        "approval (waiting: analyse)."]
    out = await h.deliver(Decision(workflow_id="a1", step_id="analyse", approved=True,
                                   by="ana"), event_id="d1")
    assert tasks(out) == ["analyse"] and kinds(out) == ["StepApproved", "StepDispatched"]
    out = await h.deliver(Decision(workflow_id="a1", step_id="analyse", by="bob"),
                          event_id="d2")
    assert kinds(out) == ["DecisionIgnored"]
    assert "the step was approved already by ana" in out[0][1].message
    await h.finish("analyse")
    await h.finish("fact-check")
    assert outcome(await h.finish("write")).success


async def test_a_rejection_or_the_deadline_fails_the_workflow_with_partial_results() -> None:
    h = Harness()
    await h.deliver(Job(workflow_id="r1", approval_step="analyse"), event_id="req")
    await h.finish("research-a")
    await h.finish("research-b")
    out = await h.deliver(Decision(workflow_id="r1", step_id="analyse", by="ana",
                                   reason="off topic"), event_id="d1")
    assert kinds(out) == ["StepRejected", "WorkflowFailed"] and tasks(out) == []
    result = outcome(out)
    assert (result.success, result.failed_step) == (False, "analyse")
    assert result.error == "Step 'analyse' (analyst) rejected by ana: off topic."
    assert list(result.step_results) == ["research-a", "research-b"]

    await h.deliver(Job(workflow_id="r2", approval_step="analyse", approval_timeout_s=2),
                    event_id="req2", at_ms=1_000_000)
    await h.finish("research-a", at_ms=1_000_100)
    await h.finish("research-b", at_ms=1_000_200)  # asks at 1_000_200: deadline 1_002_200
    state = h.table.get("r2")
    assert state is not None and due_markers(state, 1_002_200) == [("deadline", "analyse")]
    early = await h.deliver(Decision(workflow_id="r2", step_id="analyse", kind="deadline"),
                            event_id="m0", at_ms=1_002_000)
    assert early == []  # a marker before the deadline changes nothing
    out = await h.deliver(Decision(workflow_id="r2", step_id="analyse", kind="deadline"),
                          event_id="m1", at_ms=1_002_300)
    assert outcome(out).error == ("Step 'analyse' (analyst) rejected by deadline: no "
                                  "decision within 2 s.")


async def test_with_a_plan_key_only_signed_decisions_apply() -> None:
    h = Harness()
    settings = type("Settings", (), {"security": type("S", (), {"plan_key": KEY})()})()
    await h.deliver(Job(workflow_id="s1", approval_step="research-a"), event_id="req",
                    settings=settings)
    unsigned = Decision(workflow_id="s1", step_id="research-a", approved=True, by="mallory")
    with pytest.raises(SignatureInvalid, match="is not signed"):
        await h.deliver(unsigned, event_id="d1", settings=settings)
    forged = sign_decision(PlanSigner(SecretStr("another key of more than 32 characters!")),
                           unsigned)
    with pytest.raises(SignatureInvalid, match="does not match"):
        await h.deliver(forged, event_id="d2", settings=settings)
    out = await h.deliver(sign_decision(PlanSigner(KEY), unsigned), event_id="d3",
                          settings=settings)
    assert tasks(out) == ["research-a"]


def test_record_usage_counts_only_inside_a_step_and_decision_topic_is_found() -> None:
    assert record_usage(tokens=5) is False
    topics = build("unit").topics
    assert decision_topic(topics.all()) is topics.decisions
    assert decision_topic(topics.all(), "unit") is topics.decisions  # the prefix will do
    with pytest.raises(Exception, match="found 0"):
        decision_topic([topics.requests])


async def test_a_specialist_puts_recorded_usage_on_its_result_and_in_metrics() -> None:
    """Pass: a handler recording twice (120 tokens in 2 calls, 0.01) answers with that
    usage on its StepResult and notes it for its audit record; a failing attempt's
    recorded usage is on the failed result; the /metrics of the host that started the specialist show its totals."""
    from prometheus_client import CollectorRegistry, generate_latest

    from mesh import MeshSettings
    from mesh.runtime.metrics import MeshMetrics
    from mesh.patterns.delegation.coordinator import DelegationTopics, Specialist, StepTask

    async def work(task: StepTask, ctx: Context) -> dict[str, str]:
        record_usage(tokens=100, calls=1)
        record_usage(Usage(tokens=20, calls=1, cost=0.01))
        if task.input.get("fail"):
            raise ValueError("no")
        return {"ok": "yes"}

    topics = DelegationTopics.named("metered", Job, specialists=["metered-writer"])
    agent = Specialist("metered-writer", topics=topics, handler=work)  # a name of its own
    metrics = MeshMetrics(CollectorRegistry())
    with metrics.hosting():
        await agent.on_start(MeshSettings())
    task = StepTask(task_id="w/s", workflow_id="w", step_id="s", dispatch_id="w/s/v1",
                    specialist="metered-writer", plan_version=1)
    ctx = Context(agent, Envelope(task, "e1", "c1", topic=topics.tasks["metered-writer"].name))
    result = await agent.handle(task, ctx)
    assert result.usage == Usage(tokens=120, calls=2, cost=0.01)
    assert ctx.details == {"tokens": "120", "calls": "2", "cost": "0.01"}  # for the audit
    failing = task.model_copy(update={"input": {"fail": True}, "dispatch_id": "w/s/v2"})
    with pytest.raises(ValueError):
        await agent.handle(failing, ctx)
    await agent.on_failure(failing, ctx, ValueError("no"))
    (failed,) = [e.payload for e in ctx.outputs]
    assert (failed.ok, failed.usage) == (False, Usage(tokens=120, calls=2, cost=0.01))
    text = generate_latest(metrics.registry).decode()
    assert 'mesh_step_tokens_total{agent="metered-writer"} 240.0' in text
    assert 'mesh_step_calls_total{agent="metered-writer"} 4.0' in text
    assert 'mesh_step_cost_total{agent="metered-writer"} 0.02' in text
