"""The audit topic, ``mesh.audit``: what the mesh did, for any tool to tap.

Audit events are ordinary Avro events (``AuditEvent``), keyed by the event id they
are about, so ``mesh tap mesh.audit`` decodes them like any topic.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, Field

from mesh.topic import Topic


class AuditEvent(BaseModel):
    """One thing the mesh did: consumed, produced, failed, dead-lettered, replayed."""

    kind: str
    at_ms: int = Field(default_factory=lambda: int(time.time() * 1000))
    agent: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    event_id: str | None = None
    correlation_id: str | None = None
    outcome: str | None = None
    error_class: str | None = None
    error: str | None = None
    size: int | None = None
    details: dict[str, str] = Field(default_factory=dict)


audit_topic = Topic("mesh.audit", AuditEvent, key="event_id", partitions=3,
                    retention_ms=7 * 24 * 3600 * 1000, dead_letters=False)
