"""Compiled Avro writers (mesh.serde.writer) write exactly fastavro's bytes, refuse what
they do not write (fastavro then writes it), and the audit records written by pieces are
the AuditEvent model's encoding."""

from __future__ import annotations

import enum
import io
from typing import Any, Literal

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from mesh.config import AuditSettings
from mesh.envelope import Envelope
from mesh.errors import DecodeError, PayloadInvalid
from mesh.kafka.base import OutRecord, Record
from mesh.runtime.audit import AuditEvent, Auditor, AuditOutput, audit_record
from mesh.serde.avro import AvroSerde
from mesh.serde.codec import Codec
from mesh.serde.writer import UNWRITTEN, RecordTemplate, compile_writer, long_bytes
from tests.apps.stages import Item


class Shade(enum.StrEnum):
    light = "light"
    dark = "dark"


class Part(BaseModel):
    name: str
    tags: list[str] = []
    weight: float | None = None


class Plain(BaseModel):
    s: str
    i: int
    f: float
    b: bool
    by: bytes
    o: str | None = None
    o2: int | None = 7
    later: str | None = "x"  # a default: the union is written [string, null]
    items: list[int] = []
    d: dict[str, float] = {}
    part: Part
    parts: list[Part] = []
    maybe: Part | None = None
    lit: Literal["a", "b"] = "a"
    shade: Shade = Shade.dark
    j: Any = None


def fastavro_body(serde: AvroSerde, payload: BaseModel) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, serde.parsed, serde.to_avro(payload))
    return out.getvalue()


_longs = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_floats = st.floats(allow_nan=False)
_parts = st.builds(Part, name=st.text(), tags=st.lists(st.text(max_size=4), max_size=3),
                   weight=st.none() | _floats)
_plains = st.builds(
    Plain, s=st.text(), i=_longs, f=_floats, b=st.booleans(), by=st.binary(),
    o=st.none() | st.text(), o2=st.none() | _longs, later=st.none() | st.text(max_size=3),
    items=st.lists(_longs, max_size=70), d=st.dictionaries(st.text(max_size=5), _floats),
    part=_parts, parts=st.lists(_parts, max_size=3), maybe=st.none() | _parts,
    lit=st.sampled_from(["a", "b"]), shade=st.sampled_from(Shade),
    j=st.none() | st.dictionaries(st.text(max_size=3), _longs, max_size=2))


@settings(max_examples=150, deadline=None)
@given(payload=_plains)
def test_the_compiled_writer_writes_fastavros_bytes(payload: Plain) -> None:
    serde = AvroSerde.for_model(Plain)
    assert serde.write is not None

    assert serde.write(serde.to_avro(payload)) == fastavro_body(serde, payload)
    assert serde.body(payload) == fastavro_body(serde, payload)


@pytest.mark.parametrize("n", [0, 1, -1, 63, 64, -64, -65, 8191, 8192, 2**31, -(2**40),
                               2**63 - 1, -(2**63), 1_700_000_000_000_000_000])
def test_longs_are_fastavros(n: int) -> None:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, "long", n)
    assert long_bytes(n) == out.getvalue()


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, True, 1.0, "1"])
def test_a_long_it_does_not_write_is_refused(value: Any) -> None:
    with pytest.raises(UNWRITTEN):
        long_bytes(value)


def test_a_value_of_another_type_is_left_to_fastavro() -> None:
    """model_construct skips validation: an int in a float field, a bool in an int
    field, a bool in a nullable int, a too large int. The compiled writer refuses them;
    fastavro coerces the first two as it always did and refuses the others
    (PayloadInvalid)."""
    serde = AvroSerde.for_model(Plain)
    base = Plain(s="s", i=1, f=1.5, b=True, by=b"", part=Part(name="p"))
    for update in ({"f": 2}, {"i": True}):
        odd = base.model_copy(update=update)
        with pytest.raises(UNWRITTEN):
            serde.write(serde.to_avro(odd))  # type: ignore[misc]
        assert serde.body(odd) == fastavro_body(serde, odd)
    for update in ({"o2": False}, {"i": 2**64}):
        with pytest.raises(PayloadInvalid):
            serde.body(base.model_copy(update=update))


