"""Emitting events into the mesh from an existing system (outside any agent).

An :class:`Emitter` validates payloads against the topic's model, encodes them the way
the mesh does (Avro, single-object or Confluent framing), sets the mesh headers (a new
event id, the correlation id, a new trace, ``mesh-source``) and produces them, waiting
for the broker's acknowledgement; what it injected is recorded on ``mesh.audit``.
``mesh emit`` is this, from a shell.

One :meth:`Emitter.emit` call is one batch: every record (and its audit record) is
queued before any acknowledgement is awaited, so the producer packs them into a few
produce requests; the call returns once all are acknowledged and raises
:class:`~mesh.errors.TransportError` if any was not. Emit many payloads per call where
throughput matters (``bench/emit.py``).

Example:
    >>> async with Emitter(MeshSettings(), source="billing") as emitter:  # doctest: +SKIP
    ...     [event] = await emitter.emit(orders, [Order(order_id="o1")])
    ...     event.event_id
    'f0c4...'
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from typing import Any, Self

import fastavro
from pydantic import BaseModel

from mesh.config import MeshSettings
from mesh.envelope import (
    ATTEMPT,
    CORRELATION_ID,
    EVENT_ID,
    PRODUCED_AT,
    SCHEMA,
    SOURCE,
    TRACEPARENT,
    Envelope,
    now_ms,
)
from mesh.kafka.base import BaseProducer, OutRecord
from mesh.kafka.provision import apply_topics
from mesh.kafka.transport import Producer
from mesh.runtime.audit import PRODUCED, Auditor, audit_topic
from mesh.serde.codec import Codec
from mesh.topic import Topic


class Emitter:
    """Produces typed events to mesh topics, as an existing system would."""

    def __init__(self, settings: MeshSettings, *, source: str = "emit",
                 producer: BaseProducer | None = None, codec: Codec | None = None) -> None:
        self.source = source
        self._source = source.encode()
        self._settings = settings
        self.codec = codec or Codec(settings.schema_registry)
        self.auditor = Auditor(self.codec, settings.audit, source=source)
        self._audits: dict[str, _ProducedAudit | None] = {}  # by topic; None: no template
        self._producer = producer or Producer(settings.kafka)

    async def __aenter__(self) -> Self:
        if self.auditor.enabled:  # created as declared, not auto-created by a first write
            await apply_topics(self._settings.kafka, [audit_topic])
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    def record(self, topic: Topic[Any], payload: BaseModel, *, key: bytes | None = None,
               correlation_id: str | None = None, event_id: str | None = None
               ) -> tuple[OutRecord, Envelope[Any]]:
        """The record for ``payload`` and its envelope (ids, trace), not yet produced;
        the codec must know the topic (see :meth:`emit`, which prepares it)."""
        [(fresh, traceparent)] = fresh_ids(1)
        return self._build(topic, payload, key, correlation_id, event_id or fresh,
                           traceparent, now_ms())

    def _build(self, topic: Topic[Any], payload: BaseModel, key: bytes | None,
               correlation_id: str | None, event_id: str, traceparent: str,
               produced_at_ms: int) -> tuple[OutRecord, Envelope[Any]]:
        """One event entering the mesh: what ``Envelope.new`` and ``Envelope.headers``
        give, built in one go (this runs for every emitted event)."""
        value, fingerprint = self.codec.encode(topic, payload)  # raises for another model
        key = key if key is not None else topic.key_of(payload)
        correlation = correlation_id or event_id
        env = Envelope(payload, event_id, correlation, traceparent=traceparent,
                       source=self.source, schema=fingerprint, produced_at_ms=produced_at_ms,
                       key=key)
        headers = ((EVENT_ID, event_id.encode()), (CORRELATION_ID, correlation.encode()),
                   (TRACEPARENT, traceparent.encode()), (SOURCE, self._source),
                   (ATTEMPT, b"1"), (SCHEMA, fingerprint.encode()),
                   (PRODUCED_AT, str(produced_at_ms).encode()))
        return OutRecord(topic.name, value, key, headers), env

    async def emit(self, topic: Topic[Any], payloads: Sequence[BaseModel], *,
                   key: bytes | None = None, correlation_id: str | None = None
                   ) -> list[Envelope[Any]]:
        """Produce ``payloads`` to ``topic`` (and their ``produced`` audit events to
        ``mesh.audit``) and wait until the broker has them all: all are queued first,
        then their acknowledgements awaited together (``TransportError`` if any failed)."""
        await self.codec.prepare([topic, audit_topic])
        at = now_ms()
        built = [self._build(topic, p, key, correlation_id, event_id, traceparent, at)
                 for p, (event_id, traceparent) in zip(payloads, fresh_ids(len(payloads)),
                                                       strict=True)]
        await self._producer.send_all([record for record, _ in built]
                                      + self._audit(topic.name, built, at))
        return [env for _, env in built]

    def _audit(self, topic: str, built: list[tuple[OutRecord, Envelope[Any]]],
               at_ms: int) -> list[OutRecord]:
        """The ``produced`` audit records of ``built``: from the topic's template when
        it has one, else (audit payloads on, or an audit schema it cannot split) the
        auditor's."""
        if not self.auditor.enabled:
            return []
        if topic not in self._audits:
            self._audits[topic] = (None if self.auditor.settings.payloads
                                   else _ProducedAudit.build(self.auditor, topic))
        template = self._audits[topic]
        if template is None:
            return self.auditor.produced([(env, record) for record, env in built])
        return [template.record(env, record, at_ms) for record, env in built]


