"""Hierarchical delegation on a real broker: a coordinator and four specialists."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from mesh import Codec, Envelope, Mesh, MeshSettings, apply_topics
from mesh.kafka.base import OutRecord
from mesh.patterns.delegation.coordinator import WorkflowOutcome
from mesh.patterns.delegation.plan import StepResult
from mesh.state import CompactedTable
from tests.apps.delegation import DelegationApp, Job, build, outcomes_of, request_records
from tests.conftest import BrokerUnderTest
from tests.support import inject, read_all

REPORT_STEPS = ["research-a", "research-b", "analyse", "fact-check", "write"]


async def decoded(settings: MeshSettings, codec: Codec, topic: Any) -> list[tuple[Any, dict]]:
    """Every payload of ``topic`` with its headers, in partition order."""
    records = sorted(await read_all(settings, [topic.name]), key=lambda r: (r.partition, r.offset))
    return [(await codec.decode(topic, r.value or b""),
             {k: v.decode() for k, v in r.headers}) for r in records]


async def run(broker: BrokerUnderTest, app: DelegationApp, jobs: Sequence[Job],
              ) -> tuple[dict[str, WorkflowOutcome], dict[str, str]]:
    settings, codec = broker.settings(), Codec()
    await apply_topics(settings.kafka, app.topics.all())
    records, correlations = request_records(codec, app.topics, jobs)
    async with Mesh(settings, [app.coordinator, *app.specialists]) as mesh:
        await mesh.wait_assigned()
        await inject(settings, records)
        outcomes = await outcomes_of(settings, codec, app.topics, set(correlations))
    return outcomes, correlations


async def test_report_runs_research_in_parallel_is_revised_at_the_checkpoint_and_synthesised(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: each report completes with every step's result and the executed plan v2
    (the reviewer added fact-check at the analysis checkpoint); both plan versions are
    on the plans topic in order, the table holds v2; the two research steps were
    dispatched together by the request and analyse got both results as context; every
    event carries the request's correlation id; the workflow state says completed."""
    app = build(prefix)
    settings, codec = broker.settings(), Codec()
    outcomes, correlations = await run(broker, app, [Job(workflow_id=f"r{n}") for n in range(3)])
    for outcome in outcomes.values():
        assert outcome.success, outcome.error
        assert outcome.plan is not None and outcome.plan.version == 2
        assert outcome.plan.step_ids == REPORT_STEPS
        assert list(outcome.step_results) == REPORT_STEPS
        assert outcome.final_output == outcome.step_results  # the default synthesizer
        assert outcome.step_results["write"]["context"] == ["analyse", "fact-check"]
    plans = defaultdict(list)
    for plan, _ in await decoded(settings, codec, app.topics.plans):
        plans[plan.workflow_id].append((plan.version, plan.author))
    assert plans == {wf: [(1, "planner"), (2, "reviewer")] for wf in outcomes}
    table = CompactedTable(app.topics.plans, settings.kafka, codec)
    await table.restore()
    assert {wf: p.version for wf, p in table.items()} == {wf: 2 for wf in outcomes}
    tasks = [t for topic in app.topics.tasks.values()
             for t in await decoded(settings, codec, topic)]
    assert Counter((t.workflow_id, t.step_id) for t, _ in tasks) == {
        (wf, s): 1 for wf in outcomes for s in REPORT_STEPS}
    for wf in outcomes:
        research = [h for t, h in tasks if t.workflow_id == wf and t.specialist == "researcher"]
        assert len({h["mesh-causation"] for h in research}) == 1  # one input sent both
        analyse = next(t for t, _ in tasks if t.workflow_id == wf and t.step_id == "analyse")
        assert sorted(analyse.context) == ["research-a", "research-b"]
    events = await decoded(settings, codec, app.topics.events)
    for event, headers in events:
        assert headers["mesh-correlation"] == correlations[event.workflow_id]
    kinds = Counter(e.kind for e, _ in events if e.workflow_id == "r0")
    assert kinds == {"WorkflowStarted": 1, "PlanPublished": 2, "StepDispatched": 5,
                     "StepCompleted": 5, "CheckpointReviewed": 1, "WorkflowCompleted": 1}
    state = CompactedTable(app.topics.workflows, settings.kafka, codec)
    await state.restore()
    assert {wf: s.status for wf, s in state.items()} == {wf: "completed" for wf in outcomes}


