"""Broker failover on a three-node Apache Kafka cluster: a cluster failing over is not a
lost cluster.

A chain of three `mesh run` processes works under a steady load while brokers of its
cluster are killed -9 or restarted one at a time; the checker must find nothing lost,
no sink duplicates and per-key order kept, and the agents must keep their pids (the
broker watch must not call a failover BrokerLost).

These tests start their own cluster (they kill its nodes, the session's broker must
survive), so they run in the Apache Kafka session only (``MESH_TEST_KAFKA=apache``):
three more JVMs are too much to add to every embedded run on a small machine. In that
session a missing Java or Maven fails them, it never skips them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mesh import ApacheKafka, Codec, apply_topics
from mesh.config import KafkaSettings
from mesh.errors import BrokerUnavailable
from mesh.kafka.admin import Admin
from mesh.kafka.murmur import partition_for
from mesh.testing.checker import check
from tests.apps.stages import Item, build
from tests.conftest import BrokerUnderTest, _with_mesh_topics
from tests.support import AgentProcess, Progress, encode, history, inject

pytestmark = [
    pytest.mark.apache,
    pytest.mark.skipif(os.environ.get("MESH_TEST_KAFKA") != "apache",
                       reason="broker failover needs its own 3-node Apache Kafka cluster: "
                              "runs with MESH_TEST_KAFKA=apache"),
    pytest.mark.timeout(600),
]

KEYS = 12
BATCH_EVERY_S = 0.25  # one item per key each tick: ~48 items/s, a steady load
REPLICATED_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[ApacheKafka]:
    """A three-node cluster of the module's own, whose nodes the tests kill."""
    kafka = ApacheKafka(nodes=3, heap="384m")
    try:
        await asyncio.to_thread(kafka.start)
    except BrokerUnavailable as exc:
        pytest.fail(f"MESH_TEST_KAFKA=apache but Apache Kafka did not start: {exc}",
                    pytrace=False)
    try:
        yield kafka
    finally:
        await asyncio.to_thread(kafka.stop)


class Load:
    """Injects one item per key every tick, in the background, until stopped; keeps
    every item whose produce was acknowledged (acks=all, through any failover)."""

    def __init__(self, broker: BrokerUnderTest, codec: Codec, source: object) -> None:
        self._settings, self._codec, self._source = broker.settings(), codec, source
        self.items: list[Item] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Load:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            task, self._task = self._task, None
            await task  # raises if a produce failed: acks=all must ride out failover

    async def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            batch = [Item(key=f"k{k}", seq=seq, source_id=f"s{seq}-{k}-{time.time_ns()}",
                          text=f"item {k}/{seq}", sleep_ms=2) for k in range(KEYS)]
            await inject(self._settings, [encode(self._codec, self._source, i)  # type: ignore[arg-type]
                                          for i in batch])
            self.items += batch
            seq += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), BATCH_EVERY_S)


async def _fully_replicated(settings: KafkaSettings, topics: list[str]) -> None:
    """Wait until every partition of ``topics`` has a leader and all replicas in sync."""
    deadline = time.monotonic() + REPLICATED_TIMEOUT_S
    async with Admin(settings) as admin:
        while lagging := await admin.under_replicated(topics):
            if time.monotonic() > deadline:
                raise AssertionError(f"still under-replicated after {REPLICATED_TIMEOUT_S:.0f} "
                                     f"s: {lagging}")
            await asyncio.sleep(0.5)  # poll interval, bounded by the deadline


