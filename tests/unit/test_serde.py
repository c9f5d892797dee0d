"""Unit tests for mesh.serde.avro: the Avro mapping, single-object framing and decode errors."""

from __future__ import annotations

import datetime as dt
import enum
import io
import json
import uuid
from typing import Any, Literal

import fastavro
import pytest
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint, to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from mesh.errors import ConfigError, DecodeError, PayloadInvalid, UnknownSchema
from mesh.serde.avro import AvroSerde, avro_name, framing_of
from mesh.serde.compare import schema_differences, schema_fingerprint

UTC = dt.timezone.utc


class Color(str, enum.Enum):
    red = "red"
    green = "green"


class Inner(BaseModel):
    a: int
    tags: list[str] = []


class Everything(BaseModel):
    """A payload with one field of every supported type."""

    s: str = "x"
    i: int = 3
    f: float = 1.5
    b: bool = True
    by: bytes = b"ab"
    o: str | None = None
    o2: int | None = 7
    items: list[int] = Field(default_factory=list)
    t: tuple[int, ...] = ()
    st: set[str] = set()
    d: dict[str, float] = {}
    inner: Inner
    lit: Literal["a", "b"] = "a"
    color: Color = Color.red
    ts: dt.datetime
    day: dt.date
    u: uuid.UUID
    j: Any
    jd: dict[str, Any] = {}


class Named(BaseModel):
    name: str
    n: int


class Positive(BaseModel):
    n: int = Field(gt=0)


def _everything(**overrides: Any) -> Everything:
    values: dict[str, Any] = dict(
        s="héllo", i=-(2**40), f=-0.25, b=False, by=b"\x00\xff", o="set", o2=None,
        items=[1, 2, 3], t=(4, 5), st={"p", "q"}, d={"k": 2.5}, inner=Inner(a=1, tags=["x"]),
        lit="b", color=Color.green, ts=dt.datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        day=dt.date(2024, 2, 29), u=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        j={"k": [1, "two", {"three": True}]}, jd={"a": {"b": 1}, "c": [1.5]},
    )
    values.update(overrides)
    return Everything(**values)


# The Rabin CRC-64-AVRO fingerprint exactly as the Avro specification gives it in Java.
_EMPTY = 0xC15D213AA4D7A795


def _rabin_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY & -(fp & 1))
        table.append(fp)
    return table


_TABLE = _rabin_table()


def _rabin64(data: bytes) -> int:
    fp = _EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


def test_model_with_every_supported_type_round_trips() -> None:
    serde = AvroSerde.for_model(Everything)
    payload = _everything()

    assert serde.decode(serde.encode(payload)) == payload


def test_naive_datetime_is_written_as_utc() -> None:
    serde = AvroSerde.for_model(Everything)
    naive = dt.datetime(2024, 6, 1, 12, 0, 0, 1)

    decoded = serde.decode(serde.encode(_everything(ts=naive)))

    assert decoded.ts == naive.replace(tzinfo=UTC)
    assert decoded.ts.utcoffset() == dt.timedelta(0)


def test_aware_datetime_keeps_its_instant() -> None:
    serde = AvroSerde.for_model(Everything)
    plus_two = dt.datetime(2024, 6, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))

    decoded = serde.decode(serde.encode(_everything(ts=plus_two)))

    assert decoded.ts == dt.datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def test_field_defaults_appear_in_the_avro_schema() -> None:
    fields = {f["name"]: f for f in AvroSerde.for_model(Everything).schema["fields"]}

    assert fields["s"] == {"name": "s", "type": "string", "default": "x"}
    assert fields["i"]["default"] == 3
    assert fields["b"]["default"] is True
    assert fields["o"]["type"] == ["null", "string"] and fields["o"]["default"] is None
    # a non-null default must match the union's first branch, so null moves last
    assert fields["o2"]["type"] == ["long", "null"] and fields["o2"]["default"] == 7
    assert fields["items"]["default"] == [] and fields["d"]["default"] == {}
    assert fields["lit"]["default"] == "a"
    assert fields["color"]["default"] == "red"
    assert "default" not in fields["inner"]  # required fields have none


def test_rabin_fingerprint_of_int_matches_the_avro_spec_vector() -> None:
    assert _rabin64(b'"int"') == 0x7275D51A3F395C8F
    assert fingerprint('"int"', "CRC-64-AVRO") == "8f5c393f1ad57572"
    assert (0x7275D51A3F395C8F).to_bytes(8, "little") == bytes.fromhex("8f5c393f1ad57572")


