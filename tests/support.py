"""Helpers the integration and fault tests share: inject events, read topics back,
build the checker's history."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from mesh import Codec, Envelope, MeshSettings, Topic
from mesh.checker import Applied, DeadLetter, History, Injected, Logged
from mesh.reader import TopicReader
from mesh.runtime import DLQ_TOPIC
from mesh.transport import OutRecord, Producer, Record
from tests.apps.chain import Item


def make_items(keys: int, per_key: int, *, bad: Iterable[tuple[int, int]] = ()) -> list[Item]:
    """``keys`` x ``per_key`` items, interleaved by key; (key, seq) in ``bad`` are poison."""
    poison = set(bad)
    return [Item(key=f"k{k}", seq=s, source_id=str(uuid.uuid4()),
                 text="poison" if (k, s) in poison else f"item {k}/{s}")
            for s in range(per_key) for k in range(keys)]


def encode(codec: Codec, topic: Topic[Any], item: Item) -> OutRecord:
    """The record an existing system would produce for ``item`` (event id = source id)."""
    env = Envelope(item, item.source_id, item.source_id, source="test",
                   key=topic.key_of(item))
    value, fingerprint = codec.encode(topic, item)
    headers = env.with_payload(item, schema=fingerprint).headers()
    return OutRecord(topic.name, value, env.key, tuple(headers))


async def inject(settings: MeshSettings, records: Sequence[OutRecord],
                 batch: int = 500) -> None:
    """Produce ``records`` in batches and wait for every acknowledgement."""
    async with Producer(settings.kafka) as producer:
        for start in range(0, len(records), batch):
            await producer.send_all(records[start:start + batch])


async def read_all(settings: MeshSettings, topics: Sequence[str]) -> list[Record]:
    """Every record of ``topics``, from the beginning to the end as of now."""
    async with TopicReader(settings.kafka, topics) as reader:
        return await reader.read_to_end(timeout=120)


async def wait_for_count(settings: MeshSettings, topics: Sequence[str], count: int, *,
                         timeout: float = 120.0, distinct: bool = True) -> list[Record]:
    """Read ``topics`` until they hold ``count`` records (distinct event ids by default),
    failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    seen: dict[str, Record] = {}
    records: list[Record] = []
    async with TopicReader(settings.kafka, topics) as reader:
        async for record in reader.follow(idle_timeout=timeout):
            records.append(record)
            seen.setdefault(event_id(record), record)
            if (len(seen) if distinct else len(records)) >= count:
                return records
            if time.monotonic() > deadline:
                break
    raise AssertionError(f"{topics} held {len(seen)} distinct events of {count} expected "
                         f"after {timeout:.0f} s")


async def source_of(codec: Codec, topic: Topic[Any], record: Record) -> str:
    """The injected id a dead letter stands for: the payload's source id when it decodes,
    else the record's event id header."""
    try:
        item = await codec.decode(topic, record.value or b"")
        return str(getattr(item, "source_id"))
    except Exception:  # undecodable by design: fall back to the header
        return event_id(record)


def event_id(record: Record) -> str:
    return dict(record.headers)["mesh-event-id"].decode()


async def history(settings: MeshSettings, codec: Codec, injected: Sequence[Item], *,
                  sink: Topic[Any], dlq: Sequence[Topic[Any]] = (),
                  bad_ids: Iterable[str] = ()) -> History:
    """The checker's history: what was injected, what the (idempotent) sink applied,
    what the output topic logged, and what the dead-letter topics hold."""
    bad = set(bad_ids)
    logged_records = await read_all(settings, [sink.name])
    applied, logged, seen = [], [], set()
    for record in sorted(logged_records, key=lambda r: (r.partition, r.offset)):
        item = await codec.decode(sink, record.value or b"")
        assert isinstance(item, Item)
        eid = event_id(record)
        logged.append(Logged(record.topic, record.partition, record.offset, eid,
                             item.source_id))
        if eid not in seen:  # the sink is idempotent by event id: that is the contract
            seen.add(eid)
            applied.append(Applied(eid, item.source_id, item.key, item.seq))
    dead = []
    for topic in dlq:
        for record in await read_all(settings, [topic.dlq_name]):
            assert dict(record.headers)[DLQ_TOPIC].decode() == topic.name
            dead.append(DeadLetter(await source_of(codec, topic, record)))
    return History(
        injected=[Injected(i.source_id, i.key, i.seq, bad=i.source_id in bad)
                  for i in injected],
        applied=applied, logged=logged, dead_letters=dead)
