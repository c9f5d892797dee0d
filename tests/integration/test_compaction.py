"""Compaction enforced by Apache Kafka: a state table rebuilt from a compacted topic after
the log cleaner ran holds exactly the live keys, and a checkpoint table stays bounded.

The embedded broker stores compaction configs but never compacts (a table there is
rebuilt from every record, which is correct but unbounded), so these tests run in the
Apache Kafka session (``MESH_TEST_KAFKA=apache``) only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from typing import Any

import pytest
from pydantic import BaseModel

from mesh import Codec, Topic, apply_topics
from mesh.kafka.base import Record
from mesh.kafka.transport import Producer
from mesh.patterns.pipeline import Checkpoint, PipelineTopics
from mesh.state import CompactedTable
from tests.conftest import BrokerUnderTest
from tests.support import read_all

pytestmark = [
    pytest.mark.apache,
    pytest.mark.skipif(os.environ.get("MESH_TEST_KAFKA") != "apache",
                       reason="the embedded broker never compacts: runs with "
                              "MESH_TEST_KAFKA=apache"),
]

# Segments roll on the first write 100 ms after the last roll; any dirty share makes
# the cleaner run; tombstones go 100 ms after their segment was cleaned.
FAST = {"segment_ms": 100, "min_cleanable_dirty_ratio": 0.01, "delete_retention_ms": 100}
CLEANER_TIMEOUT_S = 150.0  # the cleaner looks for work every 15 s when it found none
# The pace of writes that roll the active segments meanwhile: each adds three records
# the cleaner must catch up with (at 0.5 s, a loaded CI machine's cleaners did not: 95
# records > 84 after 150 s), and any pace over segment_ms rolls them.
NUDGE_S = 2.0


class Row(BaseModel):
    key: str
    version: int


async def _write(broker: BrokerUnderTest, table: CompactedTable[Any],
                 changes: list[tuple[str, Any]]) -> None:
    records = [table.put(k, v) if v is not None else table.delete(k) for k, v in changes]
    async with Producer(broker.settings().kafka) as producer:
        await producer.send_all(records)


async def _compacted(broker: BrokerUnderTest, table: CompactedTable[Any], *,
                     until: int) -> list[Record]:
    """Rewrite live rows with their own values every ``NUDGE_S`` (rolling the active
    segments, changing nothing) until the topic read from its start holds at most
    ``until`` records; fail after ``CLEANER_TIMEOUT_S``."""
    deadline = time.monotonic() + CLEANER_TIMEOUT_S
    live = sorted(table.items())[:3]
    seen: list[int] = []
    while True:
        records = await read_all(broker.settings(), [table.topic.name])
        if len(records) <= until:
            return records
        seen.append(len(records))
        if time.monotonic() > deadline:
            raise AssertionError(f"{table.topic.name} still holds {len(records)} records "
                                 f"(> {until}) after {CLEANER_TIMEOUT_S:.0f} s: not compacted "
                                 f"(counts read: {seen[:5]} ... {seen[-5:]}, least {min(seen)})")
        await _write(broker, table, live)
        with contextlib.suppress(TimeoutError):  # pacing the nudges, bounded by the deadline
            await asyncio.wait_for(asyncio.Event().wait(), NUDGE_S)


async def test_a_table_rebuilt_after_compaction_holds_exactly_the_live_keys(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: 60 keys written 10 times each, 30 of them then deleted (tombstones); once
    the log cleaner has compacted the topic (fewer than a fifth of the 630 records
    left), a new table restored from it holds exactly the 30 live keys with their last
    versions, and no deleted key comes back."""
    topic = Topic(f"{prefix}.rows", Row, key="key", partitions=3, compacted=True, **FAST)
    settings = broker.settings()
    await apply_topics(settings.kafka, [topic])
    codec = Codec()
    await codec.prepare([topic])
    writer: CompactedTable[Row] = CompactedTable(topic, settings.kafka, codec)
    keys = [f"row-{i}" for i in range(60)]
    for version in range(10):
        await _write(broker, writer, [(k, Row(key=k, version=version)) for k in keys])
    await _write(broker, writer, [(k, None) for k in keys[::2]])
    expected = {k: Row(key=k, version=9) for k in keys[1::2]}
    assert dict(writer.items()) == expected

    left = await _compacted(broker, writer, until=630 // 5)

    restarted: CompactedTable[Row] = CompactedTable(topic, settings.kafka, codec)
    assert await restarted.restore() == len(expected)
    assert dict(restarted.items()) == expected, f"{len(left)} records left"


async def test_the_checkpoint_table_stays_bounded_under_a_long_run(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: a pipeline's checkpoints topic (declared with fast compaction) takes 40
    rounds of checkpoints for 20 running workflows, each round finishing and deleting 5
    and starting 5 new ones, as a long run does; after the cleaner ran, the topic holds
    a small multiple of the 20 live workflows, not the 800 checkpoints and 200
    tombstones written, and a restore yields exactly the live ones."""
    class Doc(BaseModel):
        doc_id: str

    source = Topic(f"{prefix}.docs", Doc, key="doc_id", partitions=3)
    topics = PipelineTopics.named(f"{prefix}.pipe", source)
    checkpoints = dataclasses.replace(topics.checkpoints, **FAST)
    settings = broker.settings()
    await apply_topics(settings.kafka, [checkpoints])
    codec = Codec()
    await codec.prepare([checkpoints])
    table: CompactedTable[Checkpoint] = CompactedTable(checkpoints, settings.kafka, codec)
    running = [f"wf-{i}" for i in range(20)]
    started = len(running)
    written = 0
    for round_ in range(40):
        changes: list[tuple[str, Any]] = [
            (wf, Checkpoint(workflow_id=wf, pipeline="pipe", version=round_ + 1,
                            status="running", updated_at_ms=round_)) for wf in running]
        finished, running = running[:5], running[5:]
        changes += [(wf, None) for wf in finished]
        running += [f"wf-{started + i}" for i in range(5)]
        started += 5
        written += len(changes)
        await _write(broker, table, changes)
    live = {wf: row.version for wf, row in table.items()}
    assert len(live) == 15 and written == 1000

    left = await _compacted(broker, table, until=5 * len(live) + 3 * 3)

    restarted: CompactedTable[Checkpoint] = CompactedTable(checkpoints, settings.kafka, codec)
    await restarted.restore()
    assert {wf: row.version for wf, row in restarted.items()} == live, f"{len(left)} left"
