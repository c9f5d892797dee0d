"""How schemas are identified and compared: the CRC-64-AVRO fingerprint that single-object
encoding writes and the schema history files are named by, and a field-by-field account
of where a writer schema and a reader schema differ, for error messages.
"""

from __future__ import annotations

from typing import Any

from fastavro.schema import fingerprint, to_parsing_canonical_form


def schema_fingerprint(parsed: Any) -> str:
    """The CRC-64-AVRO fingerprint (16 hex digits) of a parsed schema's canonical form:
    what single-object encoding writes after ``C3 01``.

    Example:
        >>> from fastavro import parse_schema
        >>> schema_fingerprint(parse_schema("int"))
        '8f5c393f1ad57572'
    """
    return str(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


def schema_differences(writer: Any, reader: Any) -> list[str]:
    """Field by field, where two parsed record schemas differ, for error messages: fields
    the reader added without a default and fields whose types differ. Not a compatibility
    check (a promotion such as int -> long is listed too); used once resolution failed.

    Example:
        >>> from fastavro import parse_schema
        >>> old = parse_schema({"type": "record", "name": "O", "fields": [
        ...     {"name": "a", "type": "long"}]})
        >>> new = parse_schema({"type": "record", "name": "O", "fields": [
        ...     {"name": "a", "type": "string"}, {"name": "b", "type": "long"}]})
        >>> schema_differences(old, new)
        ['a: long -> string', 'b: added without a default']
    """
    found: list[str] = []
    _differences(writer, reader, [], found, set())
    return found


def _differences(writer: Any, reader: Any, path: list[str], found: list[str],
                 seen: set[str]) -> None:
    if not (_is_record(writer) and _is_record(reader)):
        if _type_name(writer) != _type_name(reader):
            found.append(f"{'.'.join(path) or 'the record'}: {_type_name(writer)} -> "
                         f"{_type_name(reader)}")
        return
    if reader["name"] in seen:  # a record used twice: its fields are listed once
        return
    seen.add(reader["name"])
    written = {f["name"]: f for f in writer["fields"]}
    for entry in reader["fields"]:
        where = [*path, entry["name"]]
        if entry["name"] in written:
            _differences(written[entry["name"]]["type"], entry["type"], where, found, seen)
        elif "default" not in entry:
            found.append(f"{'.'.join(where)}: added without a default")


def _is_record(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "record"


def _type_name(schema: Any) -> str:
    if isinstance(schema, list):
        return "|".join(_type_name(s) for s in schema)
    if not isinstance(schema, dict):
        return str(schema)
    kind = schema.get("type")
    if kind in ("record", "enum", "fixed"):
        return str(schema["name"])
    if kind == "array":
        return f"array<{_type_name(schema['items'])}>"
    if kind == "map":
        return f"map<{_type_name(schema['values'])}>"
    return _type_name(kind)
