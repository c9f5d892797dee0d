"""Unit tests for the schema history: records written with an older (or newer) version of
a topic's model decode through ``schemas/history/<fingerprint>.avsc``, ``mesh schemas
export`` keeps that history append-only, and ``mesh schemas check`` fails without it.

V1, V2 and V3 hold three versions of one model (same name, same namespace): V2 adds an
optional field with a default (compatible), V3 adds a required field (incompatible).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import fastavro
import fastavro.utils
import pytest
from fastavro.read import SchemaResolutionError
from pydantic import BaseModel

from mesh.serde.codec import Codec
from mesh.errors import DecodeError, InputError, UnknownSchema
from mesh.runtime.audit import audit_topic
from mesh.patterns.gather import GatherState
from mesh.serde.history import SchemaHistory, check_schemas, export_schemas, remember
from mesh.serde.avro import AvroSerde
from mesh.topic import Topic, discover_topics

ROOT = Path(__file__).resolve().parents[2]
REPO_HISTORY = ROOT / "schemas" / "history"


class V1:
    class Order(BaseModel):
        order_id: str
        qty: int


class V2:
    class Order(BaseModel):
        order_id: str
        qty: int
        note: str | None = None  # added: optional, with a default


class V3:
    class Order(BaseModel):
        order_id: str
        qty: int
        priority: int  # added: required, no default


class Invoice(BaseModel):
    invoice_id: str


def _topic(model: type[BaseModel]) -> Topic[Any]:
    return Topic("shop.orders", model, key="order_id")


def _frame(model: type[BaseModel], payload: BaseModel) -> bytes:
    return AvroSerde.for_model(model).encode(payload)


def _history(tmp_path: Path, *models: type[BaseModel]) -> Path:
    directory = tmp_path / "history"
    for model in models:
        remember(AvroSerde.for_model(model).schema, directory)
    return directory


# --- decoding through the history ------------------------------------------------------


async def test_older_version_decodes_into_the_new_model_through_the_history(
        tmp_path: Path) -> None:
    """Pass: a V1 record (fingerprint not V2's) decodes as V2 with the new field's
    default, the writer schema found in the history directory."""
    data = _frame(V1.Order, V1.Order(order_id="o1", qty=2))
    codec = Codec(history=_history(tmp_path, V1.Order))
    assert data[2:10].hex() != codec.serde(V2.Order).fingerprint

    assert await codec.decode(_topic(V2.Order), data) == V2.Order(order_id="o1", qty=2)


async def test_newer_version_decodes_with_an_older_reader_when_the_history_has_it(
        tmp_path: Path) -> None:
    """Pass: forward compatibility: a V2 record decodes as V1 (the new field skipped)
    once V2's schema is in the reader's history, e.g. deployed before the producers."""
    data = _frame(V2.Order, V2.Order(order_id="o1", qty=2, note="rush"))

    decoded = await Codec(history=_history(tmp_path, V2.Order)).decode(_topic(V1.Order), data)

    assert decoded == V1.Order(order_id="o1", qty=2)


async def test_learned_writer_schema_decodes_without_a_history_directory(
        tmp_path: Path) -> None:
    """Pass: a writer schema given to Codec.learn (as JSON text) resolves like a file."""
    codec = Codec(history=tmp_path / "nothing-here")
    old = AvroSerde.for_model(V1.Order)

    fp = codec.learn(json.dumps(old.schema))

    assert fp == old.fingerprint
    decoded = await codec.decode(_topic(V2.Order), old.encode(V1.Order(order_id="o", qty=1)))
    assert decoded == V2.Order(order_id="o", qty=1)


async def test_unknown_fingerprint_raises_unknown_schema_naming_it_and_the_fix(
        tmp_path: Path) -> None:
    """Pass: with an empty history, a V1 record on a V2 topic is UnknownSchema, and the
    message names the topic, the writer fingerprint, the history and what to deploy."""
    old = AvroSerde.for_model(V1.Order)
    history = tmp_path / "history"

    with pytest.raises(UnknownSchema) as raised:
        await Codec(history=history).decode(_topic(V2.Order),
                                            old.encode(V1.Order(order_id="o", qty=1)))

    message = str(raised.value)
    assert "shop.orders" in message and old.fingerprint in message
    assert str(history) in message and "mesh schemas export" in message
    assert "names it other than mesh.Order" in message  # a producer's own naming


async def test_incompatible_version_is_a_decode_error_naming_topic_fingerprint_and_field(
        tmp_path: Path) -> None:
    """Pass: V1 bytes cannot become V3 (a required field without a default): an
    InputError (so: dead-letter topic), naming the topic, V1's fingerprint and the field."""
    old = AvroSerde.for_model(V1.Order)
    codec = Codec(history=_history(tmp_path, V1.Order))

    with pytest.raises(DecodeError) as raised:
        await codec.decode(_topic(V3.Order), old.encode(V1.Order(order_id="o", qty=1)))

    assert isinstance(raised.value, InputError) and not raised.value.retriable
    assert not isinstance(raised.value, UnknownSchema)
    message = str(raised.value)
    assert "shop.orders" in message and old.fingerprint in message
    assert "priority: added without a default" in message


async def test_changed_field_type_names_the_field(tmp_path: Path) -> None:
    """Pass: a field whose type changed incompatibly (long -> string) is named with both
    types."""

    class Order(BaseModel):  # the same name and namespace as V1.Order: a fourth version
        order_id: str
        qty: str

    codec = Codec(history=_history(tmp_path, V1.Order))

    with pytest.raises(DecodeError, match="qty: long -> string"):
        await codec.decode(_topic(Order), _frame(V1.Order, V1.Order(order_id="o", qty=1)))


async def test_schema_of_another_model_in_the_history_is_still_unknown_for_this_topic(
        tmp_path: Path) -> None:
    """Pass: the history holds every topic's schemas; a record written with another
    model's (Invoice) stays UnknownSchema on the orders topic, naming both records."""
    codec = Codec(history=_history(tmp_path, Invoice))

    with pytest.raises(UnknownSchema,
                       match=r"Invoice \(namespace mesh\), not a version of .*Order"):
        await codec.decode(_topic(V2.Order), _frame(Invoice, Invoice(invoice_id="i")))


async def test_history_file_whose_content_has_another_fingerprint_is_ignored(
        tmp_path: Path) -> None:
    """Pass: a history file named for V1's fingerprint but holding Invoice's schema is
    not used (UnknownSchema, nothing decoded from the wrong schema)."""
    history = tmp_path / "history"
    history.mkdir()
    v1 = AvroSerde.for_model(V1.Order)
    (history / f"{v1.fingerprint}.avsc").write_text(json.dumps(
        AvroSerde.for_model(Invoice).schema))

    with pytest.raises(UnknownSchema, match=v1.fingerprint):
        await Codec(history=history).decode(_topic(V2.Order),
                                            v1.encode(V1.Order(order_id="o", qty=1)))


async def test_history_is_read_per_fingerprint_and_sees_files_added_later(
        tmp_path: Path) -> None:
    """Pass: a fingerprint missing at first is found once its file is deployed (misses
    are not cached), and then served from memory (the file may go)."""
    history = tmp_path / "history"
    codec = Codec(history=history)
    data = _frame(V1.Order, V1.Order(order_id="o", qty=1))
    with pytest.raises(UnknownSchema):
        await codec.decode(_topic(V2.Order), data)

    written = remember(AvroSerde.for_model(V1.Order).schema, history)
    assert await codec.decode(_topic(V2.Order), data) == V2.Order(order_id="o", qty=1)
    assert written is not None
    written.unlink()
    assert await codec.decode(_topic(V2.Order), data) == V2.Order(order_id="o", qty=1)


def test_fingerprint_that_is_not_hex_never_becomes_a_path(tmp_path: Path) -> None:
    (tmp_path / "..avsc").write_text("{}")

    assert SchemaHistory(tmp_path).get("../../etc/passwd") is None
    assert SchemaHistory(tmp_path).get(".") is None


# --- export and check -------------------------------------------------------------------


def test_export_keeps_every_replaced_schema_in_the_history(tmp_path: Path) -> None:
    """Pass: exporting V1 then V2 of a topic leaves V2 in <topic>.avsc and both versions
    in history/<fingerprint>.avsc; each export reports what it added."""
    v1, v2 = AvroSerde.for_model(V1.Order), AvroSerde.for_model(V2.Order)

    first = export_schemas([_topic(V1.Order)], tmp_path)
    second = export_schemas([_topic(V2.Order)], tmp_path)

    assert first.schemas == second.schemas == [tmp_path / "shop.orders.avsc"]
    assert first.history == [tmp_path / "history" / f"{v1.fingerprint}.avsc"]
    assert second.history == [tmp_path / "history" / f"{v2.fingerprint}.avsc"]
    assert json.loads((tmp_path / "shop.orders.avsc").read_text()) == v2.schema
    assert {p.name for p in (tmp_path / "history").iterdir()} == {
        f"{v1.fingerprint}.avsc", f"{v2.fingerprint}.avsc"}


def test_export_keeps_a_schema_file_written_before_the_history_existed(
        tmp_path: Path) -> None:
    """Pass: a <topic>.avsc from before the history (no history/ yet) is kept when a new
    version replaces it."""
    v1 = AvroSerde.for_model(V1.Order)
    (tmp_path / "shop.orders.avsc").write_text(json.dumps(v1.schema, indent=2))

    export_schemas([_topic(V2.Order)], tmp_path)

    assert (tmp_path / "history" / f"{v1.fingerprint}.avsc").exists()


def test_export_never_rewrites_or_deletes_history_files(tmp_path: Path) -> None:
    """Pass: going back to V1 adds nothing, deletes nothing, and leaves an existing
    history file's bytes as they were (append-only)."""
    export_schemas([_topic(V1.Order)], tmp_path)
    export_schemas([_topic(V2.Order)], tmp_path)
    v1_file = tmp_path / "history" / f"{AvroSerde.for_model(V1.Order).fingerprint}.avsc"
    v1_file.write_text(v1_file.read_text().replace('"Order"', ' "Order"'))  # same schema
    before = {p.name: p.read_bytes() for p in (tmp_path / "history").iterdir()}

    again = export_schemas([_topic(V1.Order)], tmp_path)

    assert again.history == []
    assert {p.name: p.read_bytes() for p in (tmp_path / "history").iterdir()} == before


def test_check_fails_when_the_history_lacks_the_current_schema(tmp_path: Path) -> None:
    """Pass: after an export the check passes; with the current schema's history file
    gone it names that file and the topic (a forgotten export in CI)."""
    export_schemas([_topic(V2.Order)], tmp_path)
    assert check_schemas([_topic(V2.Order)], tmp_path) == []
    current = tmp_path / "history" / f"{AvroSerde.for_model(V2.Order).fingerprint}.avsc"
    current.unlink()

    problems = check_schemas([_topic(V2.Order)], tmp_path)

    lacks = f"{current} is missing: the history lacks the current schema of shop.orders"
    assert problems == [lacks]


def test_check_names_a_history_file_that_holds_another_schema(tmp_path: Path) -> None:
    export_schemas([_topic(V2.Order)], tmp_path)
    wrong = tmp_path / "history" / "0123456789abcdef.avsc"
    wrong.write_text(json.dumps(AvroSerde.for_model(V1.Order).schema))

    problems = check_schemas([_topic(V2.Order)], tmp_path)

    fp = AvroSerde.for_model(V1.Order).fingerprint
    assert problems == [f"{wrong} holds schema {fp}: rename it to {fp}.avsc"]


# --- the repository's own history -------------------------------------------------------


def _declared() -> list[Topic[Any]]:
    found = discover_topics("topics")
    found.setdefault(audit_topic.name, audit_topic)
    return list(found.values())


def test_every_older_committed_version_resolves_to_the_current_model() -> None:
    """Pass: for each declared topic, every other version of its record in
    schemas/history resolves to the current schema (20 generated records each, a fixed
    seed): no model change so far strands records written by an earlier commit. Fails
    on an incompatible change (a required field added, a type changed)."""
    history = [fastavro.parse_schema(json.loads(p.read_text()))
               for p in sorted(REPO_HISTORY.glob("*.avsc"))]
    state = random.getstate()
    random.seed(7)
    checked, failures = 0, []
    try:
        for topic in _declared():
            reader = AvroSerde.for_model(topic.model).parsed
            for writer in history:
                if writer["name"].rsplit(".", 1)[-1] != reader["name"].rsplit(".", 1)[-1] or writer == reader:
                    continue
                checked += 1
                for record in fastavro.utils.generate_many(writer, 20):
                    body = io.BytesIO()
                    fastavro.schemaless_writer(body, writer, record)
                    body.seek(0)
                    try:
                        fastavro.schemaless_reader(body, writer, reader)
                    except SchemaResolutionError as exc:
                        failures.append(f"{topic.name}: {exc}")
                        break
    finally:
        random.setstate(state)
    assert checked > 0, "no older versions in schemas/history: the test checked nothing"
    assert failures == []


async def test_gather_state_written_before_traceparent_was_added_restores() -> None:
    """Pass: a gather-state row written by commit c6c09f5 (before `traceparent`) decodes
    into today's GatherState through the committed history, as a state restore does."""
    old_fp = "84281da2fb305d17"  # research.gather-state as committed in c6c09f5
    writer = fastavro.parse_schema(json.loads((REPO_HISTORY / f"{old_fp}.avsc").read_text()))
    state = GatherState(correlation_id="c1", partition=2, created_ms=5, expected=["a", "b"],
                        deadline_at_ms=9, applied=["e1"])
    codec = Codec(history=REPO_HISTORY)
    serde = codec.serde(GatherState)
    assert old_fp != serde.fingerprint and "traceparent" not in json.dumps(writer)
    body = io.BytesIO()
    fastavro.schemaless_writer(body, writer, serde.to_avro(state))

    restored = await codec.decode(Topic("research.gather-state", GatherState),
                                  b"\xc3\x01" + bytes.fromhex(old_fp) + body.getvalue())

    assert restored == state


async def test_values_written_with_the_module_namespaced_committed_schemas_decode() -> None:
    """Pass: a demo.requests value framed with the schema committed when records were
    named by their Python module (topics.demo.ResearchRequest, fingerprint
    5167cad29b1bbaa3) decodes as today's mesh.ResearchRequest through the committed
    history: Avro resolves records by unqualified name."""
    old_fp = "5167cad29b1bbaa3"
    writer = fastavro.parse_schema(json.loads((REPO_HISTORY / f"{old_fp}.avsc").read_text()))
    topic = discover_topics("topics")["demo.requests"]
    codec = Codec(history=REPO_HISTORY)
    assert writer["name"] == "topics.demo.ResearchRequest"
    assert codec.serde(topic.model).parsed["name"] == "mesh.ResearchRequest"
    body = io.BytesIO()
    fastavro.schemaless_writer(body, writer, {"request_id": "r1", "subject": "kafka",
                                              "audience": "ops"})

    decoded = await codec.decode(topic, b"\xc3\x01" + bytes.fromhex(old_fp) + body.getvalue())

    assert decoded == topic.model(request_id="r1", subject="kafka", audience="ops")