def test_serde_fingerprint_is_fastavros_of_its_canonical_form() -> None:
    serde = AvroSerde.for_model(Named)

    assert serde.fingerprint == fingerprint(serde.canonical, "CRC-64-AVRO")
    assert serde.fingerprint == _rabin64(serde.canonical.encode()).to_bytes(8, "little").hex()


def test_single_object_frame_starts_with_c301_and_fingerprint() -> None:
    serde = AvroSerde.for_model(Named)

    data = serde.encode(Named(name="n", n=1))

    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == _rabin64(serde.canonical.encode()).to_bytes(8, "little")
    assert data[10:] == serde.body(Named(name="n", n=1))


@pytest.mark.parametrize(("data", "framing"), [
    (b"\xc3\x01" + bytes(8), "single-object"),
    (b"\xc3\x01" + bytes(8) + b"body", "single-object"),
    (b"\x00\x00\x00\x00\x07", "confluent"),
    (b"\x00\x00\x00\x01\x02body", "confluent"),
    (b"\xc3\x01" + bytes(7), "unknown"),  # fingerprint cut short
    (b"\x00\x00\x00\x07", "unknown"),  # schema id cut short
    (b"", "unknown"),
    (b'{"json": true}', "unknown"),
])
def test_framing_of_detects_the_wire_format(data: bytes, framing: str) -> None:
    assert framing_of(data) == framing


@pytest.mark.parametrize("data", [
    b"", b"garbage bytes", b'{"name": "n", "n": 1}', b"\x00\x00\x00\x00\x01\x02",
    b"\xc3\x01\x00",
])
def test_garbage_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        AvroSerde.for_model(Named).decode(data)


def test_every_truncation_of_a_frame_raises_decode_error() -> None:
    serde = AvroSerde.for_model(Named)
    data = serde.encode(Named(name="hello world", n=5))

    for end in range(len(data)):
        with pytest.raises(DecodeError):
            serde.decode(data[:end])


def test_invalid_utf8_in_a_string_raises_decode_error() -> None:
    serde = AvroSerde.for_model(Named)
    data = serde.encode(Named(name="ab", n=5))
    corrupt = data[:11] + b"\xff\xfe" + data[13:]  # the string's two bytes

    with pytest.raises(DecodeError):
        serde.decode(corrupt)


def test_bytes_after_the_record_raise_decode_error() -> None:
    serde = AvroSerde.for_model(Named)

    with pytest.raises(DecodeError):
        serde.decode(serde.encode(Named(name="n", n=1)) + b"trailing")


def test_frame_from_another_schema_raises_unknown_schema() -> None:
    other = AvroSerde.for_model(Positive).encode(Positive(n=1))

    with pytest.raises(UnknownSchema, match=AvroSerde.for_model(Named).fingerprint):
        AvroSerde.for_model(Named).decode(other)


def test_payload_that_decodes_but_fails_the_model_raises_payload_invalid() -> None:
    serde = AvroSerde.for_model(Positive)
    data = serde.encode(Positive.model_construct(n=-1))  # skips pydantic's check

    with pytest.raises(PayloadInvalid, match="Positive"):
        serde.decode(data)


def test_encoding_another_model_raises_payload_invalid() -> None:
    with pytest.raises(PayloadInvalid, match="Expected a Named, got Positive"):
        AvroSerde.for_model(Named).encode(Positive(n=1))  # type: ignore[arg-type]


class V1:
    class Order(BaseModel):
        order_id: str
        qty: int


class V2:
    class Order(BaseModel):
        order_id: str
        qty: int
        note: str = "none"
        rush: bool = False


def test_bytes_of_an_older_model_decode_into_the_newer_one() -> None:
    old, new = AvroSerde.for_model(V1.Order), AvroSerde.for_model(V2.Order)
    assert old.fingerprint != new.fingerprint

    decoded = new.from_body(old.body(V1.Order(order_id="o1", qty=2)), writer=old.parsed)

    assert decoded == V2.Order(order_id="o1", qty=2, note="none", rush=False)


class V3:
    class Order(BaseModel):
        order_id: str
        qty: str  # was a long
        inner: Inner  # added without a default


def test_writer_that_does_not_resolve_raises_decode_error_caused_by_fastavro() -> None:
    old, new = AvroSerde.for_model(V1.Order), AvroSerde.for_model(V3.Order)

    with pytest.raises(DecodeError, match="does not resolve to Order's") as raised:
        new.from_body(old.body(V1.Order(order_id="o1", qty=2)), writer=old.parsed)

    assert isinstance(raised.value.__cause__, SchemaResolutionError)


