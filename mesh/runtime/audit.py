"""The audit topic, ``mesh.audit``: what the mesh did, for any tool to tap.

Audit events are ordinary Avro events (``AuditEvent``), keyed by correlation id, so
the audit trail of one workflow is in one partition in the order it happened and
``mesh tap mesh.audit`` decodes them like any topic. Every agent publishes, with the
outputs of each input it handles (in the same acknowledged batch, so an input is not
committed before its audit is stored), one ``consumed`` event per input: agent,
topic, partition, offset, event id, correlation and causation ids, traceparent, size,
when handling started, how long it took, the outcome (``ok``, ``retry``,
``dead_letter``), the error, and ``outputs``: per event it produced, the new event
id, topic, size and traceparent (one audit record per input keeps the audit's cost
flat in the fan-out). :func:`expand` turns such an event into the ``consumed`` event
plus one ``produced`` event per output, the form readers work with.

``details["replica"]`` names the process that did it (``host:pid``).

An :class:`~mesh.runtime.emitter.Emitter` (and ``mesh emit``) publishes ``produced`` events for
what it injects, a timer's emits are ``produced`` events too, and ``mesh dlq replay``
publishes a ``dlq_replayed`` event. Payloads are left
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
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from mesh.kafka.base import OutRecord
from mesh.serde.writer import UNWRITTEN, RecordTemplate, Uncompiled
from mesh.topic import Topic

if TYPE_CHECKING:
    from mesh.config import AuditSettings
    from mesh.envelope import Envelope
    from mesh.kafka.base import Record
    from mesh.serde.codec import Codec

CONSUMED = "consumed"
PRODUCED = "produced"
DLQ_REPLAYED = "dlq_replayed"

OK = "ok"
RETRY = "retry"
DEAD_LETTER = "dead_letter"


class AuditOutput(BaseModel):
    """One event a handler produced from the input a ``consumed`` audit event is about."""

    event_id: str
    topic: str
    size: int
    traceparent: str | None = None
    correlation_id: str | None = None  # when not the input's
    payload: str | None = None


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
    outputs: list[AuditOutput] = Field(default_factory=list)  # of a consumed event


audit_topic = Topic("mesh.audit", AuditEvent, key="correlation_id", partitions=3,
                    retention_ms=7 * 24 * 3600 * 1000, dead_letters=False)


class Auditor:
    """Builds the audit records of one process (not produced here: the caller sends
    them with the outputs they describe).

    Records are written by pieces (:class:`~mesh.serde.writer.RecordTemplate`): the
    fields that are the same for all of an auditor's records of one kind (kind, agent,
    details, and for ``produced`` the topic and the nulls) are encoded once, the others
    per record; the bytes are those of encoding the :class:`AuditEvent` model
    (tests/unit/test_audit.py). Written with fastavro when the template
    cannot write a value.
    """

    def __init__(self, codec: Codec, settings: AuditSettings, *, source: str) -> None:
        self.codec, self.settings, self.source = codec, settings, source
        self.replica = f"{socket.gethostname()}:{os.getpid()}"  # which process did it
        self._headers_of: dict[str, tuple[tuple[str, bytes], ...]] = {}
        self._details = {"replica": self.replica}
        # By (kind, topic): a template of the constant fields, None when it has none.
        self._templates: dict[tuple[str, str | None], RecordTemplate | None] = {}

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def record(self, event: AuditEvent) -> OutRecord:
        """``event`` as a record of the audit topic."""
        return audit_record(self.codec, event, source=self.source)

    def consumed(self, record: Record, event: Envelope[Any] | None, *, outcome: str,
                 started_ms: int, duration_s: float, error: BaseException | None = None,
                 outputs: Sequence[tuple[Envelope[Any], OutRecord]] = (),
                 details: Mapping[str, str] | None = None) -> list[OutRecord]:
        """The audit of one input (``event`` is None when it could not be decoded), with
        the outputs its handling produced: one record per input, whatever its fan-out.
        ``details`` (what the handler noted) join the replica in the record's details."""
        if not self.enabled:
            return []
        payload = None
        if self.settings.payloads and event is not None and isinstance(event.payload,
                                                                       BaseModel):
            payload = event.payload.model_dump_json()
        if event is None:
            event_id = correlation = causation = traceparent = attempt = None
        else:
            event_id, correlation = event.event_id, event.correlation_id
            causation, traceparent, attempt = (event.causation_id, event.traceparent,
                                               event.attempt)
        # Built straight in Avro form (the fields of AuditEvent, in its schema): one per
        # handled input, so it skips building and validating the pydantic model.
        fields = {
            "at_ms": started_ms, "topic": record.topic, "partition": record.partition,
            "offset": record.offset, "event_id": event_id, "correlation_id": correlation,
            "causation_id": causation, "traceparent": traceparent, "outcome": outcome,
            "duration_ms": round(duration_s * 1000, 3), "attempt": attempt,
            "error_class": type(error).__name__ if error else None,
            "error": str(error)[:1000] if error else None, "size": len(record.value or b""),
            "payload": payload,
            "outputs": [{
                "event_id": env.event_id, "topic": out.topic, "size": len(out.value or b""),
                "traceparent": env.traceparent,
                "correlation_id": None if env.correlation_id == correlation
                else env.correlation_id,
                "payload": self._payload(env)} for env, out in outputs],
        }
        if details:  # not the template's constant details: written whole (rare)
            value, fingerprint = self.codec.encode_fields(audit_topic, {
                **self._constants(CONSUMED, None), **fields,
                "details": {**self._details, **details}})
        else:
            value, fingerprint = self._write(CONSUMED, None, fields)
        key = None if correlation is None else correlation.encode()
        return [OutRecord(audit_topic.name, value, key, self._headers(fingerprint))]

    def produced(self, outputs: Sequence[tuple[Envelope[Any], OutRecord]], *,
                 at_ms: int | None = None) -> list[OutRecord]:
        """The audit of events this process produced (each with its envelope), at
        ``at_ms`` (default: now)."""
        if not self.enabled:
            return []
        at = int(time.time() * 1000) if at_ms is None else at_ms
        records = []
        for env, out in outputs:
            value, fingerprint = self._write(PRODUCED, out.topic, {
                "at_ms": at, "event_id": env.event_id, "correlation_id": env.correlation_id,
                "causation_id": env.causation_id, "traceparent": env.traceparent,
                "attempt": env.attempt, "size": len(out.value or b""),
                "payload": self._payload(env)})
            records.append(OutRecord(audit_topic.name, value, env.correlation_id.encode(),
                                     self._headers(fingerprint)))
        return records

    def _constants(self, kind: str, topic: str | None) -> dict[str, Any]:
        """The fields all of this auditor's records of ``kind`` (to ``topic``) share."""
        if kind == CONSUMED:
            return {"kind": kind, "agent": self.source, "details": self._details}
        return {"kind": kind, "agent": self.source, "topic": topic, "partition": None,
                "offset": None, "outcome": None, "duration_ms": None, "error_class": None,
                "error": None, "details": self._details, "outputs": []}

    def _write(self, kind: str, topic: str | None, values: dict[str, Any]
               ) -> tuple[bytes, str]:
        """The framed audit record of ``kind`` with ``values`` for its varying fields."""
        if (kind, topic) not in self._templates:
            self._templates[(kind, topic)] = _template(self.codec, self._constants(kind,
                                                                                   topic))
        template = self._templates[(kind, topic)]
        if template is not None:
            try:
                prefix, fingerprint = self.codec.framing(audit_topic)
                return prefix + template.write(values), fingerprint
            except UNWRITTEN:  # a value of an unexpected type: fastavro coerces or says why
                pass
        return self.codec.encode_fields(audit_topic, {**self._constants(kind, topic),
                                                      **values})

    def _headers(self, fingerprint: str) -> tuple[tuple[str, bytes], ...]:
        headers = self._headers_of.get(fingerprint)
        if headers is None:
            headers = self._headers_of[fingerprint] = (
                ("mesh-schema", fingerprint.encode()), ("mesh-source", self.source.encode()))
        return headers

    def _payload(self, env: Envelope[Any]) -> str | None:
        if self.settings.payloads and isinstance(env.payload, BaseModel):
            return env.payload.model_dump_json()
        return None


