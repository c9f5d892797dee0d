"""Pydantic payloads <-> Avro bytes (fastavro), in two framings.

* **Single-object encoding** (default): ``C3 01`` + the 8-byte CRC-64-AVRO (Rabin)
  fingerprint of the schema's canonical form + the Avro body. Any Avro-capable client
  decodes it with the ``.avsc`` files in ``schemas/`` alone.
* **Confluent wire format** (when a schema registry is configured): ``00`` + a 4-byte
  big-endian schema id from the registry + the Avro body.

Decoders accept both. A writer schema other than the topic's own (an older or newer
version) is resolved against the reader schema by Avro's rules (:meth:`AvroSerde.from_body`);
:class:`mesh.serde.codec.Codec` finds that writer schema by its fingerprint in the schema history
(``schemas/history/``) or by its id in the registry.

Names: a model's record is named by stable facts only, never by the module it was
imported from (:func:`avro_name`): the class name (or ``__avro_name__``) in the namespace
``mesh`` (or ``__avro_namespace__``). Values written by versions that named records by
their Python module still decode (:attr:`AvroSerde.legacy`, and Avro's resolution by
unqualified name for versions in the schema history).

Type mapping: str/int/float/bool/bytes -> string/long/double/boolean/bytes;
``X | None`` -> ``["null", X]``; list/tuple/set -> array; ``dict[str, X]`` -> map;
nested models -> records; ``Literal[...]`` of strings and str Enums -> enum; datetime ->
timestamp-micros; date -> date; UUID -> uuid; ``Any``/``dict[str, Any]``/JSON values ->
a string holding JSON (marked ``"mesh.json": true``).
"""

from __future__ import annotations

import datetime as dt
import enum
import io
import json
import re
import types
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.schema import SchemaParseException, to_parsing_canonical_form
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from mesh.errors import ConfigError, DecodeError, PayloadInvalid, UnknownSchema
from mesh.serde.compare import schema_fingerprint
from mesh.serde.writer import UNWRITTEN, compile_writer

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
_AVRO_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Convert = Callable[[Any], Any] | None


def _apply(convert: Convert, value: Any) -> Any:
    if convert is None or (value is None and convert is not _json_dumps):
        return value
    return convert(value)


