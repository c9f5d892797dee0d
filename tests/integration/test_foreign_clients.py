"""Records from a Kafka client the project did not write: confluent-kafka (librdkafka).

What the README's "Emitting from other systems" section promises a foreign producer,
checked with that client: values framed from the committed ``.avsc`` with fastavro
alone, keys as the key field in UTF-8, no mesh header at all, every compression codec,
its own partitioner (noticed and counted, silent with ``partitioner=murmur2_random``),
and ``mesh-event-id`` making a retried copy the same event. A batch the mesh cannot
decompress stops the agent once, naming where and the fix.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiokafka.codec
import confluent_kafka
import fastavro
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form
from prometheus_client import CollectorRegistry

from mesh import Codec, Mesh, apply_topics
from mesh.envelope import derive_event_id
from mesh.errors import UnreadableBatch
from mesh.kafka.murmur import partition_for
from mesh.runtime.metrics import MeshMetrics
from mesh.serde.history import export_schemas
from mesh.topic import Topic
from tests.apps.stages import Item, build
from tests.conftest import ROOT, BrokerUnderTest
from tests.integration.test_cli import Cli
from tests.support import event_id, make_items, read_all, wait_for_count

CODECS = ("gzip", "snappy", "lz4", "zstd")
TOPICS = "tests.apps.cli_topics"


def foreign_value(avsc: Path, record: dict[str, Any]) -> bytes:
    """The README's recipe, line for line: Avro single-object encoding from the
    committed .avsc with fastavro alone (no mesh import)."""
    schema = fastavro.parse_schema(json.loads(avsc.read_text()))
    body = io.BytesIO()
    fastavro.schemaless_writer(body, schema, record)
    fp = fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")
    return b"\xc3\x01" + bytes.fromhex(fp) + body.getvalue()


Message = tuple[bytes, bytes, list[tuple[str, bytes]]]  # key, value, headers


async def produce(bootstrap: str, topic: str, messages: list[Message],
                  **config: str) -> list[int]:
    """Produce with confluent-kafka (librdkafka) and wait for every delivery report;
    returns the partition each message landed in, in order."""
    def run() -> list[int]:
        producer = confluent_kafka.Producer(
            {"bootstrap.servers": bootstrap, "linger.ms": 50, **config})
        landed: dict[int, int] = {}
        errors: list[str] = []

        def report(index: int) -> Any:
            def done(err: Any, msg: Any) -> None:
                if err is not None:
                    errors.append(str(err))
                else:
                    landed[index] = msg.partition()
            return done

        for index, (key, value, headers) in enumerate(messages):
            producer.produce(topic, value=value, key=key, headers=headers,
                             on_delivery=report(index))
        left = producer.flush(60)
        assert left == 0 and not errors, f"{left} undelivered, errors: {errors}"
        return [landed[i] for i in range(len(messages))]

    return await asyncio.to_thread(run)


def _setup(prefix: str, tmp_path: Path) -> tuple[Any, Topic[Any], Topic[Any], Path]:
    """The first chain stage (``<prefix>.in`` -> ``<prefix>.a``, 4 partitions, keyed by
    ``key``) and its input's .avsc as `mesh schemas export` writes it."""
    stage1 = build(prefix).agents[0]
    source, sink = stage1.consumes[0], stage1.produces[0]
    export_schemas([source], tmp_path / "schemas")
    return stage1, source, sink, tmp_path / "schemas" / f"{source.name}.avsc"


def _messages(avsc: Path, items: list[Item], *,
              headers: list[tuple[str, bytes]] | None = None) -> list[Message]:
    return [(i.key.encode(), foreign_value(avsc, i.model_dump()), list(headers or []))
            for i in items]


def _compressible(items: list[Item]) -> list[Item]:
    return [i.model_copy(update={"text": f"{i.text} " + "compress me " * 40}) for i in items]


