"""The emitter's batch path builds, in one go per event, exactly what the envelope and
the audit model give (ids, headers, audit bytes), and reports a failed send."""

from __future__ import annotations

import asyncio
import io
import re
from typing import Any

import fastavro
import pytest

from mesh.config import AuditSettings, MeshSettings
from mesh.envelope import read_headers
from mesh.errors import PayloadInvalid, TransportError
from mesh.kafka.base import BaseProducer, OutRecord
from mesh.runtime.audit import AuditEvent, audit_record, audit_topic
from mesh.runtime.emitter import Emitter, fresh_ids
from mesh.serde.codec import Codec
from mesh.serde.writer import long_bytes as _long
from mesh.topic import Topic
from tests.apps.stages import Item

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")

items = Topic("emitter-test.items", Item, key="key", partitions=2)


class Recorder(BaseProducer):
    """Keeps what is sent; a send of a record to ``failing`` fails its ack."""

    def __init__(self, failing: str | None = None) -> None:
        self.sent: list[OutRecord] = []
        self.failing = failing

    async def start(self) -> None:
        """Nothing to connect."""

    async def stop(self) -> None:
        """Nothing to flush."""

    async def send(self, record: OutRecord) -> Any:
        self.sent.append(record)
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if record.topic == self.failing:
            ack.set_exception(RuntimeError("not leader"))
        else:
            ack.set_result(type("Meta", (), {"partition": 0, "offset": len(self.sent)})())
        return ack


def emitter_with(producer: Recorder, *, payloads: bool = False) -> Emitter:
    settings = MeshSettings().model_copy(update={"audit": AuditSettings(payloads=payloads)})
    return Emitter(settings, source="billing", producer=producer, codec=Codec())  # type: ignore[arg-type]


def test_fresh_ids_are_distinct_uuid4_and_sampled_trace_contexts() -> None:
    ids = fresh_ids(500)
    assert len({event_id for event_id, _ in ids}) == 500
    assert len({trace[3:35] for _, trace in ids}) == 500
    assert all(UUID4.match(event_id) and TRACEPARENT.match(trace) for event_id, trace in ids)


async def test_each_record_carries_what_the_envelope_would_give() -> None:
    """Headers, key and value of every emitted record read back as the returned
    envelope; the value is the codec's encoding of the payload."""
    producer = Recorder()
    emitter = emitter_with(producer)
    payloads = [Item(key=f"k{i}", seq=i, source_id="a") for i in range(3)]
    envs = await emitter.emit(items, payloads, correlation_id="wf-1")
    records = [r for r in producer.sent if r.topic == items.name]
    assert len(records) == 3
    for record, env, payload in zip(records, envs, payloads, strict=True):
        assert record.headers == tuple(env.headers())
        assert record.key == f"k{payload.seq}".encode() == env.key
        assert record.value == emitter.codec.encode(items, payload)[0]
        back = read_headers(record.headers, topic=items.name, partition=0, offset=0)
        assert (back.event_id, back.correlation_id, back.traceparent, back.source,
                back.attempt, back.schema, back.causation_id) == (
            env.event_id, "wf-1", env.traceparent, "billing", 1, env.schema, None)
    assert len({env.event_id for env in envs}) == 3


async def test_record_with_an_event_id_and_no_correlation_correlates_by_it() -> None:
    emitter = emitter_with(Recorder())
    await emitter.codec.prepare([items])
    record, env = emitter.record(items, Item(key="k", seq=1, source_id="a"), key=b"x",
                                 event_id="e-1")
    assert (env.event_id, env.correlation_id, env.key, record.key) == ("e-1", "e-1", b"x",
                                                                       b"x")
    assert record.headers == tuple(env.headers())


@pytest.mark.parametrize("payloads", [False, True])
async def test_the_audit_records_are_byte_for_byte_the_models_encoding(payloads: bool) -> None:
    """`produced` audit records are built straight in Avro form: exactly the bytes,
    key and headers of encoding the AuditEvent model."""
    producer = Recorder()
    emitter = emitter_with(producer, payloads=payloads)
    envs = await emitter.emit(items, [Item(key="k", seq=i, source_id="a") for i in range(2)])
    audits = [r for r in producer.sent if r.topic == audit_topic.name]
    sizes = [len(r.value or b"") for r in producer.sent if r.topic == items.name]
    assert len(audits) == 2
    for record, env, size in zip(audits, envs, sizes, strict=True):
        decoded = await emitter.codec.decode(audit_topic, record.value or b"")
        assert isinstance(decoded, AuditEvent)
        model = AuditEvent(kind="produced", at_ms=decoded.at_ms, agent="billing",
                           topic=items.name, event_id=env.event_id,
                           correlation_id=env.correlation_id, traceparent=env.traceparent,
                           attempt=1, size=size,
                           payload=env.payload.model_dump_json() if payloads else None,
                           details={"replica": emitter.auditor.replica})
        assert record == audit_record(emitter.codec, model, source="billing")


async def test_a_payload_of_another_model_is_refused_before_anything_is_sent() -> None:
    producer = Recorder()
    other = Topic("emitter-test.audit-shaped", AuditEvent)
    with pytest.raises(PayloadInvalid):
        await emitter_with(producer).emit(other, [Item(key="k", seq=1, source_id="a")])
    assert producer.sent == []


async def test_a_failed_acknowledgement_is_reported() -> None:
    """The batch is queued, then its acks awaited together: one failed ack still
    fails the call."""
    producer = Recorder(failing=audit_topic.name)
    with pytest.raises(TransportError, match="not leader"):
        await emitter_with(producer).emit(items, [Item(key="k", seq=1, source_id="a")])



def test_the_hand_written_avro_longs_are_fastavros() -> None:
    for n in (0, 1, -1, 63, 64, -64, -65, 300, 2**31, -2**31, 1_764_660_000_000,
              2**63 - 1, -2**63):
        out = io.BytesIO()
        fastavro.schemaless_writer(out, "long", n)
        assert _long(n) == out.getvalue(), n
