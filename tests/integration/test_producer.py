"""The mesh's producer on a real broker: records sent one by one, from many tasks at
once, are gathered per partition into aiokafka batches. What a user relies on is what
a `send` per record gave: each record where its ack says, a partition's records in the
order they were sent, keyed records on their key's partition, the record's time when it
was sent, nothing lost at `stop()`, and one bad record failing alone."""

from __future__ import annotations

import asyncio
import time

import pytest

from mesh import Topic, apply_topics
from mesh.errors import TransportError
from mesh.kafka.base import Acks, OutRecord
from mesh.kafka.murmur import partition_for
from mesh.kafka.transport import Producer
from tests.apps.stages import Item
from tests.conftest import BrokerUnderTest
from tests.support import read_all

TASKS = 8
PER_TASK = 60


async def test_records_sent_one_by_one_from_many_tasks_land_in_order_where_acked(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Eight tasks each send 60 records one `send` at a time, yielding between sends,
    keyed on 5 keys and some pinned to a partition (batches of at most 2 KiB, so a
    partition's records span many batches; one record is larger than a batch).
    Pass: every record is at the (partition, offset) its ack resolved to, on its key's
    partition (or the pinned one), each task's records of one partition in the order
    it sent them, each record's timestamp between just before and just after its send
    (the loop is kept busy 3 ms after some sends, so a stamp taken when the batch is
    handed over is later). Fail: a record lost, duplicated, reordered, misplaced, or
    stamped when its batch went out rather than when it was sent."""
    topic = Topic(f"{prefix}.gathered", Item, key="key", partitions=3)
    settings = broker.settings()
    await apply_topics(settings.kafka, [topic])
    kafka = settings.kafka.model_copy(update={"max_batch_size": 2048})
    sent: list[tuple[OutRecord, asyncio.Future[object]]] = []
    stamps: list[tuple[int, int]] = []  # the time just before and just after each send

    async def sender(task: int, producer: Producer) -> None:
        for i in range(PER_TASK):
            value = f"t{task}-{i}:".encode() + b"x" * (5000 if (task, i) == (3, 7) else 200)
            record = OutRecord(topic.name, value, f"k{(task + i) % 5}".encode(),
                               partition=2 if i % 11 == 0 else None)
            before = int(time.time() * 1000)
            ack = await producer.send(record)
            stamps.append((before, int(time.time() * 1000)))
            sent.append((record, ack))  # type: ignore[arg-type]
            if i % 10 == 0:  # the loop busy for 3 ms: a batch handed over after it is later
                time.sleep(0.003)
            await asyncio.sleep(0)

    async with Producer(kafka) as producer:
        await asyncio.gather(*(sender(t, producer) for t in range(TASKS)))
        positions = await Acks([ack for _, ack in sent]).wait()  # type: ignore[misc]

    landed = {(r.partition, r.offset): r for r in await read_all(settings, [topic.name])}
    assert len(landed) == TASKS * PER_TASK == len(set(positions))
    for (record, _), (before, after), position in zip(sent, stamps, positions, strict=True):
        found = landed[position]
        assert (found.value, found.key) == (record.value, record.key)
        expected = record.partition if record.partition is not None else partition_for(
            record.key or b"", 3)
        assert position[0] == expected
        assert before <= found.timestamp_ms <= after
    for task in range(TASKS):
        for partition in range(3):
            offsets = [p[1] for (r, _), p in zip(sent, positions, strict=True)
                       if p[0] == partition and r.value and r.value.startswith(f"t{task}-".encode())]
            assert offsets == sorted(offsets), (task, partition)


async def test_stop_sends_what_is_queued_and_refuses_what_comes_after(
        broker: BrokerUnderTest, prefix: str) -> None:
    """500 records are queued and the producer stopped at once, no ack awaited.
    Pass: all 500 are on the topic and every ack is resolved; a send after stop() raises
    TransportError. Fail: stop() drops the records still gathered."""
    topic = Topic(f"{prefix}.stopped", Item, key="key", partitions=2)
    settings = broker.settings()
    await apply_topics(settings.kafka, [topic])
    producer = Producer(settings.kafka)
    await producer.start()
    acks = await producer.send_many(OutRecord(topic.name, f"v{i}".encode(), f"k{i}".encode())
                                    for i in range(500))
    await producer.stop()
    assert acks.done()
    assert len(await acks.wait()) == 500
    assert sorted(r.value or b"" for r in await read_all(settings, [topic.name])) == sorted(
        f"v{i}".encode() for i in range(500))
    with pytest.raises(TransportError, match="not started"):
        await producer.send(OutRecord(topic.name, b"late", b"k"))


async def test_a_bad_record_fails_alone(broker: BrokerUnderTest, prefix: str) -> None:
    """Among good records: one to a partition the topic does not have, and values that
    are not bytes (one among records of the same partition, one as the first of a
    batch). Pass: send() refuses the first with TransportError naming the partition and
    the others with aiokafka's TypeError, as a send per record did, and every good
    record (sent before and after, to the same partitions) is acknowledged and on the
    topic. Fail: a bad record takes the partition's other records down with it or
    corrupts their batch."""
    topic = Topic(f"{prefix}.bad", Item, key="key", partitions=2)
    settings = broker.settings()
    await apply_topics(settings.kafka, [topic])
    async with Producer(settings.kafka) as producer:
        with pytest.raises(TransportError, match="no partition 7"):
            await producer.send(OutRecord(topic.name, b"nowhere", partition=7))
        before = await producer.send_many(
            OutRecord(topic.name, f"a{i}".encode(), partition=1) for i in range(10))
        with pytest.raises(TypeError):
            await producer.send(OutRecord(topic.name, "text", partition=1))  # type: ignore[arg-type]
        after = await producer.send_many(
            OutRecord(topic.name, f"b{i}".encode(), partition=1) for i in range(10))
        positions = await before.wait() + await after.wait()
        with pytest.raises(TypeError):  # the first of a new batch
            await producer.send(OutRecord(topic.name, "text", partition=0))  # type: ignore[arg-type]
        assert len(await producer.send_all([OutRecord(topic.name, b"c0", partition=0)])) == 1
    landed = {(r.partition, r.offset): r.value for r in await read_all(settings, [topic.name])}
    good = [f"{p}{i}".encode() for p in "ab" for i in range(10)]
    assert [landed[position] for position in positions] == good  # each at its ack's offset
    assert sorted(landed.values()) == sorted([*good, b"c0"])


async def test_a_gathered_batch_goes_out_at_once_not_after_linger_ms(
        broker: BrokerUnderTest, prefix: str) -> None:
    """With ``linger_ms`` at 5 s, an emit-sized `send_all` (200 records) and a single
    `send` are acknowledged within 2.5 s each, and so is a send while the partition's
    previous batch is still on its way. Pass: each batch handed to aiokafka is closed
    (nothing more can go into it once handed over), so aiokafka sends it at once. Fail:
    aiokafka holds each for linger_ms waiting for records that cannot come (every
    emitter call waited 5 ms for nothing: 0.46x of a raw producer, 0.62x since)."""
    topic = Topic(f"{prefix}.linger", Item, key="key", partitions=2)
    settings = broker.settings()
    await apply_topics(settings.kafka, [topic])
    kafka = settings.kafka.model_copy(update={"linger_ms": 5_000})
    async with Producer(kafka) as producer:
        await producer.send_all([OutRecord(topic.name, b"warm", b"k")])  # metadata known
        async with asyncio.timeout(2.5):
            await producer.send_all([OutRecord(topic.name, f"v{i}".encode(), f"k{i}".encode())
                                     for i in range(200)])
        async with asyncio.timeout(2.5):
            first = await producer.send(OutRecord(topic.name, b"one", partition=0))
            second = await producer.send(OutRecord(topic.name, b"two", partition=0))
            await Acks([first, second]).wait()
    assert len(await read_all(settings, [topic.name])) == 203
