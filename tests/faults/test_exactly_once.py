"""Exactly-once agents (Kafka transactions): on Apache Kafka, and refused elsewhere.

The transactional tests need a broker with transactions: they run with
``MESH_TEST_KAFKA=apache`` (or a configured cluster) and are skipped, with the reason,
on the embedded broker. The refusal tests start their own embedded broker, so they run
in every session.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import BaseModel

from mesh import Agent, Codec, Context, EmbeddedBroker, Mesh, MeshSettings, Topic, apply_topics
from mesh.agent import Ordering
from mesh.errors import ConfigError, Held, TransportError
from mesh.kafka.base import OutRecord, Partition
from mesh.kafka.reader import TopicReader
from mesh.kafka.transactional import TransactionalProducer
from mesh.kafka.transport import Consumer
from mesh.runtime.transactions import exactly_once, transactional_id
from mesh.testing.checker import check
from tests.apps import overlap
from tests.apps.stages import Item, build
from tests.conftest import ROOT, BrokerUnderTest
from tests.support import AgentProcess, Progress, encode, history, inject, make_items


def needs_transactions(broker: BrokerUnderTest) -> None:
    if broker.embedded:
        pytest.skip("exactly-once needs Kafka transactions; the embedded broker has none "
                    "(InitProducerId fails): run with MESH_TEST_KAFKA=apache")


def read_committed(settings: MeshSettings) -> MeshSettings:
    kafka = settings.kafka.model_copy(update={"isolation_level": "read_committed"})
    return settings.model_copy(update={"kafka": kafka})


async def read(settings: MeshSettings, topic: str, isolation: str) -> list[tuple[int, int]]:
    """(partition, offset) of every record of ``topic`` a reader with ``isolation`` sees."""
    async with TopicReader(settings.kafka, [topic],
                           isolation_level=isolation) as reader:  # type: ignore[arg-type]
        return [(r.partition, r.offset) for r in await reader.read_to_end(timeout=60)]


async def open_transactions(settings: MeshSettings, topic: str, partitions: int) -> list[int]:
    """The partitions of ``topic`` holding records of a transaction that is open now: a
    read_committed ListOffsets (the last stable offset) below the high watermark. Asked
    of the broker itself: a follower's view of it lags by a fetch."""
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    ends: dict[str, dict[TopicPartition, int]] = {}
    for isolation in ("read_uncommitted", "read_committed"):  # the high watermark first
        consumer = AIOKafkaConsumer(**settings.kafka.client_kwargs(),
                                    isolation_level=isolation)
        await consumer.start()
        try:
            ends[isolation] = await consumer.end_offsets(tps)
        finally:
            await consumer.stop()
    return [tp.partition for tp in tps
            if ends["read_committed"][tp] < ends["read_uncommitted"][tp]]


async def until_open(settings: MeshSettings, topic: str, partitions: int,
                     timeout: float = 20.0) -> bool:
    """Wait until a transaction with records on ``topic`` is open; False if none was
    within ``timeout`` (the writer may have no input left: the caller kills anyway, and
    counts afterwards whether the kill left a transaction open)."""
    deadline = time.monotonic() + timeout
    while not await open_transactions(settings, topic, partitions):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)  # ListOffsets has no change event: ask again, bounded
    return True


async def kill9_mid_transaction(proc: AgentProcess, settings: MeshSettings,
                                topic: Topic[Any]) -> bool:
    """Kill ``proc`` -9 once a transaction of it with records on ``topic`` is open; whether
    the kill left one open. Asked right after it: nothing of the killed producer commits
    or aborts until its restart fences it. It can still miss: a commit may land between
    the broker's answer and the signal, and the next transaction not have written yet."""
    await until_open(settings, topic.name, topic.partitions)
    proc.kill9()
    return bool(await open_transactions(settings, topic.name, topic.partitions))


async def assigned_times(log: Path, agent: str, times: int, timeout: float = 120.0) -> None:
    """Wait until the agents' log shows ``agent`` assigned partitions ``times`` times."""
    deadline = time.monotonic() + timeout
    while log.read_text().count(f"agent {agent} assigned") < times:
        assert time.monotonic() < deadline, f"{agent} not assigned {times} times: {log}"
        await asyncio.sleep(0.2)  # a file has no change event: poll it, within the deadline


