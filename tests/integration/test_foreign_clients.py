"""Records from a Kafka client the project did not write: confluent-kafka (librdkafka).

What the README's "Emitting from other systems" section promises a foreign producer,
checked with that client: values framed from the committed ``.avsc`` with fastavro
alone, keys as the key field in UTF-8, no mesh header at all, every compression codec,
its own partitioner (noticed and counted, silent with ``partitioner=murmur2_random``),
and ``mesh-event-id`` making a retried copy the same event. A batch the mesh cannot
decompress stops the agent once, naming where and the fix. With a schema registry (a
Confluent-compatible one over real HTTP on loopback), values from confluent-kafka's
``AvroSerializer`` (subject ``<topic>-value``) are handled, a newer writer schema is
fetched by id and resolved, and its ``AvroDeserializer`` reads what the agents write.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import aiokafka.codec
import confluent_kafka
import fastavro
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient, topic_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from fastavro.schema import fingerprint, to_parsing_canonical_form
from prometheus_client import CollectorRegistry

from mesh import Codec, Mesh, MeshSettings, apply_topics
from mesh.config import AuditSettings, SchemaRegistrySettings
from mesh.envelope import derive_event_id
from mesh.errors import UnreadableBatch
from mesh.kafka.base import Record
from mesh.kafka.murmur import partition_for
from mesh.runtime.metrics import MeshMetrics
from mesh.serde.history import export_schemas
from mesh.topic import Topic
from tests.apps.stages import Item, build
from tests.conftest import ROOT, BrokerUnderTest
from tests.integration.test_cli import Cli
from tests.support import event_id, make_items, read_all, wait_for_count
from tests.unit.test_codec import FakeSchemaRegistry

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


Headers = list[tuple[str, str | bytes | None]]
Message = tuple[bytes, bytes, Headers]  # key, value, headers


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
              headers: Headers | None = None) -> list[Message]:
    return [(i.key.encode(), foreign_value(avsc, i.model_dump()), list(headers or []))
            for i in items]


async def _decoded(codec: Codec, topic: Topic[Any], records: list[Record]) -> list[Item]:
    """The items ``records`` of ``topic`` hold, decoded as the mesh decodes them."""
    decoded = [await codec.decode(topic, r.value or b"") for r in records]
    assert all(isinstance(i, Item) for i in decoded), decoded
    return cast(list[Item], decoded)


def _compressible(items: list[Item]) -> list[Item]:
    return [i.model_copy(update={"text": f"{i.text} " + "compress me " * 40}) for i in items]


async def test_gzip_snappy_lz4_and_zstd_batches_from_librdkafka_are_handled_and_tapped(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path, cli: Cli) -> None:
    """Pass: confluent-kafka batches compressed with each codec, values framed from the
    .avsc with fastavro alone and no mesh header, are all handled by a running agent
    (every item once in its output topic), and `mesh tap` (the reader `mesh dlq` and
    `mesh trace` use too) prints every one of them. Each batch holds one garbage value
    too: the agent dead-letters exactly those, `mesh dlq list` shows each as a
    DecodeError pointing at its record in the compressed input, and `mesh trace` of a
    compressed event's correlation id shows the agent's handling and its output. Each
    batch really is compressed with its codec: a reader without that codec cannot read
    it."""
    stage1, source, sink, avsc = _setup(prefix, tmp_path)
    settings = broker.settings()
    await apply_topics(settings.kafka, [source, sink])
    items = _compressible(make_items(keys=4, per_key=5 * len(CODECS)))
    per_codec = len(items) // len(CODECS)
    garbage = {codec: b"\x01\x02" + f"garbage {codec} ".encode() * 40 for codec in CODECS}
    for n, codec in enumerate(CODECS):  # the garbage amid items of its key, one batch
        chunk = _messages(avsc, items[n * per_codec:(n + 1) * per_codec])
        chunk.insert(len(chunk) // 2, (chunk[0][0], garbage[codec], []))
        await produce(broker.bootstrap, source.name, chunk,
                      **{"compression.type": codec, "partitioner": "murmur2_random"})
    async with Mesh(settings, [stage1]) as mesh:
        await mesh.wait_assigned()
        outputs = await wait_for_count(settings, [sink.name], len(items))
        await wait_for_count(settings, [source.dlq_name], len(CODECS), distinct=False)
    handled = await _decoded(mesh.codec, sink, outputs)
    assert sorted(i.source_id for i in handled) == sorted(i.source_id for i in items)

    shown = [json.loads(line) for line in (await cli.ok(
        "tap", source.name, "--from-beginning", "--no-follow", "--json", "-t", TOPICS)
    ).splitlines() if line.startswith("{")]
    assert sorted(s["payload"]["source_id"] for s in shown if "payload" in s) == sorted(
        i.source_id for i in items)
    assert sum("DecodeError" in s.get("error", "") for s in shown) == len(CODECS)

    letters = [json.loads(line) for line in (await cli.ok(
        "dlq", "list", source.name, "--json", "-t", TOPICS)).splitlines()]
    inputs = {(r.partition, r.offset): r.value for r in await read_all(settings, [source.name])}
    assert sorted(inputs[d["origin_partition"], d["origin_offset"]] or b"" for d in letters
                  ) == sorted(garbage.values())
    for letter in letters:
        assert (letter["origin_topic"], letter["error_class"], letter["agent"]) == (
            source.name, "DecodeError", stage1.name), letter
        assert "payload" not in letter and letter["error"], letter

    correlation = dict(outputs[0].headers)["mesh-correlation"].decode()
    tree = json.loads(await cli.ok("trace", correlation, "--json"))
    [root] = tree["roots"]
    assert root["topic"] == source.name and root["event_id"] == correlation
    assert [(h["agent"], h["outcome"]) for h in root["consumed_by"]] == [(stage1.name, "ok")]
    assert [c["topic"] for c in root["children"]] == [sink.name]

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
    assert isinstance(decoded, requests.model)
    assert decoded.model_dump() == {"request_id": "r1", "subject": "kafka",
                                    "audience": "general"}
    assert namespace["request_key"] == requests.key_of(decoded)


class LoopbackRegistry(FakeSchemaRegistry):
    """The tests' Confluent-compatible registry (a real HTTP server on 127.0.0.1), as
    confluent-kafka's client calls it: the query strings it adds to the same three calls
    (``?normalize=false``, ``?subject=...``) select nothing here."""

    def answer(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        return super().answer(method, urlsplit(path).path, body)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackRegistry]:
    """A registry on loopback, reached directly by both HTTP clients (no proxy)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    fake = LoopbackRegistry()
    with fake:
        yield fake


