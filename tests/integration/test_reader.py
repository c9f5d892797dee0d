"""TopicReader on the real broker: which partitions it reads (all, explicit, a key's),
where it starts (beginning, end, the last N) and where it stops (the end as of a call)."""

from __future__ import annotations

import time

import pytest

from mesh.config import KafkaSettings
from mesh.errors import TransportError
from mesh.kafka.admin import Admin
from mesh.kafka.base import OutRecord, Partition, Record, TopicSpec
from mesh.kafka.murmur import partition_for
from mesh.kafka.provision import wait_visible
from mesh.kafka.reader import TopicReader
from tests.conftest import BrokerUnderTest
from tests.support import inject

PARTITIONS = 3


async def topic_of(broker: BrokerUnderTest, prefix: str, name: str = "t") -> str:
    topic = f"{prefix}.{name}"
    async with Admin(broker.settings().kafka) as admin:
        assert await admin.create_topic(TopicSpec(topic, PARTITIONS))
        # a reader asks any broker: on a cluster, one that has not learned the topic yet
        # says it does not exist (seen in CI on Apache Kafka)
        await wait_visible(admin, [TopicSpec(topic, PARTITIONS)])
    return topic


async def fill(broker: BrokerUnderTest, topic: str, counts: dict[int, int],
               tag: str = "v") -> None:
    """``counts[p]`` records produced to partition p, valued ``{tag}{p}-{i}``."""
    await inject(broker.settings(), [
        OutRecord(topic, f"{tag}{p}-{i}".encode(), b"k", partition=p)
        for p, n in counts.items() for i in range(n)])


def values(records: list[Record]) -> set[str]:
    return {(r.value or b"").decode() for r in records}


async def drain(reader: TopicReader, ends: dict[Partition, int],
                timeout: float = 30.0) -> list[Record]:
    """Poll until the reader has caught up with ``ends``, failing after ``timeout`` s."""
    records: list[Record] = []
    deadline = time.monotonic() + timeout
    while not await reader.caught_up(ends):
        assert time.monotonic() < deadline, f"not caught up with {ends} after {timeout} s"
        records += await reader.poll(0.2)
    return records


async def test_partitions_reads_only_the_named_partitions_in_offset_order(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: of a topic with 4 records in each of 3 partitions, a reader given
    partitions 0 and 2 reads their 8 records, each partition in offset order, and none
    of partition 1."""
    topic = await topic_of(broker, prefix)
    await fill(broker, topic, {0: 4, 1: 4, 2: 4})
    chosen = [Partition(topic, 2), Partition(topic, 0)]

    async with TopicReader(broker.settings().kafka, partitions=chosen) as reader:
        records = await reader.read_to_end(timeout=30)

    assert reader.partitions == chosen
    assert values(records) == {f"v{p}-{i}" for p in (0, 2) for i in range(4)}
    for p in (0, 2):
        assert [r.offset for r in records if r.partition == p] == [0, 1, 2, 3]


async def test_for_key_reads_only_the_partition_the_default_partitioner_gives_the_key(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: records keyed `order-7` produced without a partition all land in
    partition_for(key, 3) (the producer's partitioner and mesh's agree); the reader
    for that key reads that partition alone, so a record of the same key deliberately
    produced to another partition is not read."""
    topic = await topic_of(broker, prefix)
    key = b"order-7"
    home = partition_for(key, PARTITIONS)
    elsewhere = (home + 1) % PARTITIONS
    settings = broker.settings()
    positions = await inject(settings, [OutRecord(topic, f"mine-{i}".encode(), key)
                                        for i in range(5)])
    await inject(settings, [OutRecord(topic, b"misplaced", key, partition=elsewhere)])
    assert {p for p, _ in positions} == {home}

    async with TopicReader.for_key(settings.kafka, [topic], key) as reader:
        records = await reader.read_to_end(timeout=30)

    assert reader.partitions == [Partition(topic, home)]
    assert values(records) == {f"mine-{i}" for i in range(5)}


async def test_seek_to_last_then_polls_read_the_last_n_of_each_partition_then_new_ones(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: with 10, 3 and 0 records in the partitions, seek_to_last(5) returns the
    ends 10, 3, 0 and polling until caught up reads offsets 5..9 of partition 0 and all
    3 of partition 1; a record produced afterwards is the next poll's."""
    topic = await topic_of(broker, prefix)
    await fill(broker, topic, {0: 10, 1: 3})
    async with TopicReader(broker.settings().kafka, [topic]) as reader:
        ends = await reader.seek_to_last(5)
        assert ends == {Partition(topic, 0): 10, Partition(topic, 1): 3,
                        Partition(topic, 2): 0}

        records = await drain(reader, ends)

        assert sorted((r.partition, r.offset) for r in records) == [
            *((0, o) for o in range(5, 10)), *((1, o) for o in range(3))]
        await fill(broker, topic, {2: 1}, tag="new")
        later = await drain(reader, {Partition(topic, 2): 1})
        assert values(later) == {"new2-0"}


async def test_seek_to_end_skips_what_is_there_and_follow_reads_what_comes_next(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: after seek_to_end (which returns the ends 2, 1, 0), follow yields only
    the 2 records produced afterwards."""
    topic = await topic_of(broker, prefix)
    await fill(broker, topic, {0: 2, 1: 1})
    async with TopicReader(broker.settings().kafka, [topic]) as reader:
        ends = await reader.seek_to_end()
        assert list(ends.values()) == [2, 1, 0]
        await fill(broker, topic, {0: 1, 2: 1}, tag="new")

        records = [r async for r in reader.follow(limit=2, idle_timeout=30)]

    assert values(records) == {"new0-0", "new2-0"}


async def test_iter_to_end_stops_at_the_end_as_of_the_call(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: records produced while iter_to_end runs (after its first record) are not
    yielded: it yields exactly the 5 records there when it was called."""
    topic = await topic_of(broker, prefix)
    await fill(broker, topic, {1: 5})
    records: list[Record] = []
    async with TopicReader(broker.settings().kafka, [topic]) as reader:
        async for record in reader.iter_to_end(timeout=30):
            if not records:
                await fill(broker, topic, {0: 2, 1: 2}, tag="late")
            records.append(record)

    assert [(r.partition, r.offset) for r in records] == [(1, o) for o in range(5)]


async def test_a_partition_the_topic_does_not_have_is_refused_naming_its_count(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: asking for partition 7 of a 3-partition topic raises TransportError naming
    the partition, the count and the range."""
    topic = await topic_of(broker, prefix)

    reader = TopicReader(broker.settings().kafka, partitions=[Partition(topic, 7)])

    with pytest.raises(TransportError, match=r"has no partition \[7\]: it has 3 \(0\.\.2\)"):
        await reader.__aenter__()


def test_topics_and_partitions_together_are_refused() -> None:
    """Pass: a ValueError that says to pass one of them."""
    with pytest.raises(ValueError, match="pass one of them"):
        TopicReader(KafkaSettings(), ["a"], partitions=[Partition("b", 0)])