def fresh_ids(n: int) -> list[tuple[str, str]]:
    """``n`` pairs of a new event id (a random version-4 UUID, as ``uuid.uuid4()``
    gives) and a new sampled W3C trace context, from one read of the OS's random source:
    ``Envelope.new`` reads it three times per event."""
    raw = os.urandom(40 * n)
    ids = []
    for i in range(0, 40 * n, 40):
        uid = bytearray(raw[i:i + 16])
        uid[6] = uid[6] & 0x0F | 0x40  # version 4
        uid[8] = uid[8] & 0x3F | 0x80  # RFC 4122 variant
        h = uid.hex()
        ids.append((f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}",
                    f"00-{raw[i + 16:i + 32].hex()}-{raw[i + 32:i + 40].hex()}-01"))
    return ids


class _ProducedAudit:
    """The ``produced`` audit records of events emitted to one topic, written by pieces.

    An Avro record's binary form is its fields' encodings one after another, in schema
    order. Of these records only five fields differ from event to event (``at_ms``,
    ``event_id``, ``correlation_id``, ``traceparent``, ``size``): the others (kind,
    agent, topic, details, and the nulls) are encoded once, here, and the five by hand
    per event. fastavro's writer, given the whole record, spent most of an emitted
    event's CPU on the audit record's twenty fields. The bytes are exactly those of
    encoding the ``AuditEvent`` model (tests/unit/test_emitter.py).
    """

    __slots__ = ("_headers", "_pieces", "_topic")

    def __init__(self, pieces: list[tuple[bytes, Callable[[Any], bytes] | None, str]],
                 headers: tuple[tuple[str, bytes], ...]) -> None:
        self._pieces = pieces
        self._headers = headers
        self._topic = audit_topic.name

    @classmethod
    def build(cls, auditor: Auditor, topic: str) -> _ProducedAudit | None:
        """The template of ``topic``'s records, or None when a varying field has a type
        written here by no hand encoder (the audit schema changed)."""
        codec = auditor.codec
        fields: dict[str, Any] = {
            "kind": PRODUCED, "at_ms": 0, "agent": auditor.source, "topic": topic,
            "partition": None, "offset": None, "event_id": "", "correlation_id": "",
            "causation_id": None, "traceparent": "", "outcome": None, "duration_ms": None,
            "attempt": 1, "error_class": None, "error": None, "size": 0, "payload": None,
            "details": {"replica": auditor.replica}, "outputs": []}
        framed, fingerprint = codec.encode_fields(audit_topic, fields)
        serde = codec.serde(audit_topic.model)
        framing = framed[:len(framed) - len(serde.body_of(fields))]
        pieces: list[tuple[bytes, Callable[[Any], bytes] | None, str]] = []
        constant = io.BytesIO(framing)
        constant.seek(0, io.SEEK_END)
        for spec in serde.schema["fields"]:
            name = spec["name"]
            if name not in _VARYING:
                fastavro.schemaless_writer(constant, fastavro.parse_schema(spec["type"]),
                                           fields[name])
                continue
            encoder = _ENCODERS.get(str(spec["type"]))
            if encoder is None:
                return None
            pieces.append((constant.getvalue(), encoder, name))
            constant = io.BytesIO()
        pieces.append((constant.getvalue(), None, ""))
        return cls(pieces, (("mesh-schema", fingerprint.encode()),
                            ("mesh-source", auditor.source.encode())))

    def record(self, env: Envelope[Any], out: OutRecord, at_ms: int) -> OutRecord:
        """The audit record of ``env``, emitted as ``out`` at ``at_ms``."""
        values = {"at_ms": at_ms, "event_id": env.event_id,
                  "correlation_id": env.correlation_id, "traceparent": env.traceparent,
                  "size": len(out.value or b"")}
        parts = []
        for constant, encoder, name in self._pieces:
            parts.append(constant)
            if encoder is not None:
                parts.append(encoder(values[name]))
        return OutRecord(self._topic, b"".join(parts), env.correlation_id.encode(),
                         self._headers)


_SMALL = [bytes((n << 1,)) for n in range(64)]
_VARYING = frozenset(("at_ms", "event_id", "correlation_id", "traceparent", "size"))


def _long(n: int) -> bytes:
    """An Avro long: zig-zag, then a base-128 varint."""
    if 0 <= n < 64:  # one byte: string lengths of ids and trace contexts
        return _SMALL[n]
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _string(value: str) -> bytes:
    data = value.encode()
    return _long(len(data)) + data


def _optional(encode: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """A union of null (branch 0) and one type (branch 1)."""
    return lambda value: b"\x00" if value is None else b"\x02" + encode(value)


_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "long": _long, "string": _string,
    str(["null", "long"]): _optional(_long), str(["null", "string"]): _optional(_string)}