def _with_registry(broker: BrokerUnderTest, registry: LoopbackRegistry) -> MeshSettings:
    """The session's settings with ``MESH_SCHEMA_REGISTRY__URL``; without the audit, so
    the session's shared audit topic stays readable without this test's registry."""
    return broker.settings().model_copy(update={
        "schema_registry": SchemaRegistrySettings(url=registry.url),
        "audit": AuditSettings(enabled=False)})


async def _avro_serialized(registry: LoopbackRegistry, topic: str, schema: dict[str, Any],
                           items: list[Item]) -> list[Message]:
    """What a confluent-kafka producer following the README writes: the key field as
    UTF-8, the value by ``AvroSerializer`` with the subject ``<topic>-value``
    (TopicNameStrategy; it registers the schema there), no header."""
    def run() -> list[Message]:
        serializer = AvroSerializer(
            SchemaRegistryClient({"url": registry.url}), json.dumps(schema),
            conf={"auto.register.schemas": True,
                  "subject.name.strategy": topic_subject_name_strategy})
        context = SerializationContext(topic, MessageField.VALUE)
        return [(i.key.encode(), serializer(i.model_dump(), context), []) for i in items]

    return await asyncio.to_thread(run)


def _schema_id(value: bytes) -> int:
    assert value[:1] == b"\x00", f"not the Confluent wire format: {value[:8].hex()}"
    return int.from_bytes(value[1:5], "big")


