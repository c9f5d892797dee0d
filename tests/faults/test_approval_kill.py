"""A step waiting for approval survives a kill -9 of the coordinator (a `mesh run`
process): the wait is in the compacted workflows topic, the restarted coordinator
applies `mesh approve` and its timer still enforces the deadline."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mesh import Codec, Mesh, apply_topics
from mesh.patterns.delegation.coordinator import WorkflowState
from mesh.state import CompactedTable
from tests.apps.delegation import Job, build, outcomes_of, request_records
from tests.conftest import BrokerUnderTest
from tests.integration.test_approval import APP, asked, decoded, dispatched, wait_for_events
from tests.integration.test_cli import Cli
from tests.support import AgentProcess, inject, wait_for_count


async def test_an_approval_wait_survives_kill_9_of_the_coordinator(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path, mesh_cli: list[str]) -> None:
    """Pass: two reports whose analyse step asks for approval (one with a 20 s
    deadline). Once both asked, the coordinator is killed -9: the workflows table holds
    both waits and no analyse task exists. Restarted (a new pid), both approval requests
    are on the approvals topic (sent before the crash, or re-sent by the redelivered
    input that asked); it dispatches analyse of `held` on `mesh approve` (exactly once)
    and `held` completes; `timed` is rejected by the restarted coordinator's timer at
    its deadline with its research results; each approval request was published at
    most twice (a re-sent one carries the same event id); the coordinator stops with
    exit code 0."""
    app = build(prefix)
    settings, codec = broker.settings(), Codec()
    cli = Cli(tuple(mesh_cli), broker.env(MESH_TEST_PREFIX=prefix))
    await apply_topics(settings.kafka, app.topics.all())
    log_path = tmp_path / "coordinator.log"
    log = log_path.open("wb")
    coordinator = AgentProcess(broker, f"{APP}:coordinator", prefix=prefix, log=log).start()
    try:
        async with Mesh(settings, app.specialists) as mesh:
            await mesh.wait_assigned()
            jobs = [Job(workflow_id="held", approval_step="analyse"),
                    Job(workflow_id="timed", approval_step="analyse", approval_timeout_s=20)]
            records, correlations = request_records(codec, app.topics, jobs)
            await inject(settings, records)
            await wait_for_events(settings, codec, app.topics, asked(["held", "timed"]),
                                  timeout=120)
            first_pid = coordinator.pid
            coordinator.kill9()
            table = CompactedTable(app.topics.workflows, settings.kafka, codec)
            await table.restore()
            states: dict[str, WorkflowState] = dict(table.items())
            assert {wf: s.waiting() for wf, s in states.items()} == {
                "held": ["analyse"], "timed": ["analyse"]}
            assert "analyse" not in {s for _, s in await dispatched(settings, codec, app.topics)}
            coordinator.start()
            # Each request is on the topic: sent before the crash, or re-sent by the
            # redelivered input that asked. Approving only then keeps the decision from
            # overtaking that input (they come from different topics), which would leave
            # nothing to re-send and the request unpublished.
            await wait_for_count(settings, [app.topics.approvals.name], 2)
            await cli.ok("approve", "held", "analyse", "--by", "ana", "-t", APP)
            outcomes = await outcomes_of(settings, codec, app.topics, set(correlations),
                                         timeout=120)
        assert coordinator.pid != first_pid and coordinator.alive()
    finally:
        code = coordinator.terminate()
        log.close()
    assert code == 0, log_path.read_text()[-3000:]
    assert outcomes["held"].success, outcomes["held"].error
    timed = outcomes["timed"]
    assert (timed.success, timed.error) == (False, "Step 'analyse' (analyst) rejected by "
                                                   "deadline: no decision within 20 s.")
    assert list(timed.step_results) == ["research-a", "research-b"]
    steps = Counter(await dispatched(settings, codec, app.topics))
    assert steps[("held", "analyse")] == 1 and ("timed", "analyse") not in steps
    asks = Counter(r.workflow_id for r in await decoded(settings, codec, app.topics.approvals))
    assert asks.keys() == {"held", "timed"} and max(asks.values()) <= 2
