"""The delegation coordinator as a real process, killed -9 mid-way and restarted."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from mesh import Codec, Mesh, MeshSettings, apply_topics
from mesh.patterns.delegation.coordinator import DelegationTopics, WorkflowEvent, WorkflowState
from mesh.kafka.reader import TopicReader
from mesh.state import CompactedTable
from tests.apps.delegation import Job, build, outcomes_of, request_records
from tests.conftest import BrokerUnderTest
from tests.support import AgentProcess, inject, read_all

STEPS = ["research-a", "research-b", "analyse", "fact-check", "write"]
WORKFLOWS = 20


async def wait_for_completions(settings: MeshSettings, codec: Codec, topics: DelegationTopics,
                               count: int, timeout: float = 180.0) -> None:
    """Follow the events topic until ``count`` StepCompleted events were published."""
    seen = 0
    deadline = time.monotonic() + timeout
    async with TopicReader(settings.kafka, [topics.events.name]) as reader:
        async for record in reader.follow(idle_timeout=timeout):
            event = await codec.decode(topics.events, record.value or b"")
            assert isinstance(event, WorkflowEvent)
            seen += event.kind == "StepCompleted"
            if seen >= count:
                return
            if time.monotonic() > deadline:
                break
    raise AssertionError(f"{seen} of {count} steps completed after {timeout:.0f} s")


async def test_kill_9_of_the_coordinator_mid_way_dispatches_no_completed_step_again(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: 20 report workflows (5 steps each, 300 ms per step) run with the
    coordinator as a `mesh run` process; it is killed -9 after 30 steps completed and
    restarted. Every workflow completes with all 5 results and plan v2; every step
    whose result was in the workflows table at the kill was dispatched exactly once
    (counted on the task topics); steps in flight at the kill at most twice; the
    restarted coordinator is a new pid and stops with exit code 0 on SIGTERM."""
    app = build(prefix)
    settings, codec = broker.settings(), Codec()
    await apply_topics(settings.kafka, app.topics.all())
    jobs = [Job(workflow_id=f"wf{n:02d}", sleep_ms=300) for n in range(WORKFLOWS)]
    records, _ = request_records(codec, app.topics, jobs)
    log = (tmp_path / "coordinator.log").open("wb")
    coordinator = AgentProcess(broker, "tests.apps.delegation:coordinator", prefix=prefix,
                               log=log).start()
    try:
        async with Mesh(settings, app.specialists) as mesh:
            await mesh.wait_assigned()
            await inject(settings, records)
            await wait_for_completions(settings, codec, app.topics, 30)
            first_pid = coordinator.pid
            coordinator.kill9()
            table = CompactedTable(app.topics.workflows, settings.kafka, codec)
            await table.restore()
            states: dict[str, WorkflowState] = dict(table.items())
            coordinator.start()
            outcomes = await outcomes_of(settings, codec, app.topics,
                                         {j.workflow_id for j in jobs}, timeout=240)
        assert coordinator.pid != first_pid and coordinator.alive()
    finally:
        code = coordinator.terminate()
        log.close()
    assert code == 0, (tmp_path / "coordinator.log").read_text()
    done_before = {(wf, step) for wf, state in states.items()
                   for step, status in state.steps.items() if status.status == "done"}
    finished_before = {wf for wf, state in states.items() if state.status == "completed"}
    # Not necessarily 30: a StepCompleted event and its table row go to different
    # leaders on a cluster, and a kill between their acks keeps the event only (CI on
    # Apache Kafka: 24 rows after 30 events); such a step is dispatched again, at most once.
    assert 0 < len(done_before) < WORKFLOWS * len(STEPS), "the kill did not land mid-way"
    assert len(finished_before) < WORKFLOWS
    for wf, outcome in outcomes.items():
        assert outcome.success, (wf, outcome.error)
        assert outcome.plan is not None and outcome.plan.version == 2
        assert list(outcome.step_results) == STEPS
    dispatched: Counter[tuple[str, str]] = Counter()
    for topic in app.topics.tasks.values():
        for record in await read_all(settings, [topic.name]):
            task = await codec.decode(topic, record.value or b"")
            dispatched[(task.workflow_id, task.step_id)] += 1  # type: ignore[attr-defined]
    assert set(dispatched) == {(j.workflow_id, s) for j in jobs for s in STEPS}
    assert {k: dispatched[k] for k in done_before} == dict.fromkeys(done_before, 1)
    assert max(dispatched.values()) <= 2, dispatched.most_common(5)
