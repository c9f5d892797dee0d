"""Avro binary writers compiled once per schema, for the hot path.

fastavro's ``schemaless_writer`` walks the schema for every record it writes, behind a
Python wrapper, a ``BytesIO`` and a check of the parsed schema: for the mesh's small
records that costs more than the encoding itself (25 µs for an audit record of 21
fields). A compiled writer is a tree of small functions built from the parsed schema
once; writing a record is one call per field, appending to a list of parts.

Only exact types are written here (``str`` for a string, ``int`` for a long, a
``float`` for a double, ...). Anything else raises :data:`UNWRITTEN` errors, and the
caller writes that record with fastavro instead, which then coerces the value or
raises its own error: a compiled writer never writes other bytes than fastavro would,
it only refuses (tests/unit/test_avro_writer.py checks both on every type mapping).
Schemas with logical types other than ``uuid``, or unions other than ``null`` and one
type, get no compiled writer (:func:`compile_writer` returns None).

Example:
    >>> write = compile_writer(fastavro.parse_schema({"type": "record", "name": "P",
    ...     "fields": [{"name": "n", "type": "long"}, {"name": "s", "type": "string"}]}))
    >>> write({"n": 1, "s": "hi"})
    b'\\x02\\x04hi'
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Mapping
from typing import Any

import fastavro

# Appends the encoding of a value to the parts of a record being written.
Write = Callable[[list[bytes], Any], None]

# What a compiled writer raises for a value it does not write (the caller falls back).
UNWRITTEN = (TypeError, ValueError, KeyError, OverflowError, AttributeError)

_ONE_BYTE = [bytes((z,)) for z in range(0x80)]
_LONG_LIMIT = 1 << 63
_DOUBLE = struct.Struct("<d").pack
_FLOAT = struct.Struct("<f").pack


class Uncompiled(Exception):
    """A schema construct no compiled writer handles (fastavro writes it)."""


def long_bytes(n: int) -> bytes:
    """An Avro long (or int): zig-zag, then a base-128 varint.

    Example:
        >>> long_bytes(1), long_bytes(-1), long_bytes(64)
        (b'\\x02', b'\\x01', b'\\x80\\x01')
    """
    if type(n) is not int:
        raise TypeError(f"not an int: {type(n).__name__}")
    if not -_LONG_LIMIT <= n < _LONG_LIMIT:
        raise OverflowError(f"{n} does not fit an Avro long")
    z = (n << 1) ^ (n >> 63)
    if z < 0x80:
        return _ONE_BYTE[z]
    if z < 0x4000:
        return bytes((z & 0x7F | 0x80, z >> 7))
    out = bytearray()
    while z > 0x7F:
        out.append(z & 0x7F | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _long(parts: list[bytes], value: Any) -> None:
    parts.append(long_bytes(value))


def _string(parts: list[bytes], value: Any) -> None:
    if type(value) is not str:
        raise TypeError(f"not a str: {type(value).__name__}")
    data = value.encode()
    parts.append(long_bytes(len(data)))
    parts.append(data)


def _bytes(parts: list[bytes], value: Any) -> None:
    if type(value) is not bytes:
        raise TypeError(f"not bytes: {type(value).__name__}")
    parts.append(long_bytes(len(value)))
    parts.append(value)


def _boolean(parts: list[bytes], value: Any) -> None:
    if type(value) is not bool:
        raise TypeError(f"not a bool: {type(value).__name__}")
    parts.append(b"\x01" if value else b"\x00")


def _double(parts: list[bytes], value: Any) -> None:
    if type(value) is not float:
        raise TypeError(f"not a float: {type(value).__name__}")
    parts.append(_DOUBLE(value))


def _float(parts: list[bytes], value: Any) -> None:
    if type(value) is not float:
        raise TypeError(f"not a float: {type(value).__name__}")
    parts.append(_FLOAT(value))


def _null(parts: list[bytes], value: Any) -> None:
    if value is not None:
        raise TypeError("not None")


_PRIMITIVES: dict[str, Write] = {
    "null": _null, "boolean": _boolean, "int": _long, "long": _long, "float": _float,
    "double": _double, "bytes": _bytes, "string": _string}


def _compile(schema: Any, named: dict[str, Write]) -> Write:
    """The writer of ``schema`` (parsed by fastavro: names are full); raises
    :class:`Uncompiled` for what it does not handle."""
    if isinstance(schema, str):
        found = _PRIMITIVES.get(schema) or named.get(schema)
        if found is None:
            raise Uncompiled(f"type {schema!r}")
        return found
    if isinstance(schema, list):
        return _union(schema, named)
    kind = schema.get("type")
    logical = schema.get("logicalType")
    if logical is not None and logical != "uuid":
        raise Uncompiled(f"logical type {logical!r}")
    if kind == "record":
        return _record(schema, named)
    if kind == "enum":
        return _enum(schema, named)
    if kind == "array":
        return _array(_compile(schema["items"], named))
    if kind == "map":
        return _map(_compile(schema["values"], named))
    if isinstance(kind, str) and kind in _PRIMITIVES:
        return _PRIMITIVES[kind]
    raise Uncompiled(f"type {kind!r}")


def _union(branches: list[Any], named: dict[str, Write]) -> Write:
    """``null`` and one other type, in either order (what the mesh's schemas use)."""
    others = [b for b in branches if b != "null"]
    if len(branches) != 2 or len(others) != 1:
        raise Uncompiled(f"union {branches!r}")
    write = _compile(others[0], named)
    null_tag, value_tag = (b"\x00", b"\x02") if branches[0] == "null" else (b"\x02", b"\x00")

    def union(parts: list[bytes], value: Any) -> None:
        if value is None:
            parts.append(null_tag)
        else:
            parts.append(value_tag)
            write(parts, value)

    return union


def _record(schema: dict[str, Any], named: dict[str, Write]) -> Write:
    fields: list[tuple[str, Write]] = []

    def record(parts: list[bytes], value: Any) -> None:
        for name, write in fields:
            write(parts, value[name])

    named[schema["name"]] = record  # before its fields: a field may name it
    fields.extend((f["name"], _compile(f["type"], named)) for f in schema["fields"])
    return record


def _enum(schema: dict[str, Any], named: dict[str, Write]) -> Write:
    index = {symbol: long_bytes(i) for i, symbol in enumerate(schema["symbols"])}

    def enum(parts: list[bytes], value: Any) -> None:
        if type(value) is not str:
            raise TypeError(f"not a str: {type(value).__name__}")
        parts.append(index[value])

    named[schema["name"]] = enum
    return enum


def _array(write: Write) -> Write:
    def array(parts: list[bytes], value: Any) -> None:
        if type(value) is not list and type(value) is not tuple:
            raise TypeError(f"not a list: {type(value).__name__}")
        if value:
            parts.append(long_bytes(len(value)))
            for item in value:
                write(parts, item)
        parts.append(b"\x00")

    return array


def _map(write: Write) -> Write:
    def map_(parts: list[bytes], value: Any) -> None:
        if type(value) is not dict:
            raise TypeError(f"not a dict: {type(value).__name__}")
        if value:
            parts.append(long_bytes(len(value)))
            for key, item in value.items():
                _string(parts, key)
                write(parts, item)
        parts.append(b"\x00")

    return map_


def compile_writer(parsed: Any) -> Callable[[Any], bytes] | None:
    """A function writing values of the fastavro-parsed schema ``parsed`` to Avro bytes
    (raising one of :data:`UNWRITTEN` for a value it leaves to fastavro), or None when
    the schema has a construct it does not handle."""
    try:
        if isinstance(parsed, dict) and parsed.get("type") == "record":
            return _generated(parsed["fields"], {}, {})
        write = _compile(parsed, {})
    except Uncompiled:
        return None

    def written(value: Any) -> bytes:
        parts: list[bytes] = []
        write(parts, value)
        return b"".join(parts)

    return written


class RecordTemplate:
    """Records of one schema whose fields are mostly the same from record to record,
    written by pieces: the constant fields' bytes once, here, and only the varying ones
    per record (an Avro record's encoding is its fields' encodings in schema order).
    The mesh's audit records are such: an agent's ``consumed`` records differ in their
    ids, position, timing and outputs, not in kind, agent or details. Raises
    :class:`Uncompiled` for a varying field of a type no compiled writer handles.

    Example:
        >>> schema = fastavro.parse_schema({"type": "record", "name": "R", "fields": [
        ...     {"name": "kind", "type": "string"}, {"name": "n", "type": "long"}]})
        >>> RecordTemplate(schema, {"kind": "x"}).write({"n": 1})
        b'\\x02x\\x02'
    """

    __slots__ = ("write",)  # write(values): the record, given every varying field

    def __init__(self, parsed: dict[str, Any], constant: Mapping[str, Any]) -> None:
        constants: dict[str, bytes] = {}
        for spec in parsed["fields"]:
            if spec["name"] in constant:
                out = io.BytesIO()
                fastavro.schemaless_writer(out, _field_schema(parsed, spec),
                                           constant[spec["name"]])
                constants[spec["name"]] = out.getvalue()
        self.write: Callable[[Mapping[str, Any]], bytes] = _generated(
            parsed["fields"], constants, _named_writers(parsed))


def _named_writers(parsed: dict[str, Any]) -> dict[str, Write]:
    named: dict[str, Write] = {}
    for name, schema in parsed.get("__named_schemas", {}).items():
        if name not in named:
            try:
                _compile(schema, named)
            except Uncompiled:
                continue
    return named


# The source of one field's write in a generated record writer, by type; ``x`` holds
# the value, ``a`` appends a part, ``O`` is the one-byte longs, ``L`` long_bytes.
_INLINE = {
    "long": ["if type(x) is not int: raise TypeError('long')",
             "a(O[x << 1] if 0 <= x < 64 else L(x))"],
    "string": ["if type(x) is not str: raise TypeError('string')",
               "b = x.encode()", "n = len(b)",
               "a(O[n << 1] if n < 64 else L(n))", "a(b)"],
    "double": ["if type(x) is not float: raise TypeError('double')", "a(D(x))"],
    "boolean": ["if type(x) is not bool: raise TypeError('boolean')",
                "a(b'\\x01' if x else b'\\x00')"],
}
_INLINE["int"] = _INLINE["long"]


def _field_source(schema: Any, index: int, env: dict[str, Any],
                  named: dict[str, Write]) -> list[str]:
    """The lines writing one field's value ``x``: inline for primitives and nullable
    primitives, else a call of the field's compiled writer."""
    if isinstance(schema, str) and schema in _INLINE:
        return _INLINE[schema]
    other = (next((s for s in schema if s != "null"), None)
             if isinstance(schema, list) and len(schema) == 2 and "null" in schema else None)
    if isinstance(other, str) and other in _INLINE:
        null_tag, tag = ("b'\\x00'", "b'\\x02'") if schema[0] == "null" else (
            "b'\\x02'", "b'\\x00'")
        return [f"if x is None: a({null_tag})", "else:", f"    a({tag})",
                *("    " + line for line in _INLINE[other])]
    env[f"W{index}"] = _compile(schema, named)
    return [f"W{index}(p, x)"]


def _generated(fields: list[dict[str, Any]], constants: Mapping[str, bytes],
               named: dict[str, Write]) -> Callable[[Any], bytes]:
    """A record writer as one generated function: a dict lookup and a few inline lines
    per field, no call per field (closures cost twice as much per field)."""
    env: dict[str, Any] = {"O": _ONE_BYTE, "L": long_bytes, "D": _DOUBLE}
    lines = ["def write(v):", "    p = []", "    a = p.append"]
    for index, spec in enumerate(fields):
        name = spec["name"]
        if name in constants:
            env[f"C{index}"] = constants[name]
            lines.append(f"    a(C{index})")
            continue
        lines.append(f"    x = v[{name!r}]")
        lines.extend("    " + line for line in _field_source(spec["type"], index, env, named))
    lines.append("    return b''.join(p)")
    exec("\n".join(lines), env)  # source built here from schema field names
    return env["write"]  # type: ignore[no-any-return]


def _field_schema(parsed: dict[str, Any], spec: dict[str, Any]) -> Any:
    """A field's type as a schema fastavro can write alone: the record's named types
    are carried along, so a field naming one of them resolves."""
    return fastavro.parse_schema(spec["type"],
                                 named_schemas=dict(parsed.get("__named_schemas", {})))