def test_schema_differences_name_fields_added_without_default_and_retyped() -> None:
    old, new = AvroSerde.for_model(V1.Order), AvroSerde.for_model(V3.Order)

    assert schema_differences(old.parsed, new.parsed) == ["qty: long -> string",
                                                          "inner: added without a default"]
    assert schema_differences(old.parsed, AvroSerde.for_model(V2.Order).parsed) == []


def test_schema_differences_follow_nested_records_by_path() -> None:
    class Outer(BaseModel):
        inner: Inner

    class Inner2(BaseModel):
        a: str
        tags: list[str] = []
        extra: int

    Inner2.__name__ = "Inner"

    class Outer2(BaseModel):
        inner: Inner2

    Outer2.__name__ = "Outer"
    old, new = AvroSerde.for_model(Outer), AvroSerde.for_model(Outer2)

    assert schema_differences(old.parsed, new.parsed) == ["inner.a: long -> string",
                                                          "inner.extra: added without a default"]


def test_schema_fingerprint_is_the_serdes() -> None:
    serde = AvroSerde.for_model(Everything)

    assert schema_fingerprint(fastavro.parse_schema(json.loads(json.dumps(serde.schema)))) \
        == serde.fingerprint


def test_plain_fastavro_reads_a_value_with_the_schema_file_alone() -> None:
    serde = AvroSerde.for_model(Everything)
    avsc = json.loads(json.dumps(serde.schema))  # what schemas/<topic>.avsc holds
    data = serde.encode(_everything())

    parsed = fastavro.parse_schema(avsc)
    record = fastavro.schemaless_reader(io.BytesIO(data[10:]), parsed)

    assert bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")) \
        == data[2:10]
    assert record["s"] == "héllo" and record["color"] == "green" and record["lit"] == "b"
    assert record["ts"] == dt.datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert json.loads(record["j"]) == {"k": [1, "two", {"three": True}]}


class Nullable(BaseModel):
    extra: Any = None


def test_any_field_defaulting_to_none_round_trips() -> None:
    serde = AvroSerde.for_model(Nullable)
    assert serde.decode(serde.encode(Nullable())) == Nullable()


@pytest.mark.parametrize("overrides", [{"j": None}, {"jd": {"a": None}}])
def test_json_null_values_round_trip(overrides: dict[str, Any]) -> None:
    serde = AvroSerde.for_model(Everything)
    payload = _everything(**overrides)

    assert serde.decode(serde.encode(payload)) == payload


def test_int_outside_avro_long_raises_payload_invalid() -> None:
    with pytest.raises(PayloadInvalid):
        AvroSerde.for_model(Named).encode(Named(name="n", n=2**63))


class Address(BaseModel):
    street: str


class Shipment(BaseModel):
    billing: Address
    shipping: Address


def test_model_used_in_two_fields_round_trips() -> None:
    serde = AvroSerde.for_model(Shipment)
    payload = Shipment(billing=Address(street="a"), shipping=Address(street="b"))

    assert serde.decode(serde.encode(payload)) == payload


# Bounded ints: an Avro long is 64-bit (see test_int_outside_avro_long_raises_...).
# JSON values without null (see test_json_null_values_round_trip).
_longs = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_json = st.recursive(
    st.booleans() | _longs | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=8,
)
_floats = st.floats(allow_nan=False)
_payloads = st.builds(
    Everything,
    s=st.text(), i=_longs, f=_floats, b=st.booleans(), by=st.binary(),
    o=st.none() | st.text(), o2=st.none() | _longs, items=st.lists(_longs),
    t=st.lists(_longs).map(tuple), st=st.sets(st.text(max_size=5)),
    d=st.dictionaries(st.text(max_size=5), _floats),
    inner=st.builds(Inner, a=_longs, tags=st.lists(st.text(max_size=5))),
    lit=st.sampled_from(["a", "b"]), color=st.sampled_from(Color),
    ts=st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 1, 1),
                    timezones=st.just(UTC)),
    day=st.dates(), u=st.uuids(), j=_json, jd=st.dictionaries(st.text(max_size=5), _json),
)


@settings(max_examples=60, deadline=None)
@given(payload=_payloads)
def test_random_valid_payloads_round_trip(payload: Everything) -> None:
    serde = AvroSerde.for_model(Everything)

    assert serde.decode(serde.encode(payload)) == payload


def test_a_model_can_keep_its_avro_namespace_when_its_code_moves() -> None:
    class Moved(BaseModel):
        __avro_namespace__ = "shop.orders"
        order_id: str

    serde = AvroSerde.for_model(Moved)
    assert serde.schema["namespace"] == "shop.orders"
    assert serde.decode(serde.encode(Moved(order_id="o1"))) == Moved(order_id="o1")