async def test_gzip_snappy_lz4_and_zstd_batches_from_librdkafka_are_handled_and_tapped(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path, cli: Cli) -> None:
    """Pass: confluent-kafka batches compressed with each codec, values framed from the
    .avsc with fastavro alone and no mesh header, are all handled by a running agent
    (every item once in its output topic, nothing dead-lettered), and `mesh tap` (the
    reader `mesh dlq` and `mesh trace` use too) prints every one of them. Each batch
    really is compressed with its codec: a reader without that codec cannot read it."""
    stage1, source, sink, avsc = _setup(prefix, tmp_path)
    settings = broker.settings()
    await apply_topics(settings.kafka, [source, sink])
    items = _compressible(make_items(keys=4, per_key=5 * len(CODECS)))
    per_codec = len(items) // len(CODECS)
    for n, codec in enumerate(CODECS):
        chunk = items[n * per_codec:(n + 1) * per_codec]
        await produce(broker.bootstrap, source.name, _messages(avsc, chunk),
                      **{"compression.type": codec, "partitioner": "murmur2_random"})
    async with Mesh(settings, [stage1]) as mesh:
        await mesh.wait_assigned()
        outputs = await wait_for_count(settings, [sink.name], len(items))
    handled = [await mesh.codec.decode(sink, r.value or b"") for r in outputs]
    assert sorted(i.source_id for i in handled) == sorted(i.source_id for i in items)
    assert await read_all(settings, [source.dlq_name]) == []

    shown = [json.loads(line) for line in (await cli.ok(
        "tap", source.name, "--from-beginning", "--no-follow", "--json", "-t", TOPICS)
    ).splitlines() if line.startswith("{")]
    assert sorted(s["payload"]["source_id"] for s in shown) == sorted(
        i.source_id for i in items)

    for codec in CODECS:  # proof that each codec's batches were compressed with it
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(aiokafka.codec, f"has_{codec}", lambda: False)
            with pytest.raises(UnreadableBatch, match=f"{codec}-compressed"):
                await read_all(settings, [source.name])


async def test_a_batch_without_its_codec_stops_the_agent_once_naming_where_and_the_fix(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass: with the zstd library missing (simulated), an agent whose input holds a
    zstd batch stops by itself with UnreadableBatch (not retriable) naming the topic,
    the partition, the batch's first offset, the codec and the fix (the codec extra);
    it is counted once in mesh_unreadable_batches_total; nothing is dead-lettered."""
    stage1, source, sink, avsc = _setup(prefix, tmp_path)
    settings = broker.settings()
    await apply_topics(settings.kafka, [source, sink])
    items = _compressible(make_items(keys=1, per_key=5))
    [partition, *_] = await produce(broker.bootstrap, source.name, _messages(avsc, items[:2]),
                                    partitioner="murmur2_random")
    await produce(broker.bootstrap, source.name, _messages(avsc, items[2:]),
                  **{"compression.type": "zstd", "partitioner": "murmur2_random"})
    monkeypatch.setattr(aiokafka.codec, "has_zstd", lambda: False)
    mesh = Mesh(settings, [stage1])
    metrics = MeshMetrics(CollectorRegistry())
    metrics.watch(mesh.runners[0])

    with pytest.raises(UnreadableBatch) as stopped:
        await asyncio.wait_for(mesh.run(), timeout=60)

    error = stopped.value
    assert not error.retriable
    assert (error.topic, error.partition) == (source.name, partition)
    assert error.offset is not None and error.offset >= 0
    message = str(error)
    for part in (f"{source.name}[{partition}]", f"offset {error.offset}", "zstd-compressed",
                 "pip install 'aiokafka[lz4,snappy,zstd]'", f"--group {stage1.group}"):
        assert part in message, (part, message)
    assert mesh.runners[0].unreadable == {source.name: 1}
    assert metrics.registry.get_sample_value(
        "mesh_unreadable_batches_total", {"agent": stage1.name, "topic": source.name}) == 1
    assert await read_all(settings, [source.dlq_name]) == []


async def test_mesh_run_exits_once_with_the_fix_when_a_batch_cannot_be_decompressed(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: `mesh run` in a process without the lz4 library (simulated) meets an lz4
    batch from confluent-kafka: it exits 1 by itself, promptly, and says once (not in a
    loop of retries) which topic and partition and what to install."""
    _, source, sink, avsc = _setup(prefix, tmp_path)
    settings = broker.settings()
    await apply_topics(settings.kafka, [source, sink])
    [partition, *_] = await produce(
        broker.bootstrap, source.name, _messages(avsc, _compressible(make_items(1, 3))),
        **{"compression.type": "lz4", "partitioner": "murmur2_random"})
    without_lz4 = ("import sys, aiokafka.codec; aiokafka.codec.has_lz4 = lambda: False; "
                   "from mesh.cli import main; "
                   "sys.argv = ['mesh', 'run', 'tests.apps.stages:stage1']; main()")
    started = time.monotonic()
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", without_lz4],
        env=broker.env(MESH_TEST_PREFIX=prefix), cwd=ROOT, capture_output=True, text=True,
        timeout=90)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert time.monotonic() - started < 60
    [said] = [line for line in output.splitlines() if line.startswith("error: UnreadableBatch")]
    assert f"{source.name}[{partition}]" in said and "lz4-compressed" in said
    assert "aiokafka[lz4,snappy,zstd]" in said