class Count(BaseModel):
    key: str
    seen: int


def counting(prefix: str) -> tuple[Agent[Item], Topic[Item], Topic[Count], Topic[Item]]:
    inbox = Topic(f"{prefix}.in", Item, key="key", partitions=2)
    counts = Topic(f"{prefix}.counts", Count, key="key", partitions=2, compacted=True)
    out = Topic(f"{prefix}.out", Item, key="key", partitions=2)

    async def count(item: Item, ctx: Context) -> Item:
        current = ctx.get(counts, item.key)
        seen = (current.seen if current else 0) + 1
        ctx.put(counts, item.key, Count(key=item.key, seen=seen))
        return item.model_copy(update={"hops": [f"seen={seen}"]})

    agent = Agent(f"{prefix}-counter", consumes=inbox, produces=out, handler=count,
                  state=[counts], exactly_once=True)
    return agent, inbox, counts, out


def test_the_agent_setting_overrides_the_global_one() -> None:
    """Pass: Agent(exactly_once=None) follows MESH_RUNTIME__EXACTLY_ONCE, True/False win
    over it; transactional ids are <group>-<topic>-<partition>."""
    inbox = Topic("eos.in", Item, key="key")
    on = MeshSettings(runtime={"exactly_once": True})  # type: ignore[arg-type]
    off = MeshSettings()
    follows = Agent("a", consumes=inbox)
    assert (exactly_once(follows, on), exactly_once(follows, off)) == (True, False)
    assert exactly_once(Agent("b", consumes=inbox, exactly_once=False), on) is False
    assert exactly_once(Agent("c", consumes=inbox, exactly_once=True), off) is True
    assert transactional_id("g", Partition("eos.in", 3)) == "g-eos.in-3"


async def test_the_embedded_broker_refuses_an_exactly_once_agent(prefix: str) -> None:
    """Pass: starting an Agent(exactly_once=True) on the embedded broker fails at once
    with a ConfigError naming the agent, the setting and the fix, before any input."""
    inbox = Topic(f"{prefix}.in", Item, key="key", partitions=1)

    async def handle(item: Item, ctx: Context) -> None:
        raise AssertionError("an exactly-once agent ran on a broker without transactions")

    agent = Agent(f"{prefix}-eos", consumes=inbox, handler=handle, exactly_once=True)
    async with EmbeddedBroker() as embedded:
        settings = MeshSettings().with_bootstrap(embedded.bootstrap, embedded=True)
        with pytest.raises(ConfigError) as refused:
            await Mesh(settings, [agent], create_topics=True).run()
    message = str(refused.value)
    for part in (agent.name, "exactly_once=True", "MESH_RUNTIME__EXACTLY_ONCE",
                 "embedded broker", "Apache Kafka"):
        assert part in message, message