async def test_a_plan_without_dependencies_runs_its_steps_in_order_with_earlier_results(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: a plan written the seed's way (research, analyse, write; no depends_on)
    dispatches each step only after the previous one completed (the workflow's events,
    one partition, in order), each with every earlier step's result as context; the
    outcome carries step_results in plan order and plan_executed, whose steps list the
    order as explicit dependencies."""
    app = build(prefix)
    settings, codec = broker.settings(), Codec()
    outcomes, _ = await run(broker, app, [Job(workflow_id="s0", kind="sequence", sleep_ms=100)])
    outcome = outcomes["s0"]
    assert outcome.success, outcome.error
    assert list(outcome.step_results) == ["research", "analyse", "write"]
    assert [outcome.step_results[s]["context"] for s in ("research", "analyse", "write")] == [
        [], ["research"], ["analyse", "research"]]
    assert outcome.plan_executed is not None
    assert [s.depends_on for s in outcome.plan_executed.steps] == [
        [], ["research"], ["research", "analyse"]]
    events = [e for e, _ in await decoded(settings, codec, app.topics.events)
              if e.workflow_id == "s0" and e.kind in ("StepDispatched", "StepCompleted")]
    assert [(e.kind, e.step_id) for e in events] == [
        (kind, step) for step in ("research", "analyse", "write")
        for kind in ("StepDispatched", "StepCompleted")]


async def test_an_invalid_plan_is_one_plan_invalid_event_and_nothing_is_dispatched(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: a plan naming an unknown specialist and a plan with a cycle each give one
    PlanInvalid event with a clear message and a failed outcome carrying it; no task is
    dispatched for them; a result naming no workflow is dead-lettered with a
    ResultIgnored event; the coordinator keeps running and completes the next report."""
    app = build(prefix)
    settings, codec = broker.settings(), Codec()
    stray = StepResult(workflow_id="ghost", step_id="a", dispatch_id="ghost/a/v1",
                       specialist="writer", ok=True)
    env = Envelope.new(stray, source="test", key=b"ghost")
    value, fingerprint = codec.encode(app.topics.results, stray)
    await apply_topics(settings.kafka, app.topics.all())
    await inject(settings, [OutRecord(app.topics.results.name, value, b"ghost", tuple(
        env.with_payload(stray, schema=fingerprint).headers()))])
    outcomes, _ = await run(broker, app, [Job(workflow_id="bad", kind="unknown"),
                                          Job(workflow_id="loop", kind="cycle"),
                                          Job(workflow_id="good")])
    message = ("Unknown specialist 'coder' in step 'write-code': known are analyst, "
               "fact-checker, researcher, writer. Register it or fix the plan.")
    assert (outcomes["bad"].success, outcomes["bad"].error) == (False, message)
    assert not outcomes["loop"].success
    assert "has a dependency cycle: a -> b -> a" in (outcomes["loop"].error or "")
    assert outcomes["good"].success
    events = [e for e, _ in await decoded(settings, codec, app.topics.events)]
    invalid = [(e.workflow_id, e.message) for e in events if e.kind == "PlanInvalid"]
    assert sorted(invalid) == [("bad", message), ("loop", outcomes["loop"].error)]
    tasks = [t for topic in app.topics.tasks.values()
             for t, _ in await decoded(settings, codec, topic)]
    assert {t.workflow_id for t in tasks} == {"good"}
    plans = [p.workflow_id for p, _ in await decoded(settings, codec, app.topics.plans)]
    assert set(plans) == {"good"}
    assert [e.message for e in events if e.kind == "ResultIgnored"] == [
        "Result of step 'a' (ghost/a/v1) ignored: no such workflow (dead-lettered to "
        f"{app.topics.results.dlq_name})."]
    assert len(await read_all(settings, [app.topics.results.dlq_name])) == 1


async def test_a_step_failing_after_retries_fails_the_workflow_naming_the_step(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: analyse always raising fails its workflow: WorkflowFailed and a failed
    outcome name the step and the error and carry the partial results (both research
    steps); write is never dispatched; the task is dead-lettered. A step that times out
    once is retried in place and its workflow completes."""
    app = build(prefix)
    settings, codec = broker.settings(), Codec()
    outcomes, _ = await run(broker, app, [Job(workflow_id="doomed", fail_step="analyse"),
                                          Job(workflow_id="flaky", flaky_step="research-a")])
    doomed = outcomes["doomed"]
    assert (doomed.success, doomed.failed_step) == (False, "analyse")
    assert doomed.error == ("Step 'analyse' (analyst) failed: ValueError: analyst cannot do "
                            "analyse")
    assert list(doomed.step_results) == ["research-a", "research-b"]
    assert outcomes["flaky"].success
    events = [e for e, _ in await decoded(settings, codec, app.topics.events)
              if e.workflow_id == "doomed"]
    assert [(e.step_id, e.message) for e in events if e.kind == "WorkflowFailed"] == [
        ("analyse", doomed.error)]
    tasks = [t for topic in app.topics.tasks.values()
             for t, _ in await decoded(settings, codec, topic) if t.workflow_id == "doomed"]
    assert sorted(t.step_id for t in tasks) == ["analyse", "research-a", "research-b"]
    assert len(await read_all(settings, [app.topics.tasks["analyst"].dlq_name])) == 1


async def test_the_reviewer_can_replan_around_a_failed_step(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: research-b fails; the reviewer replaces it by research-b-retry (plan v2,
    reason naming the failure), analyse then depends on the retry; the checkpoint adds
    fact-check (v3); the workflow completes with the retry's result."""
    app = build(prefix)
    settings, codec = broker.settings(), Codec()
    outcomes, _ = await run(broker, app, [Job(workflow_id="w", kind="replan",
                                              fail_step="research-b")])
    outcome = outcomes["w"]
    assert outcome.success, outcome.error
    assert outcome.plan is not None and outcome.plan.version == 3
    assert set(outcome.step_results) == {"research-a", "research-b-retry", "analyse",
                                         "fact-check", "write"}
    assert outcome.step_results["analyse"]["context"] == ["research-a", "research-b-retry"]
    plans = [p for p, _ in await decoded(settings, codec, app.topics.plans)]
    assert [p.version for p in plans] == [1, 2, 3]
    assert plans[1].reason == ("retry research-b after: ValueError: researcher cannot do "
                               "research-b")


async def test_a_request_delivered_twice_is_applied_once(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: the same request record produced three times (same event id) and once more
    with another event id for the same workflow gives one plan v1, one dispatch per
    step, one outcome."""
    app = build(prefix)
    settings, codec = broker.settings(), Codec()
    await apply_topics(settings.kafka, app.topics.all())
    records, _ = request_records(codec, app.topics, [Job(workflow_id="once")])
    again, _ = request_records(codec, app.topics, [Job(workflow_id="once")])
    async with Mesh(settings, [app.coordinator, *app.specialists]) as mesh:
        await mesh.wait_assigned()
        await inject(settings, records * 3 + again)
        await outcomes_of(settings, codec, app.topics, {"once"})
        finished = Counter(e.kind for e, _ in await decoded(settings, codec, app.topics.events))
    tasks = [t for topic in app.topics.tasks.values()
             for t, _ in await decoded(settings, codec, topic)]
    assert Counter(t.step_id for t in tasks) == dict.fromkeys(REPORT_STEPS, 1)
    plans = [p.version for p, _ in await decoded(settings, codec, app.topics.plans)]
    assert plans == [1, 2]
    outcomes = await decoded(settings, codec, app.topics.outcomes)
    assert len(outcomes) == 1
    assert finished["WorkflowStarted"] == 1 and finished["WorkflowCompleted"] == 1