async def test_librdkafka_default_partitioner_is_counted_and_warned_once_not_murmur2_random(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Pass: keyed records from confluent-kafka's default partitioner (CRC32) into a
    4-partition topic are all handled, every one outside its murmur2 partition is
    counted in mesh_misplaced_records_total, and one warning names the cause and
    `partitioner=murmur2_random`; records produced with that setting add nothing."""
    caplog.set_level(logging.WARNING, logger="mesh.kafka.placement")
    stage1, source, sink, avsc = _setup(prefix, tmp_path)
    settings = broker.settings()
    await apply_topics(settings.kafka, [source, sink])
    crc32, murmur2 = make_items(keys=30, per_key=2), make_items(keys=30, per_key=1)
    async with Mesh(settings, [stage1]) as mesh:
        metrics = MeshMetrics(CollectorRegistry())
        metrics.watch(mesh.runners[0])
        await mesh.wait_assigned()
        landed = await produce(broker.bootstrap, source.name, _messages(avsc, crc32))
        await wait_for_count(settings, [sink.name], len(crc32))
        counted = metrics.registry.get_sample_value(
            "mesh_misplaced_records_total", {"agent": stage1.name, "topic": source.name})
        landed_right = await produce(broker.bootstrap, source.name, _messages(avsc, murmur2),
                                     partitioner="murmur2_random")
        await wait_for_count(settings, [sink.name], len(crc32) + len(murmur2))
        after = metrics.registry.get_sample_value(
            "mesh_misplaced_records_total", {"agent": stage1.name, "topic": source.name})
    misplaced = sum(p != partition_for(i.key.encode(), source.partitions)
                    for i, p in zip(crc32, landed, strict=True))
    assert misplaced > 0  # CRC32 and murmur2 agree on about a quarter of the keys
    assert counted == after == misplaced
    assert landed_right == [partition_for(i.key.encode(), source.partitions) for i in murmur2]
    warnings = [r.getMessage() for r in caplog.records if r.name == "mesh.kafka.placement"]
    assert len(warnings) == 1, warnings
    assert source.name in warnings[0] and "partitioner=murmur2_random" in warnings[0]


async def test_a_foreign_event_needs_no_header_and_mesh_event_id_makes_retried_copies_one(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass (the README's promises): an event without any mesh header is handled; two
    copies of it (a producer's retry) become two events with different derived ids;
    two copies carrying the same `mesh-event-id` give outputs with one derived id,
    `derive_event_id(agent, mesh-event-id, 0)`, so a sink deduplicates them. The key
    is the key field as UTF-8, and the outputs keep it."""
    stage1, source, sink, avsc = _setup(prefix, tmp_path)
    settings = broker.settings()
    await apply_topics(settings.kafka, [source, sink])
    bare, stable = make_items(keys=2, per_key=1)
    copies = (_messages(avsc, [bare, bare])
              + _messages(avsc, [stable, stable], headers=[("mesh-event-id", b"billing-42")]))
    await produce(broker.bootstrap, source.name, copies, partitioner="murmur2_random")
    async with Mesh(settings, [stage1]) as mesh:
        await mesh.wait_assigned()
        outputs = await wait_for_count(settings, [sink.name], 4, distinct=False)
    ids: dict[str, list[str]] = {}
    for record in outputs:
        item = await mesh.codec.decode(sink, record.value or b"")
        assert isinstance(item, Item) and record.key == item.key.encode()
        ids.setdefault(item.source_id, []).append(event_id(record))
    assert len(set(ids[bare.source_id])) == 2  # no id from the producer: one per copy
    assert ids[stable.source_id] == [derive_event_id(stage1.name, "billing-42", 0)] * 2
    assert await read_all(settings, [source.dlq_name]) == []


async def test_the_readme_fastavro_recipe_makes_what_the_mesh_decodes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass: the Python block of the README's "Emitting from other systems" section,
    run as it stands from the repository root, builds a value the mesh decodes as an
    event of `demo.requests` (the topic whose .avsc it reads) and a key equal to the
    topic's key of that event."""
    from topics.demo import requests

    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Emitting from other systems"):]
    block = section[section.index("```python\n") + 10:]
    block = block[:block.index("```")]
    monkeypatch.chdir(ROOT)
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)  # the README's own code
    decoded = await Codec().decode(requests, namespace["request_value"])
    assert decoded.model_dump() == {"request_id": "r1", "subject": "kafka",
                                    "audience": "general"}
    assert namespace["request_key"] == requests.key_of(decoded)