async def _run_chain_through(cluster: ApacheKafka, prefix: str, tmp_path: Path,
                             faults: Callable[[BrokerUnderTest, Progress, Load, list[str]],
                                              Awaitable[None]]) -> None:
    """The chain as three processes on ``cluster`` under load while ``faults`` runs; then
    the checks every failover test makes."""
    broker = _with_mesh_topics(BrokerUnderTest(cluster.bootstrap, False, "apache-kafka"))
    app = build(prefix)
    settings = broker.settings()
    await apply_topics(settings.kafka, app.topics.values())
    source, sink = app.agents[0].consumes[0], app.agents[2].produces[0]
    codec = Codec()
    path = tmp_path / "agents.log"
    log = path.open("wb")
    procs = {name: AgentProcess(broker, f"tests.apps.stages:{name}", prefix=prefix, log=log)
             for name in ("stage1", "stage2", "stage3")}
    for proc in procs.values():
        proc.start()
    pids = {name: proc.pid for name, proc in procs.items()}
    topics = [t.name for t in app.topics.values()] + ["__consumer_offsets", "mesh.audit"]
    try:
        async with Progress(settings, sink.name) as progress:
            async with Load(broker, codec, source) as load:
                await progress.reached(KEYS * 20, timeout=180)
                await faults(broker, progress, load, topics)
                await progress.reached(len(progress.ids) + KEYS * 20, timeout=180)
            await progress.reached(len(load.items), timeout=240)
        alive = {name: proc.alive() for name, proc in procs.items()}
        assert all(alive.values()), f"agents died: {alive}\n{path.read_text()[-4000:]}"
        assert {name: proc.pid for name, proc in procs.items()} == pids
    finally:
        codes = {name: p.terminate() for name, p in procs.items()}
        log.close()
    output = path.read_text()
    assert "BrokerLost" not in output, output[-4000:]
    assert codes == {"stage1": 0, "stage2": 0, "stage3": 0}, output[-4000:]
    report = check(await history(settings, codec, load.items, sink=sink))
    assert report.ok, report.summary()


def _busiest_partition(partitions: int) -> int:
    """The partition of the chain's topics holding the most keys."""
    counts = Counter(partition_for(f"k{k}".encode(), partitions) for k in range(KEYS))
    return counts.most_common(1)[0][0]


async def test_kill_9_of_the_leader_of_the_busiest_partition_loses_nothing(
        cluster: ApacheKafka, prefix: str, tmp_path: Path) -> None:
    """Pass: under a steady load, the broker leading the busiest partition of stage2's
    input is killed -9 and, once the chain made progress without it, restarted; the
    checker finds nothing lost, no sink duplicates, per-key order kept; the three agents
    keep their pids, none says BrokerLost, each exits 0 on SIGTERM."""
    killed: list[int] = []

    async def faults(broker: BrokerUnderTest, progress: Progress, load: Load,
                     topics: list[str]) -> None:
        topic = f"{prefix}.a"
        leader = await asyncio.to_thread(cluster.leader_of, topic, _busiest_partition(4))
        assert leader is not None, f"{topic} has no leader"
        cluster.kill(leader, signal.SIGKILL)
        killed.append(leader)
        # the chain goes on without it: a new leader, a new group coordinator if needed
        await progress.reached(len(progress.ids) + KEYS * 40, timeout=180)
        moved = await asyncio.to_thread(cluster.leader_of, topic, _busiest_partition(4))
        assert moved not in (None, leader), f"{topic} still led by {moved}"
        await asyncio.to_thread(cluster.restart, leader)
        await _fully_replicated(broker.settings().kafka, topics)

    await _run_chain_through(cluster, prefix, tmp_path, faults)
    assert len(killed) == 1


async def test_rolling_restart_of_every_broker_under_load_loses_nothing(
        cluster: ApacheKafka, prefix: str, tmp_path: Path) -> None:
    """Pass: under a steady load, each of the three brokers in turn is stopped (SIGTERM:
    a controlled shutdown hands its leaderships over) and started again, the next one
    only once every partition is back in sync, as an operator's rolling restart does;
    the chain progresses between restarts; the checker finds nothing lost, no sink
    duplicates, per-key order kept; the agents keep their pids and exit 0."""
    restarted: list[int] = []

    async def faults(broker: BrokerUnderTest, progress: Progress, load: Load,
                     topics: list[str]) -> None:
        for node in sorted(cluster.node_pids):
            await _fully_replicated(broker.settings().kafka, topics)
            await asyncio.to_thread(cluster.restart, node)
            restarted.append(node)
            await progress.reached(len(progress.ids) + KEYS * 10, timeout=180)
        await _fully_replicated(broker.settings().kafka, topics)

    await _run_chain_through(cluster, prefix, tmp_path, faults)
    assert restarted == [1, 2, 3]