def test_mesh_run_refuses_the_global_setting_on_the_embedded_broker(
        prefix: str, mesh_cli: list[str]) -> None:
    """Pass: `mesh run` with MESH_RUNTIME__EXACTLY_ONCE=true and no cluster (so on its
    embedded broker) exits with code 1 and an error naming the setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(PYTHONPATH=str(ROOT), MESH_TEST_PREFIX=prefix, MESH_METRICS__ENABLED="false",
               MESH_RUNTIME__EXACTLY_ONCE="true")
    done = subprocess.run([*mesh_cli, "run", "tests.apps.stages:stage1"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "ConfigError" in done.stderr and "MESH_RUNTIME__EXACTLY_ONCE" in done.stderr, \
        done.stderr


async def test_an_aborted_transaction_commits_no_output_state_or_offset(
        broker: BrokerUnderTest, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass: when the commit of its transaction fails, an exactly-once agent aborts it
    and stops: its outputs and state writes were written (a read_uncommitted reader sees
    them) but a read_committed reader sees none, and the group's offsets did not move.
    Run again, it handles every input once: each output once, the counts in the state
    topic exactly the inputs per key (the aborted writes did not count)."""
    needs_transactions(broker)
    agent, inbox, counts, out = counting(prefix)
    settings = read_committed(broker.settings())
    await apply_topics(settings.kafka, [inbox, counts, out])
    codec = Codec()
    items = make_items(keys=4, per_key=5)
    await inject(settings, [encode(codec, inbox, i) for i in items])

    async def refuse(self: AIOKafkaProducer) -> None:
        raise KafkaError("injected: the commit is refused")

    monkeypatch.setattr(AIOKafkaProducer, "commit_transaction", refuse)
    with pytest.raises(TransportError, match="aborted"):
        async with asyncio.timeout(90):  # the failed commit stops it at once
            await Mesh(settings, [agent]).run()
    monkeypatch.undo()
    for topic in (out.name, counts.name):
        assert await read(settings, topic, "read_uncommitted"), f"{topic}: nothing written"
        assert await read(settings, topic, "read_committed") == [], topic
    async with Consumer(settings.kafka, group_id=agent.group) as group:
        assert [await group.committed(Partition(inbox.name, p)) for p in (0, 1)] == [None, None]

    async with Mesh(settings, [agent]) as mesh:
        await mesh.wait_assigned()
        async with Progress(settings, out.name) as progress:
            await progress.reached(len(items), timeout=60)
    async with TopicReader(settings.kafka, [out.name]) as reader:
        ids = [dict(r.headers)["mesh-event-id"] for r in await reader.read_to_end()]
    assert len(ids) == len(set(ids)) == len(items)
    async with TopicReader(settings.kafka, [counts.name]) as reader:
        latest = {}
        for record in await reader.read_to_end():
            latest[record.key] = await codec.decode(counts, record.value or b"")
    assert {k: v.seen for k, v in latest.items()} == {f"k{k}".encode(): 5 for k in range(4)}
    ends = await read(settings, inbox.name, "read_committed")
    async with Consumer(settings.kafka, group_id=agent.group) as group:
        committed = [await group.committed(Partition(inbox.name, p)) for p in (0, 1)]
    assert committed == [1 + max((o for p, o in ends if p == q), default=-1) for q in (0, 1)]


async def test_a_transactions_gathered_records_are_committed_or_aborted_with_it(
        broker: BrokerUnderTest, prefix: str) -> None:
    """The transactional producer gathers its records into batches as the other
    producers do. Pass: records sent without waiting for their acks and committed at
    once are all in the committed log, in each partition in the order sent and each at
    its ack's offset; records sent and aborted at once are in the log but never seen
    read_committed; a send outside a transaction fails its ack. Fail: commit() or abort()
    ends the transaction while batches are still on their way to aiokafka."""
    needs_transactions(broker)
    topic = Topic(f"{prefix}.txn", Item, key="key", partitions=2)
    settings = broker.settings()
    await apply_topics(settings.kafka, [topic])
    kept = [OutRecord(topic.name, f"kept-{i}".encode(), f"k{i % 5}".encode()) for i in range(200)]
    dropped = [OutRecord(topic.name, f"dropped-{i}".encode(), f"k{i % 5}".encode())
               for i in range(50)]
    async with TransactionalProducer(settings.kafka, f"{prefix}-txn") as producer:
        await producer.begin()
        acks = await producer.send_many(kept)
        await producer.commit({}, f"{prefix}-group")
        landed = await acks.wait()
        await producer.begin()
        await producer.send_many(dropped)
        await producer.abort()
        ack = await producer.send(OutRecord(topic.name, b"outside", b"k0"))
        with pytest.raises(TransportError, match="not in transaction"):
            await ack
    async with TopicReader(settings.kafka, [topic.name],
                           isolation_level="read_committed") as reader:
        committed = await reader.read_to_end(timeout=60)
    for partition in (0, 1):  # each partition's records in the order they were sent
        assert [r.value for r in committed if r.partition == partition] == [
            r.value for r, (p, _) in zip(kept, landed, strict=True) if p == partition]
    assert {(r.partition, r.offset): r.value for r in committed} == {
        where: r.value for r, where in zip(kept, landed, strict=True)}
    everything = await read(settings, topic.name, "read_uncommitted")
    assert len(everything) == len(kept) + len(dropped)