@dataclass(slots=True)
class _Builder:
    """Turns annotations into Avro schemas plus value converters (to and from Avro).

    ``naming`` gives each model's (namespace, name): :func:`avro_name` by default; the
    legacy rules of :func:`_legacy_namings` rebuild the schemas older versions wrote.
    """

    naming: Callable[[type[BaseModel]], tuple[str, str]] = field(
        default_factory=lambda: avro_name)
    defined: set[str] = field(default_factory=set)
    building: set[str] = field(default_factory=set)
    converters: dict[str, Any] = field(default_factory=dict)
    models: dict[str, type[BaseModel]] = field(default_factory=dict)

    def build(self, tp: Any) -> tuple[Any, Convert, Convert]:
        origin = typing.get_origin(tp)
        if tp is typing.Any or tp is object:
            return {"type": "string", "mesh.json": True}, _json_dumps, json.loads
        if origin in (typing.Union, types.UnionType):
            return self._union(typing.get_args(tp))
        if origin is typing.Literal:
            return self._literal(tp)
        if origin in (typing.Annotated,):
            return self.build(typing.get_args(tp)[0])
        if origin in (list, tuple, set, frozenset):
            return self._array(tp, origin)
        if origin is dict:
            key, value = typing.get_args(tp) or (str, Any)
            if key is not str:
                raise ConfigError(f"Avro maps need str keys, got dict[{key!r}, ...].")
            schema, to, back = self.build(value)
            return ({"type": "map", "values": schema},
                    None if to is None else lambda d: {k: _apply(to, v) for k, v in d.items()},
                    None if back is None else lambda d: {k: _apply(back, v) for k, v in d.items()})
        if isinstance(tp, type):
            return self._class(tp)
        raise ConfigError(f"No Avro mapping for type {tp!r}: use a supported type "
                          "(see mesh.serde.avro) or Any for free-form JSON.")

    def _class(self, tp: type) -> tuple[Any, Convert, Convert]:
        primitives: dict[type, Any] = {str: "string", int: "long", float: "double",
                                       bool: "boolean", bytes: "bytes"}
        if tp in primitives:
            return primitives[tp], None, None
        if tp is dict:
            return {"type": "string", "mesh.json": True}, _json_dumps, json.loads
        if issubclass(tp, dt.datetime):
            return {"type": "long", "logicalType": "timestamp-micros"}, _aware, None
        if issubclass(tp, dt.date):
            return {"type": "int", "logicalType": "date"}, None, None
        if issubclass(tp, uuid.UUID):
            return {"type": "string", "logicalType": "uuid"}, str, None
        if issubclass(tp, enum.Enum):
            return self._enum(tp.__name__, [m.value for m in tp]), lambda m: m.value, None
        if issubclass(tp, BaseModel):
            return self.record(tp)
        raise ConfigError(f"No Avro mapping for type {tp.__name__}.")

    def record(self, model: type[BaseModel]) -> tuple[Any, Convert, Convert]:
        namespace, short = self.naming(model)
        name = f"{namespace}.{short}"
        other = self.models.setdefault(name, model)
        if other is not model:
            raise ConfigError(
                f"Two models are named {name} in one Avro schema: {_qualname(other)} and "
                f"{_qualname(model)}. Avro names must be unique within a schema; set "
                "__avro_name__ (or __avro_namespace__) on one of them.")
        if name in self.building:
            raise ConfigError(f"Recursive model {name}.")
        if name in self.defined:
            return (name, *self.converters[name])
        self.defined.add(name)
        self.building.add(name)
        fields, to_avro, from_avro = [], {}, {}
        for fname, info in model.model_fields.items():
            schema, field_to, field_back = self.build(info.annotation)
            entry: dict[str, Any] = {"name": fname, "type": schema}
            if info.description:
                entry["doc"] = info.description
            default = _schema_default(info)
            if default is not PydanticUndefined:
                entry["type"], entry_default = _with_default(schema, _apply(field_to, default))
                if entry_default is not PydanticUndefined:
                    entry["default"] = entry_default
            fields.append(entry)
            to_avro[fname], from_avro[fname] = field_to, field_back
        schema = {"type": "record", "name": short, "namespace": namespace, "fields": fields}
        if model.__doc__:
            schema["doc"] = model.__doc__.strip().splitlines()[0]

        # The hot path (every output): fields without a converter are copied as they are
        # (pydantic keeps a model's field values in its __dict__); only the others are
        # converted, each one call.
        converted = [(f, c) for f, c in to_avro.items() if c is not None]
        back_converted = [(f, c) for f, c in from_avro.items() if c is not None]
        names = tuple(to_avro)

        def to(obj: BaseModel) -> dict[str, Any]:
            values = obj.__dict__
            data = {f: values[f] for f in names}
            for f, c in converted:
                data[f] = _apply(c, data[f])
            return data

        def back(data: dict[str, Any]) -> dict[str, Any]:
            for f, c in back_converted:
                if f in data:
                    data[f] = _apply(c, data[f])
            return data

        self.building.discard(name)
        self.converters[name] = (to, back)
        return schema, to, back

    def _union(self, args: tuple[Any, ...]) -> tuple[Any, Convert, Convert]:
        members = [a for a in args if a is not type(None)]
        built = [self.build(a) for a in members]
        schemas = (["null"] if len(members) < len(args) else []) + [b[0] for b in built]
        if len(built) == 1:
            return schemas, built[0][1], built[0][2]
        if any(b[1] or b[2] for b in built if not isinstance(b[0], dict)
               or b[0].get("type") != "record"):
            raise ConfigError(f"Unions of {args!r} need converters Avro cannot choose between;"
                              " use a union of models or of plain types.")
        models = [(m, b) for m, b in zip(members, built, strict=True)
                  if isinstance(m, type) and issubclass(m, BaseModel)]

        def to(value: Any) -> Any:
            for model, (schema, conv, _) in models:
                if isinstance(value, model):
                    return (f"{schema['namespace']}.{schema['name']}", _apply(conv, value))
            return value

        def back(value: Any) -> Any:
            if isinstance(value, dict):  # pydantic picks the branch; convert for all
                for _, (_, _, conv) in models:
                    if conv is not None:
                        value = conv(value)
            return value

        return schemas, (to if models else None), (back if models else None)

    def _literal(self, tp: Any) -> tuple[Any, Convert, Convert]:
        values = typing.get_args(tp)
        if all(isinstance(v, str) for v in values):
            name = "Literal_" + "_".join(re.sub(r"\W", "_", v) for v in values)[:60]
            return self._enum(name, list(values)), None, None
        return self.build(type(values[0]))

    def _enum(self, name: str, symbols: list[Any]) -> dict[str, Any]:
        if not all(isinstance(s, str) and _AVRO_NAME.match(s) for s in symbols):
            return "string"  # type: ignore[return-value]  # values that Avro enums cannot hold
        if name in self.defined:
            name = f"{name}_{len(self.defined)}"
        self.defined.add(name)
        return {"type": "enum", "name": name, "symbols": symbols}

    def _array(self, tp: Any, origin: Any) -> tuple[Any, Convert, Convert]:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        if len(set(args)) > 1:
            raise ConfigError(f"Fixed-shape tuples {tp!r} have no Avro mapping; use a model.")
        schema, to, back = self.build(args[0])
        return ({"type": "array", "items": schema},
                lambda xs: [_apply(to, x) for x in xs],
                None if back is None else lambda xs: [_apply(back, x) for x in xs])


