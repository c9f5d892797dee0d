"""The audit topic, ``mesh.audit``: what the mesh did, for any tool to tap.

Audit events are ordinary Avro events (``AuditEvent``), keyed by correlation id, so
the audit trail of one workflow is in one partition in the order it happened and
``mesh tap mesh.audit`` decodes them like any topic. Every agent publishes, with the
outputs of each input it handles (in the same acknowledged batch, so an input is not
committed before its audit is stored):

* one ``consumed`` event per input: agent, topic, partition, offset, event id,
  correlation and causation ids, traceparent, size, when handling started, how long
  it took, the outcome (``ok``, ``retry``, ``dead_letter``) and the error;
* one ``produced`` event per output: agent, topic, the new event id, its cause
  (the input's event id), traceparent and size.

Both name the process that did it in ``details["replica"]`` (``host:pid``).

An :class:`~mesh.emitter.Emitter` (and ``mesh emit``) publishes ``produced`` events for
what it injects, and ``mesh dlq replay`` a ``dlq_replayed`` event. Payloads are left
out unless ``MESH_AUDIT__PAYLOADS=true`` (then as JSON); headers, ids and sizes are
always there. ``MESH_AUDIT__ENABLED=false`` turns publishing off.

Example:
    >>> auditor = Auditor(codec, AuditSettings())  # doctest: +SKIP
    >>> records = auditor.consumed(record, event, outcome="ok", started_ms=t0,
    ...                            duration_s=0.01)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from mesh.topic import Topic

if TYPE_CHECKING:
    from mesh.codec import Codec
    from mesh.config import AuditSettings
    from mesh.envelope import Envelope
    from mesh.transport import OutRecord, Record

CONSUMED = "consumed"
PRODUCED = "produced"
DLQ_REPLAYED = "dlq_replayed"

OK = "ok"
RETRY = "retry"
DEAD_LETTER = "dead_letter"


class AuditEvent(BaseModel):
    """One thing the mesh did: consumed (with its outcome), produced, replayed."""

    kind: str
    at_ms: int = Field(default_factory=lambda: int(time.time() * 1000))
    agent: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    event_id: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    traceparent: str | None = None
    outcome: str | None = None
    duration_ms: float | None = None
    attempt: int | None = None
    error_class: str | None = None
    error: str | None = None
    size: int | None = None
    payload: str | None = None  # JSON, only with MESH_AUDIT__PAYLOADS=true
    details: dict[str, str] = Field(default_factory=dict)


audit_topic = Topic("mesh.audit", AuditEvent, key="correlation_id", partitions=3,
                    retention_ms=7 * 24 * 3600 * 1000, dead_letters=False)


class Auditor:
    """Builds the audit records of one process (not produced here: the caller sends
    them with the outputs they describe)."""

    def __init__(self, codec: Codec, settings: AuditSettings, *, source: str) -> None:
        self.codec, self.settings, self.source = codec, settings, source
        self.replica = f"{socket.gethostname()}:{os.getpid()}"  # which process did it

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def record(self, event: AuditEvent) -> OutRecord:
        """``event`` as a record of the audit topic."""
        from mesh.transport import OutRecord

        value, fingerprint = self.codec.encode(audit_topic, event)
        return OutRecord(audit_topic.name, value, audit_topic.key_of(event),
                         (("mesh-schema", fingerprint.encode()),
                          ("mesh-source", self.source.encode())))

    def consumed(self, record: Record, event: Envelope[Any] | None, *, outcome: str,
                 started_ms: int, duration_s: float, error: BaseException | None = None,
                 ) -> list[OutRecord]:
        """The audit of one input (``event`` is None when it could not be decoded)."""
        if not self.enabled:
            return []
        payload = None
        if self.settings.payloads and event is not None and isinstance(event.payload,
                                                                       BaseModel):
            payload = event.payload.model_dump_json()
        return [self.record(AuditEvent(
            kind=CONSUMED, at_ms=started_ms, agent=self.source, topic=record.topic,
            partition=record.partition, offset=record.offset,
            event_id=event.event_id if event else None,
            correlation_id=event.correlation_id if event else None,
            causation_id=event.causation_id if event else None,
            traceparent=event.traceparent if event else None, outcome=outcome,
            duration_ms=round(duration_s * 1000, 3),
            attempt=event.attempt if event else None,
            error_class=type(error).__name__ if error else None,
            error=str(error)[:1000] if error else None, size=len(record.value or b""),
            payload=payload, details={"replica": self.replica}))]

    def produced(self, outputs: list[tuple[Envelope[Any], OutRecord]]) -> list[OutRecord]:
        """The audit of events this process produced (each with its envelope)."""
        if not self.enabled:
            return []
        at = int(time.time() * 1000)
        return [self.record(AuditEvent(
            kind=PRODUCED, at_ms=at, agent=self.source, topic=out.topic,
            event_id=env.event_id, correlation_id=env.correlation_id,
            causation_id=env.causation_id, traceparent=env.traceparent,
            attempt=env.attempt, size=len(out.value or b""),
            payload=env.payload.model_dump_json()
            if self.settings.payloads and isinstance(env.payload, BaseModel) else None,
            details={"replica": self.replica}))
            for env, out in outputs]