def _template(codec: Codec, constants: dict[str, Any]) -> RecordTemplate | None:
    """The template of audit records sharing ``constants``; None when a varying field's
    type has no compiled writer (the audit schema changed): fastavro writes those."""
    try:
        return RecordTemplate(codec.serde(AuditEvent).parsed, constants)
    except Uncompiled:
        return None


def audit_record(codec: Codec, event: AuditEvent, *, source: str) -> OutRecord:
    """``event`` as a record of the audit topic, produced by ``source``."""
    value, fingerprint = codec.encode(audit_topic, event)
    return OutRecord(audit_topic.name, value, audit_topic.key_of(event),
                     (("mesh-schema", fingerprint.encode()), ("mesh-source", source.encode())))


def expand(event: AuditEvent) -> list[AuditEvent]:
    """``event`` as separate audit events: a ``consumed`` one listing outputs becomes
    itself plus one ``produced`` event per output (what readers such as ``mesh trace``
    and ``mesh top`` work with); any other event is returned as is.

    Example:
        >>> [e.kind for e in expand(AuditEvent(kind="consumed", event_id="e1",
        ...     outputs=[AuditOutput(event_id="e2", topic="t", size=3)]))]
        ['consumed', 'produced']
    """
    if not event.outputs:
        return [event]
    done = event.at_ms + round(event.duration_ms or 0)
    return [event.model_copy(update={"outputs": []}), *(AuditEvent(
        kind=PRODUCED, at_ms=done, agent=event.agent, topic=out.topic,
        event_id=out.event_id, correlation_id=out.correlation_id or event.correlation_id,
        causation_id=event.event_id, traceparent=out.traceparent, attempt=1,
        size=out.size, payload=out.payload, details=dict(event.details))
        for out in event.outputs)]