def test_schemas_with_logical_types_or_wide_unions_are_left_to_fastavro() -> None:
    def parsed(field_type: Any) -> Any:
        return fastavro.parse_schema({"type": "record", "name": "R", "fields": [
            {"name": "x", "type": field_type}]})

    assert compile_writer(parsed({"type": "long", "logicalType": "timestamp-micros"})) is None
    assert compile_writer(parsed(["null", "string", "long"])) is None
    assert compile_writer(parsed({"type": "string", "logicalType": "uuid"})) is not None


def test_a_template_writes_the_whole_records_bytes() -> None:
    serde = AvroSerde.for_model(Plain)
    template = RecordTemplate(serde.parsed, {"s": "same", "part": {"name": "p", "tags": [],
                                                                   "weight": None}})
    payload = Plain(s="same", i=-5, f=0.25, b=False, by=b"\x00", o="o",
                    part=Part(name="p"), parts=[Part(name="q", weight=2.0)])
    data = serde.to_avro(payload)
    varying = {k: v for k, v in data.items() if k not in ("s", "part")}

    assert template.write(varying) == fastavro_body(serde, payload)


async def test_audit_records_without_payloads_are_the_models_encoding() -> None:
    """The consumed and produced records written by pieces (payloads off: the default),
    against encoding the AuditEvent model, for an output correlated elsewhere too."""
    codec = Codec()
    auditor = Auditor(codec, AuditSettings(), source="stage1")
    event = Envelope.new(Item(key="k", seq=1, source_id="a"), source="emit",
                         correlation_id="wf-1")
    record = Record("in", 2, 40, b"k", b"x" * 300, (), 0)
    same = event.child(Item(key="k", seq=2, source_id="a"), agent="stage1", index=0, key=b"k")
    other = event.child(Item(key="k", seq=3, source_id="a"), agent="stage1", index=1,
                        key=b"k", correlation_id="wf-2")
    outputs = [(same, OutRecord("a", b"y" * 7)), (other, OutRecord("b", b"z" * 200))]
    for env, error, outs in ((event, None, outputs), (None, DecodeError("bad"), [])):
        [fast] = auditor.consumed(record, env, outcome="ok", started_ms=1_000,
                                  duration_s=0.0125, error=error, outputs=outs)
        model = AuditEvent(
            kind="consumed", at_ms=1_000, agent="stage1", topic="in", partition=2, offset=40,
            event_id=env.event_id if env else None,
            correlation_id=env.correlation_id if env else None,
            causation_id=env.causation_id if env else None,
            traceparent=env.traceparent if env else None, outcome="ok", duration_ms=12.5,
            attempt=env.attempt if env else None,
            error_class=type(error).__name__ if error else None,
            error=str(error) if error else None, size=300,
            details={"replica": auditor.replica},
            outputs=[AuditOutput(event_id=o.event_id, topic=r.topic, size=len(r.value or b""),
                                 traceparent=o.traceparent,
                                 correlation_id=None if o is same else "wf-2")
                     for o, r in outs])
        assert fast == audit_record(codec, model, source="stage1")
    [produced] = auditor.produced([(other, OutRecord("b", b"z" * 200))], at_ms=5)
    model = AuditEvent(kind="produced", at_ms=5, agent="stage1", topic="b",
                       event_id=other.event_id, correlation_id="wf-2",
                       causation_id=event.event_id, traceparent=other.traceparent, attempt=1,
                       size=200, details={"replica": auditor.replica})
    assert produced == audit_record(codec, model, source="stage1")


@pytest.mark.parametrize("size", [0, 63, 64, 127, 1024, 8191, 8192, 70_000])
def test_strings_and_bytes_of_every_length_class_are_fastavros(size: int) -> None:
    serde = AvroSerde.for_model(Plain)
    payload = Plain(s="é" * (size // 2) + "x" * (size % 2), i=size, f=0.0, b=True,
                    by=b"\x01" * size, part=Part(name="n" * size), items=list(range(size % 200)))

    assert serde.write is not None
    assert serde.write(serde.to_avro(payload)) == fastavro_body(serde, payload)
