"""The emit path on a real broker: one call's batch lands whole, each event where the
default partitioner puts its key, with its `produced` audit record keyed by its
correlation id."""

from __future__ import annotations

from mesh import Codec, Emitter, Topic, apply_topics
from mesh.kafka.base import OutRecord
from mesh.kafka.murmur import partition_for
from mesh.kafka.transport import Producer
from mesh.runtime.audit import PRODUCED, AuditEvent, audit_topic
from tests.apps.stages import Item
from tests.conftest import BrokerUnderTest
from tests.support import event_id, read_all, wait_for_count

EVENTS = 300


async def test_a_batch_lands_whole_with_one_audit_record_per_event(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: 300 events emitted in one call are all on the topic once, each decoding to
    its payload with the returned envelope's headers, on its key's partition; mesh.audit
    holds one `produced` event per event (event id, correlation id, trace, size) on its
    correlation id's partition. Fail: a record lost, duplicated, misplaced, or an audit
    record missing or unreadable."""
    topic = Topic(f"{prefix}.emitted", Item, key="key", partitions=3)
    settings = broker.settings()
    await apply_topics(settings.kafka, [topic])
    source = f"{prefix}-src"
    items = [Item(key=f"k{i % 7}", seq=i, source_id=f"s{i}") for i in range(EVENTS)]
    async with Emitter(settings, source=source) as emitter:
        envs = await emitter.emit(topic, items)
    codec = Codec()

    records = await wait_for_count(settings, [topic.name], EVENTS)
    assert len(records) == EVENTS
    by_id = {event_id(r): r for r in records}
    assert set(by_id) == {env.event_id for env in envs}
    for env, item in zip(envs, items, strict=True):
        record = by_id[env.event_id]
        assert await codec.decode(topic, record.value or b"") == item
        assert record.headers == tuple(env.headers())
        assert record.partition == partition_for(f"k{item.seq % 7}".encode(), 3)

    audits: dict[str, tuple[AuditEvent, int]] = {}
    for record in await read_all(settings, [audit_topic.name]):
        event = await codec.decode(audit_topic, record.value or b"")
        assert isinstance(event, AuditEvent)
        if event.kind == PRODUCED and event.agent == source:
            assert event.event_id is not None and event.event_id not in audits
            audits[event.event_id] = (event, record.partition)
    assert set(audits) == set(by_id)
    for env in envs:
        event, partition = audits[env.event_id]
        assert (event.topic, event.correlation_id, event.traceparent, event.size) == (
            topic.name, env.correlation_id, env.traceparent,
            len(by_id[env.event_id].value or b""))
        assert partition == partition_for(env.correlation_id.encode(), audit_topic.partitions)


async def test_a_batching_producer_reports_where_each_record_landed(
        broker: BrokerUnderTest, prefix: str) -> None:
    """The emitter's producer sends a call's records to a partition as batches (three
    partitions, batches of at most 2 KiB, so a partition's records span several; one
    record is larger than a batch). Pass: each record is at the (partition,
    offset) send_all returned for it, keyed records on their key's partition, explicit
    partitions kept, a partition's records in the order given. Fail: an offset off by
    the batch's position, a record lost, reordered or on another partition."""
    topic = Topic(f"{prefix}.batched", Item, key="key", partitions=3)
    settings = broker.settings()
    await apply_topics(settings.kafka, [topic])
    kafka = settings.kafka.model_copy(update={"max_batch_size": 2048})
    records = [OutRecord(topic.name, f"v{i}:".encode() + b"x" * 300, f"k{i % 5}".encode())
               for i in range(60)]
    records[17] = OutRecord(topic.name, b"v17:" + b"y" * 5000, b"k2")  # over a batch
    records[40] = OutRecord(topic.name, b"v40:pinned", b"k0", partition=2)
    async with Producer(kafka) as producer:
        positions = await producer.send_all(records)

    landed = {(r.partition, r.offset): r for r in await read_all(settings, [topic.name])}
    assert len(landed) == len(records)
    for i, (record, position) in enumerate(zip(records, positions, strict=True)):
        assert landed[position].value == record.value, i
        assert landed[position].key == record.key
        expected = 2 if i == 40 else partition_for(record.key or b"", 3)
        assert position[0] == expected
    for partition in range(3):
        offsets = [p[1] for p in positions if p[0] == partition]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