def _schema_default(info: Any) -> Any:
    """The field's default for the Avro schema. A default factory is called only when it
    is a plain container type: others (``time.time``, ``uuid4``) would make the schema
    differ on every build, so such fields get no schema default."""
    if info.default_factory is None:
        return info.get_default()
    if info.default_factory in (list, dict, set, tuple, frozenset):
        return info.default_factory()
    return PydanticUndefined


def _json_dumps(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


DEFAULT_NAMESPACE = "mesh"


def avro_name(model: type[BaseModel]) -> tuple[str, str]:
    """The (namespace, name) of ``model``'s Avro record: what its schema, and so its
    fingerprint, is named on the wire.

    Only stable facts name it, never the module the class was imported from (a model in
    a script run as ``python app.py`` lives in ``__main__``, the same model imported by
    ``mesh run app:agent`` in ``app``; both must write the same schema): the name is
    ``__avro_name__`` if the class itself sets one, else the class name (characters Avro names
    cannot hold, as in ``Page[int]``, become ``_``); the namespace is
    ``__avro_namespace__`` if the class sets one, else ``mesh``. Set them to keep a
    wire name when the class is renamed, or to give payloads your own namespace.

    Example:
        >>> class Order(BaseModel):
        ...     order_id: str
        >>> avro_name(Order)
        ('mesh', 'Order')
    """
    explicit = vars(model).get("__avro_name__")  # not inherited: a subclass is another record
    if explicit is not None and not (isinstance(explicit, str) and _AVRO_NAME.match(explicit)):
        raise ConfigError(f"{_qualname(model)}.__avro_name__ is {explicit!r}: an Avro name "
                          "is letters, digits and _, not starting with a digit; fix it.")
    name = explicit or re.sub(r"\W", "_", model.__name__).strip("_")
    if not _AVRO_NAME.match(name):
        name = f"_{name}"  # empty, or starting with a digit
    namespace = getattr(model, "__avro_namespace__", None) or DEFAULT_NAMESPACE
    if not (isinstance(namespace, str)
            and all(_AVRO_NAME.match(part) for part in namespace.split("."))):
        raise ConfigError(f"{_qualname(model)}.__avro_namespace__ is {namespace!r}: an Avro "
                          "namespace is dot-separated names of letters, digits and _; "
                          "fix it (e.g. 'shop.orders').")
    return namespace, name


def _module_namespace(model: type[BaseModel], main: str | None = None) -> str:
    """The namespace versions before the naming rule of :func:`avro_name` wrote: the
    class's ``__avro_namespace__``, else its module path (``__main__`` for module
    ``main`` when given: the same model run as a script)."""
    explicit = getattr(model, "__avro_namespace__", None)
    if isinstance(explicit, str) and explicit:
        return explicit
    module = "__main__" if main is not None and model.__module__ == main else model.__module__
    parts = [p for p in module.split(".") if _AVRO_NAME.match(p)]
    return ".".join(parts) or "mesh"


def _legacy_namings(model: type[BaseModel]) -> list[Callable[[type[BaseModel]], tuple[str, str]]]:
    """The naming rules of older versions (records named by their Python module), as
    imported normally and as run as a script: their fingerprints name schemas whose
    binary encoding is this model's own (Avro bodies carry no names)."""
    return [lambda m: (_module_namespace(m), m.__name__),
            lambda m: (_module_namespace(m, main=model.__module__), m.__name__)]


def _qualname(model: type[Any]) -> str:
    return f"{model.__module__}.{model.__qualname__}"


def _with_default(schema: Any, default: Any) -> tuple[Any, Any]:
    """Avro needs a union's default to match its first branch; reorder when needed."""
    if isinstance(schema, list):
        if default is None:
            return schema, None
        rest = [s for s in schema if s != "null"]
        if len(rest) == 1 and _plain(default):
            return [*rest, "null"], default
        return schema, PydanticUndefined
    if _plain(default):
        return schema, default
    return schema, PydanticUndefined


def _plain(value: Any) -> bool:
    if isinstance(value, (str, bool, int, float)) or value is None:
        return True
    if isinstance(value, (list, dict)):
        return len(value) == 0
    return False


@dataclass(frozen=True, slots=True)
class AvroSerde:
    """Encodes and decodes one payload model with Avro single-object encoding.

    Example:
        >>> class Greeting(BaseModel):
        ...     text: str
        >>> serde = AvroSerde.for_model(Greeting)
        >>> serde.decode(serde.encode(Greeting(text="hi")))
        Greeting(text='hi')
    """

    model: type[BaseModel]
    schema: dict[str, Any]
    parsed: Any
    fingerprint: str
    to_avro: Callable[[Any], dict[str, Any]]
    from_avro: Callable[[dict[str, Any]], dict[str, Any]]
    legacy: dict[str, Any] = field(default_factory=dict)
    # The compiled writer of the schema (mesh.serde.writer), None when it has none.
    write: Callable[[Any], bytes] | None = None

    @classmethod
    def for_model(cls, model: type[BaseModel]) -> AvroSerde:
        """Build the schema and converters of ``model`` (do this once per model).

        ``legacy`` maps the fingerprints of this model's schema as older versions named
        it (records named by their Python module, see :func:`avro_name`) to those
        parsed schemas: a value written so has this schema's encoding and decodes as is.
        """
        schema, to, back = _Builder().record(model)
        parsed = fastavro.parse_schema(schema)
        fp = schema_fingerprint(parsed)
        assert to is not None and back is not None
        legacy: dict[str, Any] = {}
        for naming in _legacy_namings(model):
            try:
                old = fastavro.parse_schema(_Builder(naming=naming).record(model)[0])
            except (ConfigError, SchemaParseException):  # the old rule could not name it
                continue
            if schema_fingerprint(old) != fp:
                legacy.setdefault(schema_fingerprint(old), old)
        return cls(model, schema, parsed, fp, to, back, legacy, compile_writer(parsed))

    @property
    def canonical(self) -> str:
        """The schema's Parsing Canonical Form (what the fingerprint is taken of)."""
        return str(to_parsing_canonical_form(self.parsed))

    def body(self, payload: BaseModel) -> bytes:
        """The Avro binary body alone (no framing)."""
        if not isinstance(payload, self.model):
            raise PayloadInvalid(f"Expected a {self.model.__name__}, got "
                                 f"{type(payload).__name__}. Build the topic's model.")
        data = self.to_avro(payload)
        if self.write is not None:
            try:
                return self.write(data)
            except UNWRITTEN:  # a value of another type: fastavro coerces it or says why
                pass
        out = io.BytesIO()
        try:
            fastavro.schemaless_writer(out, self.parsed, data)
        except (ValueError, TypeError, OverflowError) as exc:
            raise PayloadInvalid(f"{self.model.__name__} cannot be written as Avro: {exc}") from exc
        return out.getvalue()

    @property
    def framing(self) -> bytes:
        """The single-object marker and fingerprint that precede every body."""
        return SINGLE_OBJECT_MAGIC + bytes.fromhex(self.fingerprint)

    def encode(self, payload: BaseModel) -> bytes:
        """Single-object encoding of ``payload``."""
        return self.framing + self.body(payload)

    def body_of(self, data: dict[str, Any]) -> bytes:
        """The Avro body of a record already in Avro form (every field of the schema,
        plain values): for the mesh's own records on the hot path, which skip building
        and validating a model. Invalid data raises :class:`PayloadInvalid`."""
        if self.write is not None:
            try:
                return self.write(data)
            except UNWRITTEN:
                pass
        out = io.BytesIO()
        try:
            fastavro.schemaless_writer(out, self.parsed, data)
        except (ValueError, TypeError, OverflowError, KeyError) as exc:
            raise PayloadInvalid(f"{self.model.__name__} fields cannot be written as Avro: "
                                 f"{exc}") from exc
        return out.getvalue()

    def decode(self, data: bytes, writer: Any = None) -> BaseModel:
        """A payload from single-object bytes, or from a bare body with ``writer`` given."""
        if writer is None:
            if not data.startswith(SINGLE_OBJECT_MAGIC) or len(data) < 10:
                raise DecodeError("Not Avro single-object encoding (no C3 01 marker).")
            fp = data[2:10].hex()
            if fp != self.fingerprint and fp not in self.legacy:
                raise UnknownSchema(f"Writer schema fingerprint {fp} is not "
                                    f"{self.model.__name__}'s ({self.fingerprint}); decode "
                                    "with mesh.Codec to resolve other versions of the "
                                    "model through the schema history.")
            data, writer = data[10:], self.parsed
        return self.from_body(data, writer)

    def from_body(self, body: bytes, writer: Any) -> BaseModel:
        """Decode an Avro body written with ``writer`` into this model.

        A ``writer`` other than this model's schema is resolved against it by Avro's
        rules: fields the writer lacks take their defaults, fields the reader lacks are
        skipped. When the two cannot be resolved the :class:`DecodeError` is caused by
        fastavro's ``SchemaResolutionError``.
        """
        buf = io.BytesIO(body)
        try:
            record = fastavro.schemaless_reader(buf, writer, self.parsed)
        except SchemaResolutionError as exc:
            raise DecodeError(f"The writer schema does not resolve to {self.model.__name__}'s: "
                              f"{exc}") from exc
        except Exception as exc:  # fastavro raises many types for corrupt input
            raise DecodeError(f"Avro body does not decode as {self.model.__name__}: "
                              f"{type(exc).__name__}: {exc}") from exc
        if buf.tell() != len(body):
            raise DecodeError(f"{len(body) - buf.tell()} bytes left after the record.")
        if not isinstance(record, dict):
            raise DecodeError(f"Avro body decoded to {type(record).__name__}, not a record.")
        try:
            return self.model.model_validate(self.from_avro(record))
        except (ValidationError, ValueError) as exc:
            raise PayloadInvalid(f"Payload fails {self.model.__name__}: {exc}") from exc


def json_data(value: Any) -> Any:
    """``value`` as JSON data: a model as its JSON dump, anything else as it is."""
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def framing_of(data: bytes) -> str:
    """``"single-object"``, ``"confluent"`` or ``"unknown"``, from the first bytes."""
    if data.startswith(SINGLE_OBJECT_MAGIC) and len(data) >= 10:
        return "single-object"
    if data.startswith(CONFLUENT_MAGIC) and len(data) >= 5:
        return "confluent"
    return "unknown"
