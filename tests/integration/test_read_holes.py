"""Followers of one partition written by several producers at once read every record.

On the embedded broker a fetch can return a batch stored after an earlier one that is
not stored yet, so a plain consumer's position moves past the earlier batch for good
(:mod:`mesh.kafka.holes`): a breaker replica then missed another replica's probe claim
and let a third probe through, and a group consumer would commit past inputs. The mesh's
consumers read such holes again. On Apache Kafka the test passes without any of that
(fetches stop at the high watermark); it runs on both brokers."""

from __future__ import annotations

import asyncio
import time

from mesh import Topic, apply_topics
from mesh.kafka.base import OutRecord, Partition, Record
from mesh.kafka.reader import TopicReader
from mesh.kafka.transport import Consumer, Producer
from tests.apps.stages import Item
from tests.conftest import BrokerUnderTest

PRODUCERS = 3
BATCHES = 1500  # per producer; without the re-reads most runs of this size miss records


async def test_followers_of_a_partition_written_by_three_producers_at_once_read_every_record(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Three producers (each its own client) write batches of 1-3 records to partition 0
    at once, each waiting for its batch's acks before the next; meanwhile two group-less
    readers follow the partition from the beginning and a group consumer (the runtime's
    kind) reads it from its committed start. Pass: each of the three gets every record
    once, at offsets 0..N-1 in order, the keys those written. Fail: a record skipped (the
    embedded broker's fetch race, without the re-reads) or delivered twice."""
    topic = Topic(f"{prefix}.busy", Item, key="key", partitions=1)
    settings = broker.settings()
    await apply_topics(settings.kafka, [topic])
    written = {f"p{p}/{b}/{r}" for p in range(PRODUCERS) for b in range(BATCHES)
               for r in range(1 + b % 3)}
    seen: list[list[Record]] = [[] for _ in range(3)]

    async def follow(reader: TopicReader, into: list[Record]) -> None:
        async with reader:
            async for record in reader.follow():
                into.append(record)

    async def consume(into: list[Record]) -> None:
        consumer = Consumer(settings.kafka, group_id=f"{prefix}.group")
        async with consumer:
            async def nothing(_: list[Partition]) -> None:
                return None
            consumer.subscribe([topic.name], on_assigned=nothing, on_revoked=nothing)
            while True:
                for records in (await consumer.getmany(timeout_ms=200,
                                                       max_records=500)).values():
                    into.extend(records)

    async def produce(number: int) -> None:
        async with Producer(settings.kafka) as producer:
            for batch in range(BATCHES):
                await producer.send_all([
                    OutRecord(topic.name, b"x", f"p{number}/{batch}/{r}".encode(), partition=0)
                    for r in range(1 + batch % 3)])

    readers = [asyncio.create_task(follow(TopicReader(settings.kafka, [topic.name]), seen[i]))
               for i in range(2)]
    readers.append(asyncio.create_task(consume(seen[2])))
    try:
        await asyncio.gather(*(produce(p) for p in range(PRODUCERS)))
        deadline = time.monotonic() + 90  # the re-reads of a hole take well under a second
        while any(len(s) < len(written) for s in seen) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # anything delivered twice arrives now
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for task in readers:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    for who, records in zip(("reader 1", "reader 2", "group consumer"), seen, strict=True):
        offsets = [r.offset for r in records]
        missing = sorted(set(range(len(written))) - set(offsets))
        assert not missing, f"{who} never read offsets {missing[:20]} ({len(missing)} in all)"
        assert offsets == list(range(len(written))), f"{who} read some twice or out of order"
        assert {(r.key or b"").decode() for r in records} == written
