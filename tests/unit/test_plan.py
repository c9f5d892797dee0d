"""Plans: validation (DAG, cycles, unknown specialists, duplicates), ready steps,
revisions, planners; and the coordinator's transitions run on in-memory tables."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import Codec, Envelope, HandlerError
from mesh.agent import Context
from mesh.config import KafkaSettings
from mesh.patterns.delegation.coordinator import StepResult, WorkflowEvent, WorkflowOutcome
from mesh.patterns.delegation.plan import (
    Plan,
    PlanError,
    PlanStep,
    Revision,
    Rule,
    RulesPlanner,
    as_plan,
    find_cycle,
    order_steps,
    ready_steps,
    revise,
    validate_plan,
)
from mesh.state import CompactedTable
from tests.apps.delegation import Job, build

KNOWN = ["researcher", "writer"]


def step(sid: str, specialist: str = "researcher", *deps: str, **kw: Any) -> PlanStep:
    return PlanStep(id=sid, specialist=specialist, depends_on=list(deps), **kw)


def problems(plan: Plan, known: list[str] = KNOWN) -> tuple[str, ...]:
    with pytest.raises(PlanError) as caught:
        validate_plan(plan, known)
    assert not caught.value.retriable
    return caught.value.problems


def test_a_valid_dag_passes() -> None:
    validate_plan(Plan(steps=[step("a"), step("b"), step("c", "writer", "a", "b")]), KNOWN)


def test_unknown_specialist_names_the_step_the_known_ones_and_the_fix() -> None:
    plan = Plan(steps=[step("research"), step("write-code", "coder", "research")])
    assert problems(plan) == ("Unknown specialist 'coder' in step 'write-code': known are "
                              "researcher, writer. Register it or fix the plan.",)


def test_missing_dependency_is_reported_with_the_plan_steps() -> None:
    (message,) = problems(Plan(steps=[step("a"), step("b", "writer", "a", "ghost")]))
    assert message.startswith("Step 'b' depends on 'ghost', which is not a step of the plan "
                              "(steps: a, b).")


def test_duplicate_step_id_is_reported() -> None:
    (message,) = problems(Plan(steps=[step("a"), step("a", "writer")]))
    assert message.startswith("Duplicate step id 'a'")


@pytest.mark.parametrize(("steps", "cycle"), [
    ([step("a", "researcher", "a")], ["a", "a"]),
    ([step("a", "researcher", "b"), step("b", "writer", "a")], ["a", "b", "a"]),
    ([step("x"), step("a", "researcher", "c"), step("b", "writer", "a"),
      step("c", "writer", "b", "x")], ["a", "c", "b", "a"]),
])
def test_a_cycle_is_reported_as_a_path(steps: list[PlanStep], cycle: list[str]) -> None:
    assert find_cycle(steps) == cycle
    (message,) = problems(Plan(steps=steps, workflow_id="wf-1"))
    assert f"Plan of workflow 'wf-1' has a dependency cycle: {' -> '.join(cycle)}" in message


def test_no_cycle_in_a_diamond() -> None:
    assert find_cycle([step("a"), step("b", "r", "a"), step("c", "r", "a"),
                       step("d", "r", "b", "c")]) == []


def test_every_problem_is_reported_at_once() -> None:
    found = problems(Plan(steps=[step("a", "coder"), step("a", "writer", "zzz")]))
    assert len(found) == 3


def test_an_empty_plan_is_invalid() -> None:
    assert "has no steps" in problems(Plan(steps=[]))[0]


def test_ready_steps_are_the_roots_then_what_their_results_unlock() -> None:
    plan = Plan(steps=[step("a"), step("b"), step("c", "writer", "a"),
                       step("d", "writer", "b", "c")])
    assert [s.id for s in ready_steps(plan, done=set())] == ["a", "b"]
    assert [s.id for s in ready_steps(plan, done=set(), started={"a"})] == ["b"]
    assert [s.id for s in ready_steps(plan, done={"a"}, started={"a", "b"})] == ["c"]
    assert [s.id for s in ready_steps(plan, done={"a", "b"}, started={"a", "b", "c"})] == []
    assert [s.id for s in ready_steps(plan, done={"a", "b", "c"}, started={"a", "b", "c"})
            ] == ["d"]
    assert ready_steps(plan, done={"a", "b", "c", "d"}) == []


def test_a_revision_keeps_done_steps_and_replaces_the_rest() -> None:
    plan = Plan(steps=[step("a"), step("b", "writer", "a")], workflow_id="w", version=3)
    new = revise(plan, Revision([step("c"), step("b", "writer", "a", "c")], reason="why"),
                 done={"a"})
    assert (new.version, new.reason, new.author, new.workflow_id) == (4, "why", "reviewer", "w")
    assert new.step_ids == ["a", "c", "b"]
    validate_plan(new, KNOWN)
    with pytest.raises(PlanError, match="needs a reason"):
        Revision([], reason=" ")


def test_a_list_without_dependencies_runs_in_order_each_step_after_every_earlier_one() -> None:
    plan = Plan(steps=order_steps([step("a"), step("b", "writer"), step("c")]))
    assert [s.depends_on for s in plan.steps] == [[], ["a"], ["a", "b"]]
    assert [s.id for s in ready_steps(plan, done=set())] == ["a"]
    assert [s.id for s in ready_steps(plan, done={"a"}, started={"a"})] == ["b"]
    assert [s.id for s in ready_steps(plan, done={"a", "b"}, started={"a", "b"})] == ["c"]
    validate_plan(plan, KNOWN)


def test_one_declared_dependency_makes_a_dag_where_only_declared_ones_count() -> None:
    steps = [step("a"), step("b"), step("c", "writer", "a")]
    assert order_steps(steps) == steps
    assert [s.id for s in ready_steps(Plan(steps=order_steps(steps)), done=set())] == ["a", "b"]


def test_a_revision_without_dependencies_runs_in_order_after_the_done_steps() -> None:
    plan = Plan(steps=order_steps([step("a"), step("b", "writer")]))
    new = revise(plan, Revision([step("c"), step("d", "writer")], reason="more"), done={"a"})
    assert [(s.id, s.depends_on) for s in new.steps] == [("a", []), ("c", ["a"]),
                                                          ("d", ["a", "c"])]


def test_same_work_ignores_dependency_order_but_not_input() -> None:
    assert step("a", "r", "x", "y").same_work(step("a", "r", "y", "x"))
    assert not step("a", "r", input={"n": 1}).same_work(step("a", "r", input={"n": 2}))


async def test_rules_planner_uses_the_first_matching_rule_or_says_none_matched() -> None:
    planner = RulesPlanner(Rule("small", lambda r: [step("a")], when=lambda r: r == 1),
                           Rule("big", lambda r: [step("b")], when=lambda r: r == 2))
    assert (await planner(2)).step_ids == ["b"]
    assert (await planner(1)).reason == "rule 'small'"
    with pytest.raises(PlanError, match=r"No planning rule matches .*rules: small, big"):
        await planner(3)


def test_a_planner_may_answer_with_a_dict_or_json_but_not_garbage() -> None:
    assert as_plan({"steps": [{"id": "a", "specialist": "r"}]}).step_ids == ["a"]
    assert as_plan('{"steps": [{"id": "a", "specialist": "r"}]}').step_ids == ["a"]
    with pytest.raises(PlanError, match="The planner returned a dict that is not a plan"):
        as_plan({"stages": []})


# The coordinator's transitions, on in-memory tables (no broker): what a handler emits.

class Harness:
    def __init__(self) -> None:
        self.app = build("unit")
        self.topics = self.app.topics
        self.table = CompactedTable(self.topics.workflows, KafkaSettings(), Codec())
        self.offset = 0

    async def deliver(self, payload: Any, *, event_id: str, topic: str | None = None,
                      offset: int | None = None) -> list[tuple[str, Any]]:
        """Handle one input like the runtime: apply the staged state if it succeeds."""
        topic = topic or (self.topics.results.name if isinstance(payload, StepResult)
                          else self.topics.requests.name)
        self.offset += 1
        event = Envelope(payload, event_id, "corr", topic=topic, partition=0,
                         offset=self.offset if offset is None else offset)
        ctx = Context(self.app.coordinator, event, tables={self.table.topic.name: self.table})
        await self.app.coordinator.handle(payload, ctx)
        ctx.commit_state()
        return [(e.topic.name.removeprefix("unit."), e.payload) for e in ctx.outputs]


def tasks(outputs: list[tuple[str, Any]]) -> list[str]:
    return [p.step_id for t, p in outputs if t.startswith("tasks.")]


def kinds(outputs: list[tuple[str, Any]]) -> list[str]:
    return [p.kind for t, p in outputs if isinstance(p, WorkflowEvent)]


def done(task: Any, event_id: str) -> StepResult:
    return StepResult(workflow_id=task.workflow_id, step_id=task.step_id,
                      dispatch_id=task.dispatch_id, specialist=task.specialist, ok=True,
                      output={"from": task.step_id})


async def test_coordinator_runs_a_report_and_a_redelivery_resends_only_pending_work() -> None:
    h = Harness()
    out = await h.deliver(Job(workflow_id="w1"), event_id="req")
    assert tasks(out) == ["research-a", "research-b"]
    assert kinds(out) == ["WorkflowStarted", "PlanPublished", "StepDispatched", "StepDispatched"]
    request_offset = h.offset
    sent = {p.step_id: p for t, p in out if t.startswith("tasks.")}
    assert tasks(await h.deliver(done(sent["research-a"], "r1"), event_id="r1")) == []
    out = await h.deliver(done(sent["research-b"], "r2"), event_id="r2")
    assert tasks(out) == ["analyse"]
    analyse = next(p for t, p in out if t == "tasks.analyst")
    assert analyse.context == {"research-a": {"from": "research-a"},
                               "research-b": {"from": "research-b"}}
    # the request redelivered from its offset (a crash before the commit): its research
    # steps are done, so nothing is dispatched again, only its plan (maybe unsent) is
    # re-sent; another record with the same event id is a mere duplicate
    out = await h.deliver(Job(workflow_id="w1"), event_id="req", offset=request_offset)
    assert [(t, p.version) for t, p in out] == [("plans", 1)]
    assert await h.deliver(Job(workflow_id="w1"), event_id="req") == []
    # the last result redelivered: analyse is still in flight, so it is re-sent
    out = await h.deliver(done(sent["research-b"], "r2"), event_id="r2", offset=h.offset - 2)
    assert tasks(out) == ["analyse"] and analyse in [p for _, p in out]
    # checkpoint: the reviewer adds a fact check; v2 is published
    out = await h.deliver(done(analyse, "r3"), event_id="r3")
    plans = [p for t, p in out if t == "plans"]
    assert [(p.version, p.step_ids) for p in plans] == [
        (2, ["research-a", "research-b", "analyse", "fact-check", "write"])]
    assert tasks(out) == ["fact-check"]
    fact = next(p for t, p in out if t.startswith("tasks."))
    out = await h.deliver(done(fact, "r4"), event_id="r4")
    write = next(p for t, p in out if t.startswith("tasks."))
    assert write.context.keys() == {"analyse", "fact-check"}
    out = await h.deliver(done(write, "r5"), event_id="r5")
    (outcome,) = [p for _, p in out if isinstance(p, WorkflowOutcome)]
    assert outcome.success and outcome.plan is not None and outcome.plan.version == 2
    assert list(outcome.final_output) == outcome.plan.step_ids == list(outcome.step_results)
    assert kinds(out) == ["StepCompleted", "WorkflowCompleted"]
    # a late duplicate result of a finished workflow is ignored, visibly
    assert kinds(await h.deliver(done(write, "r6"), event_id="r6")) == ["ResultIgnored"]


async def test_coordinator_runs_a_plan_without_dependencies_one_step_at_a_time() -> None:
    """The seed's semantics: each step after the previous one, with every earlier
    result as context; the outcome names step_results and plan_executed."""
    h = Harness()
    out = await h.deliver(Job(workflow_id="s1", kind="sequence"), event_id="req")
    assert tasks(out) == ["research"]
    contexts = []
    for n, expected in enumerate(["analyse", "write", None]):
        task = next(p for t, p in out if t.startswith("tasks."))
        contexts.append(task.context)
        out = await h.deliver(done(task, f"r{n}"), event_id=f"r{n}")
        assert tasks(out) == ([expected] if expected else [])
    assert contexts == [{}, {"research": {"from": "research"}},
                        {"research": {"from": "research"}, "analyse": {"from": "analyse"}}]
    (outcome,) = [p for _, p in out if isinstance(p, WorkflowOutcome)]
    assert outcome.success and list(outcome.step_results) == ["research", "analyse", "write"]
    assert outcome.plan_executed is outcome.plan and outcome.plan is not None
    assert [s.depends_on for s in outcome.plan.steps] == [[], ["research"],
                                                          ["research", "analyse"]]


async def test_a_result_for_a_workflow_without_state_is_bad_input() -> None:
    h = Harness()
    with pytest.raises(HandlerError, match="names workflow 'nope', which coordinator "
                                           "'unit-coordinator' has no state for") as caught:
        await h.deliver(StepResult(workflow_id="nope", step_id="a", dispatch_id="nope/a/v1",
                                   specialist="writer", ok=True), event_id="x")
    assert not caught.value.retriable


async def test_coordinator_rejects_an_invalid_plan_without_dispatching() -> None:
    h = Harness()
    out = await h.deliver(Job(workflow_id="w2", kind="unknown"), event_id="req")
    assert tasks(out) == [] and kinds(out) == ["WorkflowStarted", "PlanInvalid"]
    (outcome,) = [p for _, p in out if isinstance(p, WorkflowOutcome)]
    assert not outcome.success and outcome.error == (
        "Unknown specialist 'coder' in step 'write-code': known are analyst, fact-checker, "
        "researcher, writer. Register it or fix the plan.")
    assert h.table.get("w2").status == "failed"  # type: ignore[union-attr]
