"""Serialization: Avro schemas from pydantic models (:mod:`.avro`), the wire framing
and optional schema registry (:mod:`.codec`), and the schema history that keeps old
values decodable (:mod:`.history`)."""
