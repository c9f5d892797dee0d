"""Bad input never kills an agent: it goes to `<topic>.dlq` with headers saying why,
and the partition moves on."""

from __future__ import annotations

import uuid

from mesh import AvroSerde, Codec, Mesh, apply_topics
from mesh.kafka.base import OutRecord
from mesh.runtime.dead_letter import (
    DLQ_AGENT,
    DLQ_ATTEMPTS,
    DLQ_ERROR,
    DLQ_ERROR_CLASS,
    DLQ_OFFSET,
    DLQ_PARTITION,
    DLQ_TOPIC,
)
from mesh.runtime.retry import FIRST_FAILURE, LAST_FAILURE
from mesh.testing.checker import Injected, check
from tests.apps.stages import Other, build
from tests.conftest import BrokerUnderTest
from tests.support import encode, history, inject, make_items, read_all, wait_for_count


def _bad(topic: str, kind: str, key: bytes, settings_limit: int) -> OutRecord:
    event = str(uuid.uuid4())
    headers: list[tuple[str, bytes]] = [("mesh-event-id", event.encode())]
    other = AvroSerde.for_model(Other)
    value = {
        "random-bytes": b"\x17\x99not avro at all\x00\xff",
        "truncated-avro": b"",  # replaced below
        "wrong-schema": other.encode(Other(name="x", size=1.5)),
        "oversize": b"\xc3\x01" + b"\x00" * (settings_limit + 1),
    }[kind]
    return OutRecord(topic, value, key, tuple(headers))


EXPECTED_ERRORS = {
    "random-bytes": "DecodeError", "truncated-avro": "DecodeError",
    "wrong-schema": "UnknownSchema", "oversize": "PayloadTooLarge",
}


async def test_each_bad_input_lands_in_the_dead_letter_topic_while_good_ones_flow(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: every bad record is in `<in>.dlq` with the original topic, partition,
    offset, error class and message; the poison item fails for good and is there too;
    every good item reaches the sink once; the agent is still running afterwards."""
    app = build(prefix)
    stage1 = app.agents[0]
    source, sink = stage1.consumes[0], stage1.produces[0]
    settings = broker.settings(max_message_bytes=4096)
    await apply_topics(settings.kafka, [source, sink])
    codec = Codec()
    items = make_items(keys=3, per_key=10, bad=[(1, 4)])
    good = [encode(codec, source, i) for i in items]
    poison_id = next(i.source_id for i in items if i.text == "poison")
    bad_records = []
    for kind in EXPECTED_ERRORS:
        record = _bad(source.name, kind, b"k1", 4096)
        if kind == "truncated-avro":
            record = OutRecord(source.name, good[0].value[:12], b"k1", record.headers)
        bad_records.append((kind, record))
    # interleave: bad ones between good ones on the same key (same partition)
    stream = good[:15] + [r for _, r in bad_records] + good[15:]
    async with Mesh(settings, [stage1]) as mesh:
        await mesh.wait_assigned()
        positions = await inject(settings, stream, batch=7)
        await wait_for_count(settings, [sink.name], len(items) - 1)
        await wait_for_count(settings, [source.dlq_name], len(bad_records) + 1)
        assert not mesh._task.done()  # noqa: SLF001 - the agent is still running
    dead = await read_all(settings, [source.dlq_name])
    by_event = {dict(r.headers)["mesh-event-id"].decode(): r for r in dead}
    for kind, sent in bad_records:
        record = by_event[dict(sent.headers)["mesh-event-id"].decode()]
        headers = {k: v.decode() for k, v in record.headers}
        assert headers[DLQ_TOPIC] == source.name
        assert headers[DLQ_ERROR_CLASS] == EXPECTED_ERRORS[kind], (kind, headers[DLQ_ERROR])
        assert headers[DLQ_ERROR]
        where = positions[stream.index(sent)]
        assert (int(headers[DLQ_PARTITION]), int(headers[DLQ_OFFSET])) == where
        assert headers[DLQ_AGENT] == stage1.name
        assert record.value == sent.value  # the original bytes, nothing lost
    poison = [r for r in dead if dict(r.headers).get("mesh-dlq-error-class") == b"ValueError"]
    assert len(poison) == 1
    # a plain exception is retried (the default policy's 3 attempts), then dead-lettered
    assert dict(poison[0].headers)[DLQ_ATTEMPTS] == b"3"
    first, last = (int(dict(poison[0].headers)[h]) for h in (FIRST_FAILURE, LAST_FAILURE))
    assert 0 < first <= last
    assert poison_id.encode() in dict(poison[0].headers)[DLQ_ERROR]
    extra = [Injected(dict(r.headers)["mesh-event-id"].decode(), f"bad-{kind}", 0, bad=True)
             for kind, r in bad_records]
    report = check(await history(settings, codec, items, sink=sink, dlq=[source],
                                 bad_ids=[poison_id], extra=extra))
    assert report.ok, report.summary()


async def test_retriable_failure_is_retried_in_place_and_succeeds(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: a handler raising TimeoutError on the first attempt succeeds on the next;
    nothing reaches the dead-letter topic."""
    app = build(prefix)
    stage1 = app.agents[0]
    source, sink = stage1.consumes[0], stage1.produces[0]
    settings = broker.settings()
    await apply_topics(settings.kafka, [source, sink])
    codec = Codec()
    items = make_items(keys=2, per_key=5)
    items = [i.model_copy(update={"text": "flaky"}) for i in items]
    async with Mesh(settings, [stage1]) as mesh:
        await mesh.wait_assigned()
        await inject(settings, [encode(codec, source, i) for i in items])
        await wait_for_count(settings, [sink.name], len(items))
    assert mesh.runners[0].dead_lettered == 0
    assert await read_all(settings, [source.dlq_name]) == []