async def test_kill_9_mid_transaction_leaves_no_duplicate_in_the_committed_log(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: a chain of three exactly-once `mesh run` processes (MESH_RUNTIME__
    EXACTLY_ONCE=true) under load, stage2 killed -9 at 20 %, 50 % and 80 % of its
    committed output, each once a transaction of it was seen open, and restarted, each
    restart in its group before the next kill: a read_committed reader of the output
    finds nothing lost, per-key order kept and zero duplicates in the log (the checker's
    log duplicates), while stage2's output topic holds aborted records (a kill did hit
    an open transaction, as the broker's offsets right after it show)."""
    needs_transactions(broker)
    app = build(prefix)
    settings = read_committed(broker.settings())
    await apply_topics(settings.kafka, app.topics.values())
    source, middle, sink = (app.agents[0].consumes[0], app.agents[1].produces[0],
                            app.agents[2].produces[0])
    items = [i.model_copy(update={"sleep_ms": 2}) for i in make_items(keys=12, per_key=150)]
    codec = Codec()
    log = (tmp_path / "agents.log").open("wb")
    env = {"MESH_RUNTIME__EXACTLY_ONCE": "true"}
    # stage2's transactions last up to 1 s (not 100 ms), so one is open most of the time
    # and a kill right after one was seen open seldom lands just after its commit: timed
    # by its output only, a loaded CI run once had all three kills fall between two.
    slow = {**env, "MESH_RUNTIME__TRANSACTION_MAX_MS": "1000"}
    procs = {name: AgentProcess(broker, f"tests.apps.stages:{name}", prefix=prefix, log=log,
                                env=slow if name == "stage2" else env)
             for name in ("stage1", "stage2", "stage3")}
    for proc in procs.values():
        proc.start()
    killed, hits = [], 0
    try:
        # The kills follow stage2's own committed output, not the sink: stage3 may lag
        # far behind it, and a kill timed by the sink once came when stage2 was almost
        # done, the next one before the restarted stage2 had even joined its group.
        async with Progress(settings, middle.name) as written, \
                Progress(settings, sink.name) as progress:
            await inject(settings, [encode(codec, source, i) for i in items])
            for n, fraction in enumerate((0.2, 0.5, 0.8), start=2):
                await written.reached(int(len(items) * fraction), timeout=180)
                killed.append(procs["stage2"].pid)
                hits += await kill9_mid_transaction(procs["stage2"], settings, middle)
                procs["stage2"].start()
                # the next kill hits a stage2 that has joined its group and taken the
                # partitions (fencing the killed one's transactions)
                await assigned_times(tmp_path / "agents.log", f"{prefix}-stage2", n)
            await progress.reached(len(items), timeout=240)
        assert all(p.alive() for p in procs.values())
    finally:
        codes = {name: p.terminate() for name, p in procs.items()}
        log.close()
    report = check(await history(settings, codec, items, sink=sink))
    assert report.ok_exactly_once, report.summary()
    assert codes == {"stage1": 0, "stage2": 0, "stage3": 0}, \
        (tmp_path / "agents.log").read_text()
    assert len(set(killed)) == 3
    assert hits, "none of the 3 kills left a transaction of stage2 open"
    aborted = (set(await read(settings, middle.name, "read_uncommitted"))
               - set(await read(settings, middle.name, "read_committed")))
    assert aborted, "no aborted record in stage2's output: no kill hit an open transaction"


async def test_kill_9_with_many_inputs_in_flight_on_many_keys_stays_exactly_once(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: an exactly-once `mesh run` agent with concurrency 16 on 64 keys over 4
    partitions (tests.apps.overlap: each call waits 100 ms and writes into its output
    how many calls were in flight when it started), killed -9 with batches in flight
    and restarted, from 20 % of the stream on, until two kills have left a transaction
    open (the broker's offsets, asked right after the kill): a read_committed reader
    finds nothing lost, per-key order kept and zero duplicates in the log (the checker),
    the output holds aborted records, and the calls really overlapped
    within a partition (more in flight than partitions, never above the concurrency)
    but never two of one key."""
    needs_transactions(broker)
    agent = overlap.build(prefix)
    source, sink = agent.consumes[0], agent.produces[0]
    settings = read_committed(broker.settings())
    await apply_topics(settings.kafka, agent.all_topics)
    items = [i.model_copy(update={"sleep_ms": 100}) for i in make_items(keys=64, per_key=8)]
    codec = Codec()
    log = (tmp_path / "agents.log").open("wb")
    # Transactions of up to 1 s (not 100 ms): most of the time one is open on the sink,
    # so a kill right after one was seen open seldom lands just after its commit (a loaded
    # CI run once hit with 1 of 5 kills at 100 ms). The kills still hit batches in flight.
    proc = AgentProcess(broker, "tests.apps.overlap:slow", prefix=prefix, log=log,
                        env={"MESH_RUNTIME__TRANSACTION_MAX_MS": "1000"})
    proc.start()
    killed, hits = [], 0
    try:
        async with Progress(settings, sink.name) as progress:
            await inject(settings, [encode(codec, source, i) for i in items])
            # Two kills must leave a transaction open; a miss (kill9_mid_transaction says
            # how one happens) is killed again further on, at most five kills in all.
            for fraction in (0.2, 0.35, 0.5, 0.65, 0.8):
                if hits == 2:
                    break
                await progress.reached(int(len(items) * fraction), timeout=180)
                killed.append(proc.pid)
                hits += await kill9_mid_transaction(proc, settings, sink)
                proc.start()
            await progress.reached(len(items), timeout=240)
        assert proc.alive()
    finally:
        code = proc.terminate()
        log.close()
    report = check(await history(settings, codec, items, sink=sink))
    assert report.ok_exactly_once, report.summary()
    assert code == 0, (tmp_path / "agents.log").read_text()
    assert hits == 2, f"{len(killed)} kills, {hits} left a transaction open"
    assert len(set(killed)) == len(killed)
    aborted = (set(await read(settings, sink.name, "read_uncommitted"))
               - set(await read(settings, sink.name, "read_committed")))
    assert aborted, "no aborted record in the output: no kill hit an open transaction"
    hops = []
    async with TopicReader(settings.kafka, [sink.name],
                           isolation_level="read_committed") as reader:
        for record in await reader.read_to_end(timeout=60):
            item = await codec.decode(sink, record.value or b"")
            assert isinstance(item, Item)
            hops.append(dict(hop.split("=") for hop in item.hops))
    running = max(int(h["running"]) for h in hops)
    assert source.partitions < running <= overlap.CONCURRENCY, running
    assert {h["key_running"] for h in hops} == {"1"}


@pytest.mark.parametrize("ordering", ["key", "partition", "none"])
async def test_a_hold_amid_a_concurrent_batch_keeps_every_output_once(
        broker: BrokerUnderTest, prefix: str, ordering: Ordering) -> None:
    """Pass: an exactly-once agent with concurrency 8 on 16 keys, whose handler raises
    Held (a breaker open, for 1 s) on one item's first call while other calls of the
    same transaction are in flight (by key and none) or not (by partition): the held
    item and the ones after it are handed over again after the hold (the transaction
    committed the ones before it, or aborted and all of the batch was redone), and a
    read_committed reader finds every output once, in key order, nothing
    dead-lettered."""
    needs_transactions(broker)
    template = overlap.build(prefix)
    source, sink = template.consumes[0], template.produces[0]
    held: list[str] = []

    async def handle(item: Item, ctx: Context) -> Item:
        if (item.key, item.seq) == ("k3", 2) and not held:
            held.append(item.source_id)
            raise Held("downstream down", until=time.time() + 1.0)
        await asyncio.sleep(0.05)
        return item

    agent = Agent(f"{prefix}-holder", consumes=source, produces=sink, handler=handle,
                  exactly_once=True, concurrency=8, ordering=ordering)
    settings = read_committed(broker.settings())
    await apply_topics(settings.kafka, [source, sink])
    codec = Codec()
    items = make_items(keys=16, per_key=6)
    await inject(settings, [encode(codec, source, i) for i in items])
    async with Mesh(settings, [agent]) as mesh:
        await mesh.wait_assigned()
        async with Progress(settings, sink.name) as progress:
            await progress.reached(len(items), timeout=90)
    runner = mesh.runners[0]
    assert held and runner.holds == 1
    assert runner.dead_lettered == 0
    report = check(await history(settings, codec, items, sink=sink))
    assert report.ok_exactly_once, report.summary()
