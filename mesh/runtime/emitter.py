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

import os
from collections.abc import Sequence
from typing import Any, Self

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
from mesh.runtime.audit import Auditor, audit_topic
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
                                      + self._audit(built, at))
        return [env for _, env in built]

    def _audit(self, built: list[tuple[OutRecord, Envelope[Any]]],
               at_ms: int) -> list[OutRecord]:
        """The ``produced`` audit records of ``built`` (written by pieces: the
        auditor's template of the topic's records)."""
        if not self.auditor.enabled:
            return []
        return self.auditor.produced([(env, record) for record, env in built], at_ms=at_ms)


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
