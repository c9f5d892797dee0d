"""Supervisor with workers: three worker replicas share the ``workers.jobs`` group; w3's
model endpoint is down, so every job it takes fails.

w3 stops taking work itself the moment its third job in a row fails (max_failures=3):
it pauses, finishes what it holds, commits and leaves the group (its partition, with
the jobs it had fetched but not started, moves to w1 and w2) and keeps heartbeating as
quarantined. So it fails exactly 3 jobs (one partition, one job at a time). The
supervisor records the failure and the quarantine, and re-queues w3's failed jobs,
after a delay, to partitions the healthy workers hold. The example
sends 30 jobs, waits for all 30 results, then prints the workers table (what
``mesh workers`` shows), the supervisor's events and who did what.

    .venv/bin/python -m examples.supervision
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from rich.console import Console
from rich.table import Table

from mesh import Codec, Context, EmbeddedBroker, Emitter, Mesh, MeshSettings, apply_topics
from mesh.kafka.reader import TopicReader
from mesh.patterns.supervision.supervisor import (
    Supervisor,
    SupervisorEvent,
    SupervisorPolicy,
    WorkerService,
)
from mesh.views.workers import load_workers, render_workers
from topics.supervision import Job, JobResult, jobs, pool, results

console = Console()
JOBS = [Job(job_id=f"job-{n:02d}", prompt=f"summarise report {n}", effort_ms=40)
        for n in range(30)]


def answerer(worker_id: str, *, endpoint_down: bool = False
             ) -> Callable[[Job, Context], Awaitable[JobResult]]:
    """The task function of one replica (a stand-in for an LLM call)."""
    async def answer(job: Job, ctx: Context) -> JobResult:
        if endpoint_down:
            raise ConnectionError(f"{worker_id}: model endpoint unreachable")
        await asyncio.sleep(job.effort_ms / 1000)
        return JobResult(job_id=job.job_id, worker_id=worker_id,
                         answer=f"{job.prompt}: done")
    return answer


async def send(settings: MeshSettings) -> None:
    async with Emitter(settings, source="example") as emitter:
        await emitter.emit(jobs, JOBS)


async def collect(settings: MeshSettings, timeout: float = 120.0) -> dict[str, JobResult]:
    codec, found = Codec(), dict[str, JobResult]()
    deadline = time.monotonic() + timeout
    async with TopicReader(settings.kafka, [results.name]) as reader:
        async for record in reader.follow(idle_timeout=timeout):
            result = await codec.decode(results, record.value or b"")
            assert isinstance(result, JobResult)
            found.setdefault(result.job_id, result)
            if len(found) == len(JOBS) or time.monotonic() > deadline:
                break
    return found


async def wait_for(condition: Callable[[], object], what: str, timeout: float = 90.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            console.print(f"[red]timed out waiting for {what}[/red]")
            return False
        await asyncio.sleep(0.1)
    return True


async def show_events(settings: MeshSettings) -> None:
    codec = Codec()
    async with TopicReader(settings.kafka, [pool.events.name]) as reader:
        records = await reader.read_to_end(timeout=30)
    events = [await codec.decode(pool.events, r.value or b"") for r in records]
    table = Table(title="Supervisor events (mesh tap workers.events)")
    for column in ("kind", "worker", "task", "detail"):
        table.add_column(column)
    for event in sorted((e for e in events if isinstance(e, SupervisorEvent)),
                        key=lambda e: e.at_ms):
        table.add_row(event.kind, event.worker_id or "-", event.task_id or "-",
                      event.detail[:70])
    console.print(table)


async def run(settings: MeshSettings) -> int:
    await apply_topics(settings.kafka, [*pool.all(), results])
    workers = [WorkerService(pool, answerer(wid, endpoint_down=wid == "w3"), produces=results,
                             worker_id=wid, heartbeat_s=0.5, max_failures=3)
               for wid in ("w1", "w2", "w3")]
    supervisor = Supervisor(pool, SupervisorPolicy(
        max_failures=3, dead_after_s=15, check_every_s=0.25, requeue_delay_s=0.5,
        requeue_delay_max_s=4))
    meshes = [Mesh(settings, w.app.agents) for w in workers] + [Mesh(settings,
                                                                       [supervisor.agent])]
    for mesh in meshes:
        await mesh.start()
    try:
        for mesh in meshes:
            await mesh.wait_assigned()
        ready = await wait_for(lambda: all(
            supervisor.latest.get(w.worker_id) and supervisor.latest[w.worker_id].partitions
            for w in workers), "three workers holding partitions")
        lanes = len(supervisor.latest["w3"].partitions) if ready else 1  # jobs w3 runs at once
        console.print(f"3 workers and a supervisor running; sending {len(JOBS)} jobs")
        await send(settings)
        found = await collect(settings)
        quarantined = await wait_for(
            lambda: supervisor.latest["w3"].status == "quarantined", "w3 quarantined")
        console.print(render_workers(await load_workers(settings.kafka, pool.status)))
        await show_events(settings)
    finally:
        for mesh in meshes:
            try:
                await asyncio.wait_for(mesh.stop(), timeout=20)
            except TimeoutError:
                console.print("[yellow]a mesh did not stop within 20 s; cancelled[/yellow]")
    done_by = Counter(r.worker_id for r in found.values())
    console.print(f"results: {len(found)}/{len(JOBS)} jobs done "
                  f"({', '.join(f'{w}: {n}' for w, n in sorted(done_by.items()))}); "
                  f"w3 {'quarantined' if quarantined else 'NOT quarantined'} after "
                  f"{workers[2].tasks_failed} failed jobs (limit 3)")
    # The bound: the limit, plus the jobs w3 had already started on its other partitions.
    ok = (ready and quarantined and len(found) == len(JOBS) and "w3" not in done_by
          and 3 <= workers[2].tasks_failed <= 3 + lanes - 1)
    return 0 if ok else 1


def main() -> int:
    logging.basicConfig(level=logging.ERROR)  # the broken worker's warnings are the story
    with EmbeddedBroker() as broker:
        console.print(f"embedded broker on {broker.bootstrap} (pid {broker.pid})")
        settings = MeshSettings().with_bootstrap(broker.bootstrap, embedded=True)
        return asyncio.run(run(settings))


if __name__ == "__main__":
    raise SystemExit(main())
