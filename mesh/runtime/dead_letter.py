"""Dead-letter records: building one for an input that failed for good, and decoding one.

A dead letter is the original record (bytes, key, headers) plus ``mesh-dlq-*`` headers
saying where it came from and why it failed: :func:`dead_letter` builds it (the runtime
sends it to ``<topic>.dlq``), :class:`DeadLetter` decodes it. Reading dead-letter topics,
filtering and replaying them is what ``mesh dlq`` shows: :mod:`mesh.views.dlq`.

Example:
    >>> failed = Record("shop.orders", 2, 41, b"o-1", b"...", (), 0)
    >>> letter = DeadLetter.of(Record("shop.orders.dlq", 0, 0, b"o-1", b"...", dead_letter(
    ...     failed, ValueError("bad total"), agent="billing", attempts=3).headers, 0))
    >>> letter.origin_topic, letter.origin_offset, letter.error_class, letter.attempts
    ('shop.orders', 41, 'ValueError', 3)
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from mesh.kafka.base import OutRecord, Record
from mesh.kafka.transport import MAX_REQUEST_BYTES
from mesh.runtime import retry
from mesh.topic import DLQ_SUFFIX

DLQ_TOPIC = "mesh-dlq-topic"
DLQ_PARTITION = "mesh-dlq-partition"
DLQ_OFFSET = "mesh-dlq-offset"
DLQ_ERROR_CLASS = "mesh-dlq-error-class"
DLQ_ERROR = "mesh-dlq-error"
DLQ_ATTEMPTS = "mesh-dlq-attempts"
DLQ_AGENT = "mesh-dlq-agent"
DLQ_FAILED_AT = "mesh-dlq-failed-at"
DLQ_TRUNCATED = "mesh-dlq-truncated-from"
DLQ_HEADERS = (DLQ_TOPIC, DLQ_PARTITION, DLQ_OFFSET, DLQ_ERROR_CLASS, DLQ_ERROR, DLQ_ATTEMPTS,
               DLQ_AGENT, DLQ_FAILED_AT, DLQ_TRUNCATED)
# A dead letter keeps the original bytes up to what one produce request can carry; a
# larger body is cut there and its original size recorded (the headers say where the
# whole record still is: topic, partition, offset).
DLQ_MAX_BYTES = MAX_REQUEST_BYTES - 1024 * 1024


def dead_letter(record: Record, error: BaseException, *, agent: str, attempts: int,
                first_failure_ms: int | None = None) -> OutRecord:
    """The dead-letter record for ``record``: its bytes, key and headers, plus why, and
    the first and last failure times. A record from a retry topic names the position it
    first failed at (and keeps the first failure time it carries)."""
    message = str(error) or type(error).__name__
    topic, partition, offset = record.topic, str(record.partition), str(record.offset)
    origin = retry.headers_of(record).get(retry.RETRY_ORIGIN)
    if origin and (found := _POSITION.match(origin)):
        topic, partition, offset = found.groups()
    extra = {
        DLQ_TOPIC: topic, DLQ_PARTITION: partition,
        DLQ_OFFSET: offset, DLQ_ERROR_CLASS: type(error).__name__,
        DLQ_ERROR: message[:4000], DLQ_ATTEMPTS: str(attempts), DLQ_AGENT: agent,
        DLQ_FAILED_AT: str(int(time.time() * 1000)),
    }
    carried = retry.headers_of(record).get(retry.FIRST_FAILURE)
    extra[retry.FIRST_FAILURE] = carried or str(first_failure_ms or extra[DLQ_FAILED_AT])
    extra[retry.LAST_FAILURE] = extra[DLQ_FAILED_AT]
    value = record.value
    if value is not None and len(value) > DLQ_MAX_BYTES:  # the body cannot be stored whole
        extra[DLQ_TRUNCATED] = str(len(value))
        value = value[:DLQ_MAX_BYTES]
    kept = tuple((k, v) for k, v in record.headers if k not in extra)
    headers = kept + tuple((k, v.encode()) for k, v in extra.items())
    return OutRecord(topic + ".dlq", value, record.key, headers)


_POSITION = re.compile(r"^(.+)\[(\d+)\]@(\d+)$")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of a dead-letter topic, with its failure metadata decoded."""

    record: Record
    origin_topic: str
    origin_partition: int
    origin_offset: int
    error_class: str
    error: str
    attempts: int
    agent: str
    failed_at_ms: int
    event_id: str | None

    @classmethod
    def of(cls, record: Record) -> DeadLetter:
        h = {k: v.decode(errors="replace") for k, v in record.headers}
        return cls(record, h.get("mesh-dlq-topic", record.topic.removesuffix(DLQ_SUFFIX)),
                   int(h.get("mesh-dlq-partition", -1)), int(h.get("mesh-dlq-offset", -1)),
                   h.get("mesh-dlq-error-class", ""), h.get("mesh-dlq-error", ""),
                   int(h.get("mesh-dlq-attempts", 0)), h.get("mesh-dlq-agent", ""),
                   int(h.get("mesh-dlq-failed-at", 0)), h.get("mesh-event-id"))

    def fields(self) -> dict[str, Any]:
        """The values ``--where`` filters and ``mesh dlq list`` shows."""
        key = self.record.key.decode(errors="replace") if self.record.key else None
        return {"offset": self.record.offset, "partition": self.record.partition,
                "origin_topic": self.origin_topic, "origin_partition": self.origin_partition,
                "origin_offset": self.origin_offset, "error_class": self.error_class,
                "error": self.error, "attempts": self.attempts, "agent": self.agent,
                "failed_at_ms": self.failed_at_ms, "event_id": self.event_id, "key": key,
                "size": len(self.record.value or b"")}
