"""Supervisor with workers on a real broker: quarantine, requeue, dead tasks, the table."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka.partitioner import murmur2 as kafka_murmur2
from rich.console import Console

from mesh import Codec, Envelope, Mesh, MeshSettings, Topic, apply_topics
from mesh.kafka.base import OutRecord
from mesh.kafka.reader import TopicReader
from mesh.kafka.transport import Producer
from mesh.patterns.supervision.supervisor import (
    DeadTask,
    Supervisor,
    SupervisorEvent,
    SupervisorPolicy,
    WorkerStatus,
    key_for_partition,
    partition_of,
)
from mesh.views.workers import load_workers, render_workers
from tests.apps.supervision import build, service
from tests.conftest import ROOT, BrokerUnderTest
from tests.support import AgentProcess, read_all
from topics.supervision import Job, JobResult


async def until(condition: Callable[[], Any], what: str, timeout: float = 90.0) -> None:
    """Wait until ``condition()`` (or the awaitable it returns) is true, failing with
    ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not await _value(condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        await asyncio.sleep(0.1)


async def _value(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def submit(settings: MeshSettings, topic: Topic[Job], jobs: Sequence[Job]) -> dict[str, str]:
    """Produce ``jobs`` as an existing system would; returns job id -> correlation id."""
    codec, records, correlations = Codec(), [], {}
    for job in jobs:
        env = Envelope.new(job, source="test", key=topic.key_of(job))
        value, fingerprint = codec.encode(topic, job)
        records.append(OutRecord(topic.name, value, env.key,
                                 tuple(env.with_payload(job, schema=fingerprint).headers())))
        correlations[job.job_id] = env.correlation_id
    async with Producer(settings.kafka) as producer:
        await producer.send_all(records)
    return correlations


async def results_for(settings: MeshSettings, topic: Topic[JobResult], expected: set[str],
                      timeout: float = 180.0) -> list[JobResult]:
    """Every result until each expected job id has one (fails after ``timeout`` s)."""
    codec, found, seen = Codec(), [], set()
    deadline = time.monotonic() + timeout
    async with TopicReader(settings.kafka, [topic.name]) as reader:
        async for record in reader.follow(idle_timeout=timeout):
            result = await codec.decode(topic, record.value or b"")
            assert isinstance(result, JobResult)
            found.append(result)
            seen.add(result.job_id)
            if expected <= seen or time.monotonic() > deadline:
                break
    assert expected <= seen, f"missing results for {sorted(expected - seen)}"
    return found


async def decoded(settings: MeshSettings, topic: Topic[Any]) -> list[tuple[Any, dict[str, str]]]:
    """Every payload of ``topic`` so far, with its headers."""
    codec = Codec()
    return [(await codec.decode(topic, r.value or b""),
             {k: v.decode() for k, v in r.headers})
            for r in sorted(await read_all(settings, [topic.name]),
                            key=lambda r: (r.partition, r.offset))]


def jobs_of(count: int, **fields: Any) -> list[Job]:
    return [Job(job_id=f"job-{n:03d}", prompt=f"job {n}", **fields) for n in range(count)]


def stop_all(procs: dict[str, AgentProcess], timeout: float = 60) -> dict[str, int | None]:
    """SIGTERM each process; its exit code, or None if it ignored SIGTERM (then killed)."""
    codes: dict[str, int | None] = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.terminate(timeout=timeout)
        except AssertionError:
            codes[name] = None
    return codes


def holding(supervisor: Supervisor, workers: Sequence[str], partitions: int) -> bool:
    """Whether each worker heartbeats with partitions and together they hold them all."""
    rows = [supervisor.latest.get(w) for w in workers]
    return all(r is not None and r.partitions for r in rows) and len(
        {p for r in rows if r is not None for p in r.partitions}) == partitions


def test_partition_of_matches_the_kafka_client_so_requeues_land_where_aimed() -> None:
    """Pass: partition_of is the client's murmur2 partitioner on keys of every tail
    length, and a key made for a partition maps to it (the default partitioner of every
    Kafka client)."""
    for key in (b"", b"a", b"ab", b"abc", b"abcd", b"job-007", "jöb-ü".encode() * 7):
        assert partition_of(key, 6) == (kafka_murmur2(key) & 0x7FFFFFFF) % 6, key
    for partition in range(6):
        assert partition_of(key_for_partition("job-1", partition, 6), 6) == partition


async def test_failing_worker_stops_itself_at_max_failures_and_its_tasks_finish_elsewhere(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: three `mesh run` worker processes (w3 fails every task) and a supervisor,
    max_failures=3; w3 fails exactly 3 tasks plus at most the tasks whose handlers were
    already running when it hit the limit (concurrency - 1: with the default
    concurrency of 1, exactly 3; before the worker stopped itself it failed 8-12
    while the supervisor's order travelled); all 60 jobs have a
    result at the sink (set equality), none from w3; w3 gets one worker_failed, then
    reports quarantined, holds no partition, keeps its pid and keeps heartbeating;
    requeue events carry the jobs' correlation ids; nothing is dead; every process
    exits 0 on SIGTERM."""
    topics, results = build(prefix)
    settings = broker.settings()
    await apply_topics(settings.kafka, [*topics.all(), results])
    supervisor = Supervisor(topics, SupervisorPolicy(
        max_failures=3, dead_after_s=30, check_every_s=0.2, requeue_delay_s=0.5,
        requeue_delay_max_s=4, max_task_workers=3, max_task_attempts=12))
    log = (tmp_path / "workers.log").open("wb")
    procs = {wid: AgentProcess(broker, "tests.apps.supervision:app", prefix=prefix, log=log,
                               env={"MESH_WORKER_ID": wid,
                                    "MESH_TEST_WORKER_FAILS": "1" if wid == "w3" else "0"})
             for wid in ("w1", "w2", "w3")}
    pids = {wid: p.start().pid for wid, p in procs.items()}
    try:
        async with Mesh(settings, [supervisor.agent]) as mesh:
            await mesh.wait_assigned()
            await until(lambda: holding(supervisor, list(procs), 3),
                        "three workers holding the three task partitions", timeout=120)
            lanes = 1  # handlers w3 may run at once: WorkerService(concurrency=1)
            jobs = jobs_of(60)
            correlations = await submit(settings, topics.tasks, jobs)
            found = await results_for(settings, results, {j.job_id for j in jobs})
            await until(lambda: supervisor.latest["w3"].status == "quarantined"
                        and not supervisor.latest["w3"].partitions, "w3 quarantined")
            pending = mesh.runners[0].tables[topics.retries.name]
            await until(lambda: len(pending) == 0, "every requeued job recovered")
            quarantined_at = supervisor.latest["w3"].heartbeat_ms
            await until(lambda: supervisor.latest["w3"].heartbeat_ms > quarantined_at + 1000,
                        "w3 heartbeating while quarantined")
        assert {wid: p.pid for wid, p in procs.items()} == pids
        assert all(p.alive() for p in procs.values())
        procs["w3"].kill9()  # its SIGTERM: test_quarantined_worker_exits_0_on_sigterm
    finally:
        codes = stop_all(procs)
        log.close()
    assert codes == {"w1": 0, "w2": 0, "w3": -9}, (tmp_path / "workers.log").read_text()[-5000:]
    assert {r.job_id for r in found} == {j.job_id for j in jobs}
    assert {r.worker_id for r in found} <= {"w1", "w2"}

    events = [(e, h) for e, h in await decoded(settings, topics.events)
              if isinstance(e, SupervisorEvent)]
    kinds = [(e.kind, e.worker_id) for e, _ in events]
    assert kinds.count(("worker_failed", "w3")) == 1
    assert ("worker_quarantined", "w3") in kinds
    assert {("worker_joined", w) for w in ("w1", "w2", "w3")} <= set(kinds)
    assert not {k for k, w in kinds if w in ("w1", "w2") and k.startswith("worker_")
                and k != "worker_joined"}
    failed = next(e for e, _ in events if e.kind == "worker_failed")
    assert failed.failures == 3 + lanes - 1
    w3_failed = [o for o, _ in await decoded(settings, topics.outcomes)
                 if o.worker_id == "w3" and not o.ok and not o.handed_back]
    assert len(w3_failed) == 3 + lanes - 1, (
        f"w3 failed {len(w3_failed)} tasks holding {lanes} partition(s); limit 3")
    requeued = [(e, h) for e, h in events if e.kind == "task_requeued"]
    assert requeued and all(e.worker_id == "w3" for e, _ in requeued)
    assert all(h["mesh-correlation"] == correlations[e.task_id] for e, h in requeued)
    recovered = {e.task_id for e, _ in events if e.kind == "task_recovered"}
    assert recovered == {e.task_id for e, _ in requeued}
    assert not await read_all(settings, [topics.dead.name])

    rows = {r.worker_id: r for r in await load_workers(settings.kafka, topics.status)}
    assert rows["w3"].status == "quarantined"
    assert rows["w3"].tasks_failed == rows["w3"].consecutive_failures == len(w3_failed)
    assert rows["w3"].tasks_done == 0 and rows["w1"].tasks_done + rows["w2"].tasks_done >= 60
    assert {r.pid for r in rows.values()} == set(pids.values())
    console = Console(record=True, width=160)
    console.print(render_workers(rows.values()))
    text = console.export_text()
    assert "w3" in text and "quarantined" in text and "s ago" in text
    shown = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "workers", "-t", "tests.apps.supervision"],
        env=broker.env(MESH_TEST_PREFIX=prefix, COLUMNS="160"), cwd=ROOT,
        capture_output=True, timeout=120, check=False)
    assert shown.returncode == 0, shown.stderr.decode()
    lines = shown.stdout.decode().splitlines()
    assert any("w3" in line and "quarantined" in line for line in lines)
    assert sum(("w1" in line or "w2" in line) and "idle" in line for line in lines) == 2


async def test_quarantined_worker_exits_0_on_sigterm(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: a `mesh run` worker with no limit of its own, quarantined by the
    supervisor's order (it failed its first task, max_failures=1), still stops
    cleanly, with exit code 0, on SIGTERM."""
    topics, results = build(prefix)
    settings = broker.settings()
    await apply_topics(settings.kafka, [*topics.all(), results])
    supervisor = Supervisor(topics, SupervisorPolicy(max_failures=1, check_every_s=0.2))
    log = (tmp_path / "worker.log").open("wb")
    proc = AgentProcess(broker, "tests.apps.supervision:app", prefix=prefix, log=log,
                        env={"MESH_WORKER_ID": "q1", "MESH_TEST_WORKER_FAILS": "1",
                             "MESH_TEST_MAX_FAILURES": "none"}).start()
    try:
        async with Mesh(settings, [supervisor.agent]) as mesh:
            await mesh.wait_assigned()
            await until(lambda: holding(supervisor, ["q1"], 3), "q1 holding 3 partitions")
            await submit(settings, topics.tasks, jobs_of(1))
            await until(lambda: supervisor.latest["q1"].status == "quarantined"
                        and not supervisor.latest["q1"].partitions, "q1 quarantined")
    finally:
        codes = stop_all({"q1": proc}, timeout=20)
        log.close()
    assert codes == {"q1": 0}


async def test_task_failing_on_two_workers_goes_to_the_dead_task_topic(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: with two in-process workers, a poison job is requeued to the partition of
    the worker that has not failed it, fails there too and lands on the dead-task topic
    naming both workers; the 20 other jobs complete; nobody is quarantined (the
    poison costs each worker one failure, reset by its next success)."""
    topics, results = build(prefix)
    settings = broker.settings()
    await apply_topics(settings.kafka, [*topics.all(), results])
    supervisor = Supervisor(topics, SupervisorPolicy(
        max_failures=3, dead_after_s=30, check_every_s=0.2, requeue_delay_s=0.3,
        max_task_workers=2, max_task_attempts=6))
    workers = [service(prefix, worker_id=wid, heartbeat_s=0.3) for wid in ("a", "b")]
    meshes = [Mesh(settings, w.app.agents) for w in workers]
    async with Mesh(settings, [supervisor.agent]):
        for mesh in meshes:
            await mesh.start()
        try:
            for mesh in meshes:
                await mesh.wait_assigned()
            await until(lambda: holding(supervisor, ["a", "b"], 3), "a and b holding 3 partitions")
            jobs = [*jobs_of(20), Job(job_id="job-poison", prompt="poison")]
            correlations = await submit(settings, topics.tasks, jobs)
            await results_for(settings, results, {j.job_id for j in jobs[:-1]})
            dead: list[DeadTask] = []

            async def poll_dead() -> bool:
                dead[:] = [d for d, _ in await decoded(settings, topics.dead)]
                return bool(dead)

            await until(poll_dead, "the poison job on the dead-task topic")
        finally:
            for mesh in meshes:
                await mesh.stop()
    assert [d.task_id for d in dead] == ["job-poison"]
    assert sorted(dead[0].failed_on) == ["a", "b"] and dead[0].failures == 2
    assert "limit 2" in dead[0].reason and dead[0].task["prompt"] == "poison"
    events = [(e, h) for e, h in await decoded(settings, topics.events)]
    kinds = {e.kind for e, _ in events}
    assert "task_dead_lettered" in kinds and "worker_failed" not in kinds
    lettered = next(h for e, h in events if e.kind == "task_dead_lettered")
    assert lettered["mesh-correlation"] == correlations["job-poison"]


@pytest.mark.parametrize("age_s, stale", [(1.0, False), (60.0, True)])
def test_workers_table_shows_each_column_and_flags_stale_heartbeats(
        age_s: float, stale: bool) -> None:
    """Pass: the table has the worker, status, task, failures, done, throughput,
    partitions and heartbeat age; an old heartbeat of a live worker is marked stale."""
    now = 1_000_000
    row = WorkerStatus(worker_id="w9", status="busy", current_task="job-7",
                       consecutive_failures=2, tasks_done=41, throughput=1.25,
                       partitions=[0, 2], heartbeat_ms=now - int(age_s * 1000))
    console = Console(record=True, width=200)
    console.print(render_workers([row], now_ms=now, stale_after_s=10))
    text = console.export_text()
    for cell in ("w9", "busy", "job-7", "2", "41", "1.25", "0,2", f"{age_s:.1f}s ago"):
        assert cell in text
    assert ("stale" in text) is stale


def test_task_topic_without_a_key_is_refused() -> None:
    """Pass: workers name tasks by the key field; a keyless task topic fails early."""
    from mesh.errors import ConfigError
    from mesh.patterns.supervision.supervisor import WorkerTopics

    with pytest.raises(ConfigError, match="no key field"):
        WorkerTopics.named("x", Topic("x.jobs", Job))

