"""A worker replica killed by pid: the supervisor reports it dead, its tasks finish on
the survivors, and a restart under the same worker id rejoins."""

from __future__ import annotations

from pathlib import Path

from mesh import Mesh, apply_topics
from mesh.patterns.supervision.supervisor import Supervisor, SupervisorEvent, SupervisorPolicy
from mesh.views.workers import load_workers
from tests.apps.supervision import build
from tests.conftest import BrokerUnderTest
from tests.integration.test_supervision import (
    decoded,
    holding,
    jobs_of,
    results_for,
    stop_all,
    submit,
    until,
)
from tests.support import AgentProcess


async def test_kill_9_of_a_worker_is_reported_dead_and_nothing_is_lost(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: with three `mesh run` workers on 60 slow jobs, w2 killed -9 once a few
    results are in: a worker_dead event names w2 and its row says dead; every job has a
    result (set equality) from the survivors or from w2 before the kill; restarted under
    the same id, w2 joins again as a new instance; survivors keep their pids; every
    process exits 0 on SIGTERM."""
    topics, results = build(prefix)
    settings = broker.settings()
    await apply_topics(settings.kafka, [*topics.all(), results])
    # dead after 10 s without a heartbeat (every 0.5 s): a loaded CI machine with a
    # three-node cluster delays heartbeats by seconds, and a live worker must not read dead
    supervisor = Supervisor(topics, SupervisorPolicy(dead_after_s=10, check_every_s=0.2))
    log = (tmp_path / "workers.log").open("wb")
    procs = {wid: AgentProcess(broker, "tests.apps.supervision:app", prefix=prefix, log=log,
                               env={"MESH_WORKER_ID": wid}) for wid in ("w1", "w2", "w3")}
    pids = {wid: p.start().pid for wid, p in procs.items()}
    try:
        async with Mesh(settings, [supervisor.agent]) as mesh:
            await mesh.wait_assigned()
            await until(lambda: holding(supervisor, list(procs), 3),
                        "three workers holding the three task partitions", timeout=120)
            first = supervisor.latest["w2"].instance
            jobs = jobs_of(60, effort_ms=150)
            await submit(settings, topics.tasks, jobs)
            await until(lambda: supervisor.latest["w2"].tasks_done >= 3, "w2 at work")
            procs["w2"].kill9()
            await until(lambda: supervisor.latest["w2"].status == "dead", "w2 reported dead")

            async def row_dead() -> bool:
                rows = {r.worker_id: r for r in await load_workers(settings.kafka, topics.status)}
                return rows["w2"].status == "dead"

            await until(row_dead, "w2 dead in the workers table")
            found = await results_for(settings, results, {j.job_id for j in jobs})
            procs["w2"].start()
            await until(lambda: supervisor.latest["w2"].instance != first
                        and supervisor.latest["w2"].status == "idle", "w2 back", timeout=120)
        assert procs["w1"].pid == pids["w1"] and procs["w3"].pid == pids["w3"]
    finally:
        codes = stop_all(procs)
        log.close()
    assert codes == {"w1": 0, "w2": 0, "w3": 0}, (tmp_path / "workers.log").read_text()[-5000:]
    assert {r.job_id for r in found} == {j.job_id for j in jobs}
    events = [e for e, _ in await decoded(settings, topics.events)
              if isinstance(e, SupervisorEvent)]
    kinds = [(e.kind, e.worker_id) for e in events]
    assert kinds.count(("worker_dead", "w2")) == 1
    assert kinds.count(("worker_joined", "w2")) == 2
    assert not [k for k in kinds if k[1] != "w2" and k[0] != "worker_joined"]
    dead = next(e for e in events if e.kind == "worker_dead")
    assert f"pid {pids['w2']}" in dead.detail
    rows = {r.worker_id: r for r in await load_workers(settings.kafka, topics.status)}
    assert rows["w2"].pid == procs["w2"].pid and rows["w2"].status == "idle"
