"""Emitting events into the mesh from an existing system (outside any agent).

An :class:`Emitter` validates payloads against the topic's model, encodes them the way
the mesh does (Avro, single-object or Confluent framing), sets the mesh headers (a new
event id, the correlation id, a new trace, ``mesh-source``) and produces them, waiting
for the broker's acknowledgement; what it injected is recorded on ``mesh.audit``.
``mesh emit`` is this, from a shell.

Example:
    >>> async with Emitter(MeshSettings(), source="billing") as emitter:  # doctest: +SKIP
    ...     [event] = await emitter.emit(orders, [Order(order_id="o1")])
    ...     event.event_id
    'f0c4...'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

from pydantic import BaseModel

from mesh.serde.codec import Codec
from mesh.config import MeshSettings
from mesh.envelope import Envelope
from mesh.runtime.audit import Auditor, audit_topic
from mesh.kafka.provision import apply_topics
from mesh.topic import Topic
from mesh.kafka.transport import OutRecord, Producer


class Emitter:
    """Produces typed events to mesh topics, as an existing system would."""

    def __init__(self, settings: MeshSettings, *, source: str = "emit",
                 producer: Producer | None = None, codec: Codec | None = None) -> None:
        self.source = source
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
        env = Envelope.new(payload, source=self.source, correlation_id=correlation_id,
                           key=key if key is not None else topic.key_of(payload))
        if event_id is not None:
            env = Envelope(payload, event_id, correlation_id or event_id, source=self.source,
                           key=env.key)
        value, fingerprint = self.codec.encode(topic, payload)
        env = env.with_payload(payload, schema=fingerprint)
        return OutRecord(topic.name, value, env.key, tuple(env.headers())), env

    async def emit(self, topic: Topic[Any], payloads: Sequence[BaseModel], *,
                   key: bytes | None = None, correlation_id: str | None = None
                   ) -> list[Envelope[Any]]:
        """Produce ``payloads`` to ``topic`` (and their ``produced`` audit events to
        ``mesh.audit``) and wait until the broker has them all."""
        await self.codec.prepare([topic, audit_topic])
        built = [self.record(topic, p, key=key, correlation_id=correlation_id)
                 for p in payloads]
        audit = self.auditor.produced([(env, record) for record, env in built])
        await self._producer.send_all([record for record, _ in built] + audit)
        return [env for _, env in built]