async def test_avroserializer_values_are_handled_and_avrodeserializer_reads_the_outputs(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path,
        registry: LoopbackRegistry) -> None:
    """Pass (the README's Confluent wire format bullet, both ways): with the registry
    configured, an agent handles every value confluent-kafka's AvroSerializer made from
    the topic's committed .avsc (framed `00` + the id registered under
    `<topic>-value`), nothing is dead-lettered, and confluent-kafka's AvroDeserializer
    reads each of the agent's outputs (the id registered under `<output>-value`) as the
    handled item."""
    stage1, source, sink, avsc = _setup(prefix, tmp_path)
    settings = _with_registry(broker, registry)
    await apply_topics(settings.kafka, [source, sink])
    items = make_items(keys=4, per_key=3)
    async with Mesh(settings, [stage1]) as mesh:
        await mesh.wait_assigned()
        messages = await _avro_serialized(registry, source.name, json.loads(avsc.read_text()),
                                          items)
        await produce(broker.bootstrap, source.name, messages, partitioner="murmur2_random")
        outputs = await wait_for_count(settings, [sink.name], len(items))
    assert {_schema_id(value) for _, value, _ in messages} <= set(
        registry.subjects[f"{source.name}-value"])
    handled = await _decoded(mesh.codec, sink, outputs)
    assert sorted((i.model_dump() for i in handled), key=lambda d: d["source_id"]) == sorted(
        ({**i.model_dump(), "hops": ["stage1"]} for i in items),  # the stage's mark
        key=lambda d: d["source_id"])
    assert await read_all(settings, [source.dlq_name]) == []

    deserializer = AvroDeserializer(SchemaRegistryClient({"url": registry.url}))
    context = SerializationContext(sink.name, MessageField.VALUE)
    read_back = await asyncio.to_thread(
        lambda: [deserializer(r.value, context) for r in outputs])
    assert read_back == [i.model_dump() for i in handled]
    assert {_schema_id(r.value or b"") for r in outputs} <= set(
        registry.subjects[f"{sink.name}-value"])


async def test_a_newer_avroserializer_schema_is_fetched_from_the_registry_and_resolved(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path,
        registry: LoopbackRegistry) -> None:
    """Pass (the README: "agents fetch an unknown schema id from the registry once"): a
    foreign producer a version ahead (the .avsc plus a field with a default) registers
    a new version of `<topic>-value` with AvroSerializer; the running agent fetches that
    id from the registry, resolves each record to the topic's model by Avro's rules and
    handles it (every field the model has, as sent), nothing is dead-lettered, and a
    second round of such records (the id now known) makes no request for it at all."""
    stage1, source, sink, avsc = _setup(prefix, tmp_path)
    settings = _with_registry(broker, registry)
    await apply_topics(settings.kafka, [source, sink])
    newer = json.loads(avsc.read_text())
    newer["fields"].append({"name": "origin", "type": "string", "default": "erp"})
    first, second = make_items(keys=3, per_key=2), make_items(keys=3, per_key=2)
    fetches: list[int] = []
    async with Mesh(settings, [stage1]) as mesh:
        await mesh.wait_assigned()
        known = set(registry.schemas)
        sent: list[Message] = []
        for items in (first, second):
            messages = await _avro_serialized(registry, source.name, newer, items)
            await produce(broker.bootstrap, source.name, messages, partitioner="murmur2_random")
            sent += messages
            outputs = await wait_for_count(settings, [sink.name], len(sent))
            [written] = {_schema_id(value) for _, value, _ in sent}
            fetches.append(registry.requests.count(("GET", f"/schemas/ids/{written}")))
    assert written not in known and written in registry.subjects[f"{source.name}-value"]
    # The 3 keys' inputs are decoded at once: they wait for one request, then never ask.
    assert fetches == [1, 1], fetches
    handled = await _decoded(mesh.codec, sink, outputs)
    assert sorted((i.model_dump() for i in handled), key=lambda d: d["source_id"]) == sorted(
        ({**i.model_dump(), "hops": ["stage1"]} for i in first + second),
        key=lambda d: d["source_id"])
    assert await read_all(settings, [source.dlq_name]) == []
