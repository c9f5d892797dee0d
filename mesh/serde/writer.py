"""Avro binary writers compiled once per schema, for the hot path.

fastavro's ``schemaless_writer`` walks the schema for every record it writes, behind a
Python wrapper, a ``BytesIO`` and a check of the parsed schema: for the mesh's small
records that costs more than the encoding itself (25 µs for an audit record of 21
fields). A compiled writer is one Python function generated from the parsed schema
once: per field a dict lookup, a type check and the encoding inline (nested records,
arrays and maps too), appending to a list of parts; no call per field.

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

# What a compiled writer raises for a value it does not write (the caller falls back).
UNWRITTEN = (TypeError, ValueError, KeyError, OverflowError, AttributeError)

_ONE_BYTE = [bytes((z,)) for z in range(0x80)]
_LONG_LIMIT = 1 << 63


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


def _check(x: str, test: str, kind: str) -> str:
    return f"if {test.format(x=x)}: raise TypeError('not {kind}: ' + type({x}).__name__)"


def _long_lines(x: str) -> list[str]:
    return [_check(x, "type({x}) is not int", "an int"),
            f"if -8192 <= {x} < 8192:",
            f"    z = ({x} << 1) ^ ({x} >> 63)",
            "    a(O[z] if z < 128 else bytes((z & 127 | 128, z >> 7)))",
            f"else: a(L({x}))"]


def _sized_lines(x: str, encoded: str) -> list[str]:
    return [f"b = {encoded}", "n = len(b)",
            "a(O[n << 1] if n < 64 else bytes((n << 1 & 127 | 128, n >> 6)) if n < 8192 "
            "else L(n))", "a(b)"]


_PRIMITIVE_LINES: dict[str, Callable[[str], list[str]]] = {
    "null": lambda x: [_check(x, "{x} is not None", "None")],
    "boolean": lambda x: [_check(x, "type({x}) is not bool", "a bool"),
                          f"a(b'\\x01' if {x} else b'\\x00')"],
    "int": _long_lines, "long": _long_lines,
    "float": lambda x: [_check(x, "type({x}) is not float", "a float"), f"a(F({x}))"],
    "double": lambda x: [_check(x, "type({x}) is not float", "a float"), f"a(D({x}))"],
    "bytes": lambda x: [_check(x, "type({x}) is not bytes", "bytes"),
                        *_sized_lines(x, x)],
    "string": lambda x: [_check(x, "type({x}) is not str", "a str"),
                         *_sized_lines(x, f"{x}.encode()")],
}


class _Source:
    """The source of one generated writer: its lines' helpers (in ``env``), fresh
    variable names, and the named types seen so far (parsed schemas use full names)."""

    def __init__(self, named: dict[str, Any]) -> None:
        self.env: dict[str, Any] = {"O": _ONE_BYTE, "L": long_bytes,
                                    "D": struct.Struct("<d").pack,
                                    "F": struct.Struct("<f").pack}
        self.named = dict(named)
        self.building: set[str] = set()
        self.count = 0

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def lines(self, schema: Any, x: str) -> list[str]:
        """Lines appending the encoding of the value in variable ``x``."""
        if isinstance(schema, str):
            if schema in _PRIMITIVE_LINES:
                return _PRIMITIVE_LINES[schema](x)
            if schema not in self.named:
                raise Uncompiled(f"type {schema!r}")
            schema = self.named[schema]
        if isinstance(schema, list):
            return self._union(schema, x)
        kind, logical = schema.get("type"), schema.get("logicalType")
        if logical is not None and logical != "uuid":
            raise Uncompiled(f"logical type {logical!r}")
        if "name" in schema:
            self.named.setdefault(schema["name"], schema)
        if kind == "record":
            return self._record(schema, x)
        if kind == "enum":
            table = self.fresh("E")
            self.env[table] = {s: long_bytes(i) for i, s in enumerate(schema["symbols"])}
            return [_check(x, "type({x}) is not str", "a str"), f"a({table}[{x}])"]
        if kind in ("array", "map"):
            return self._repeated(schema, x)
        if isinstance(kind, str) and kind in _PRIMITIVE_LINES:
            return _PRIMITIVE_LINES[kind](x)
        raise Uncompiled(f"type {kind!r}")

    def _union(self, branches: list[Any], x: str) -> list[str]:
        """``null`` and one other type, in either order (what the mesh's schemas use)."""
        others = [b for b in branches if b != "null"]
        if len(branches) != 2 or len(others) != 1:
            raise Uncompiled(f"union {branches!r}")
        null, tag = (r"b'\x00'", r"b'\x02'") if branches[0] == "null" else (
            r"b'\x02'", r"b'\x00'")
        return [f"if {x} is None: a({null})", "else:", f"    a({tag})",
                *_indented(self.lines(others[0], x))]

    def _record(self, schema: dict[str, Any], x: str) -> list[str]:
        name = schema["name"]
        if name in self.building:
            raise Uncompiled(f"recursive record {name}")
        self.building.add(name)
        out = [_check(x, "type({x}) is not dict", "a dict")]
        for spec in schema["fields"]:
            field = self.fresh("x")
            out.append(f"{field} = {x}[{spec['name']!r}]")
            out.extend(self.lines(spec["type"], field))
        self.building.discard(name)
        return out

    def _repeated(self, schema: dict[str, Any], x: str) -> list[str]:
        item, key = self.fresh("x"), self.fresh("k")
        if schema["type"] == "array":
            test, loop, keys = ("type({x}) is not list and type({x}) is not tuple",
                                f"for {item} in {x}:", [])
            items = self.lines(schema["items"], item)
        else:
            test, loop = "type({x}) is not dict", f"for {key}, {item} in {x}.items():"
            keys, items = _PRIMITIVE_LINES["string"](key), self.lines(schema["values"], item)
        return [_check(x, test, "a " + schema["type"]), f"if {x}:",
                f"    a(L(len({x})))", f"    {loop}", *_indented(keys + items, 2),
                r"a(b'\x00')"]


def _indented(lines: list[str], levels: int = 1) -> list[str]:
    return ["    " * levels + line for line in lines]


def _generated(parsed: dict[str, Any], constants: Mapping[str, bytes]) -> Callable[[Any], bytes]:
    """The writer of record schema ``parsed`` as one generated function; the fields in
    ``constants`` are written as those bytes (the values passed need not have them)."""
    source = _Source(parsed.get("__named_schemas", {}))
    source.named.setdefault(parsed["name"], parsed)
    source.building.add(parsed["name"])
    lines = ["def write(v):", "    p = []", "    a = p.append"]
    for spec in parsed["fields"]:
        name = spec["name"]
        if name in constants:
            piece = source.fresh("C")
            source.env[piece] = constants[name]
            lines.append(f"    a({piece})")
            continue
        field = source.fresh("x")
        lines.append(f"    {field} = v[{name!r}]")
        lines.extend(_indented(source.lines(spec["type"], field)))
    lines.append("    return b''.join(p)")
    exec("\n".join(lines), source.env)  # built here from the schema's names only
    return source.env["write"]  # type: ignore[no-any-return]


def compile_writer(parsed: Any) -> Callable[[Any], bytes] | None:
    """A function writing values of the fastavro-parsed record schema ``parsed`` to Avro
    bytes (raising one of :data:`UNWRITTEN` for a value it leaves to fastavro), or None
    when the schema has a construct it does not handle."""
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        return None
    try:
        return _generated(parsed, {})
    except Uncompiled:
        return None


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
        self.write: Callable[[Mapping[str, Any]], bytes] = _generated(parsed, constants)


def _field_schema(parsed: dict[str, Any], spec: dict[str, Any]) -> Any:
    """A field's type as a schema fastavro can write alone: the record's named types
    are carried along, so a field naming one of them resolves."""
    return fastavro.parse_schema(spec["type"],
                                 named_schemas=dict(parsed.get("__named_schemas", {})))