# --- the wire name does not depend on the import path ------------------------------------

SCRIPT = '''
from __future__ import annotations

import sys

from pydantic import BaseModel

from mesh.serde.avro import AvroSerde


class Line(BaseModel):
    sku: str
    qty: int = 1


class Basket(BaseModel):
    """A basket of lines."""

    basket_id: str
    lines: list[Line] = []


if __name__ == "__main__":
    serde = AvroSerde.for_model(Basket)
    payload = Basket(basket_id="b1", lines=[Line(sku="s", qty=2)])
    print(serde.fingerprint, serde.encode(payload).hex())
'''


def _import_file(path: Any, name: str) -> Any:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_a_model_run_as_a_script_writes_the_schema_of_the_same_model_imported(
        tmp_path: Any) -> None:
    """Pass: `python basket_app.py` (the model in module __main__) and the same file
    imported as basket_app write one schema (same fingerprint), and what the script
    wrote decodes in the importer. Failed when the namespace was the Python module."""
    import subprocess
    import sys

    script = tmp_path / "basket_app.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    script_fp, data = done.stdout.split()
    imported = _import_file(script, "basket_app")
    serde = AvroSerde.for_model(imported.Basket)

    assert serde.fingerprint == script_fp
    assert serde.schema["namespace"] == "mesh" and serde.schema["name"] == "Basket"
    assert serde.decode(bytes.fromhex(data)) == imported.Basket(
        basket_id="b1", lines=[imported.Line(sku="s", qty=2)])


def test_values_written_when_records_were_named_by_their_module_still_decode(
        tmp_path: Any) -> None:
    """Pass: a value framed with the old rule's schema (namespace = the Python module,
    imported, or __main__ when run as a script) decodes without any schema history: the
    Avro body carries no names, so its encoding is the current schema's."""
    imported = _import_file(_write(tmp_path, "basket_old.py", SCRIPT), "basket_old")
    serde = AvroSerde.for_model(imported.Basket)
    payload = imported.Basket(basket_id="b2", lines=[imported.Line(sku="t")])
    for namespace in ("basket_old", "__main__"):
        old = fastavro.parse_schema(_renamespaced(serde.schema, namespace))
        fp = schema_fingerprint(old)
        assert fp != serde.fingerprint
        data = b"\xc3\x01" + bytes.fromhex(fp) + serde.body(payload)

        assert serde.decode(data) == payload, namespace


def _renamespaced(schema: Any, namespace: str) -> Any:
    """``schema`` with every record in ``namespace`` (as the old rule named them)."""
    if isinstance(schema, dict):
        return {k: namespace if k == "namespace" else _renamespaced(v, namespace)
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_renamespaced(v, namespace) for v in schema]
    return schema


def _write(directory: Any, name: str, text: str) -> Any:
    path = directory / name
    path.write_text(text)
    return path


def test_explicit_avro_name_and_namespace_name_the_record() -> None:
    class Renamed(BaseModel):
        __avro_name__ = "Order"
        __avro_namespace__ = "shop.orders"
        order_id: str

    assert avro_name(Renamed) == ("shop.orders", "Order")
    assert AvroSerde.for_model(Renamed).schema["name"] == "Order"


def test_an_invalid_explicit_avro_name_is_refused_with_the_fix() -> None:
    class Bad(BaseModel):
        __avro_namespace__ = "shop-orders"
        order_id: str

    with pytest.raises(ConfigError, match=r"__avro_namespace__ is 'shop-orders'.*fix it"):
        AvroSerde.for_model(Bad)


def test_a_generic_model_gets_a_valid_avro_name() -> None:
    from typing import Generic, TypeVar

    T = TypeVar("T")

    class Page(BaseModel, Generic[T]):
        items: list[T]

    serde = AvroSerde.for_model(Page[int])
    assert serde.schema["name"] == "Page_int"
    assert serde.decode(serde.encode(Page[int](items=[1]))) == Page[int](items=[1])


def test_two_models_with_one_name_in_a_schema_are_refused_naming_both() -> None:
    class A:
        class Part(BaseModel):
            a: int

    class B:
        class Part(BaseModel):
            b: str

    class Both(BaseModel):
        first: A.Part
        second: B.Part

    with pytest.raises(ConfigError, match=r"named mesh\.Part.*A\.Part.*B\.Part.*__avro_name__"):
        AvroSerde.for_model(Both)
