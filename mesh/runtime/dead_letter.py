"""Dead-letter topics: reading them, filtering them and replaying their records.

A dead letter is the original record (bytes, key, headers) plus ``mesh-dlq-*`` headers
saying where it came from and why it failed (see :func:`mesh.runtime.runner.dead_letter`).
Replay re-publishes the original bytes and headers, so the event keeps its event id and
correlation id and a downstream that applies by event id applies it once; the replay is
recorded on the audit topic.

Example:
    >>> letters = await read_dead_letters(settings.kafka, "shop.orders")  # doctest: +SKIP
    >>> report = await replay(settings.kafka, letters, where=parse_where(["error_class=X"]))
"""

from __future__ import annotations

import operator
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mesh.serde.codec import Codec
from mesh.config import KafkaSettings
from mesh.envelope import CORRELATION_ID
from mesh.errors import ConfigError
from mesh.runtime.audit import DLQ_REPLAYED, AuditEvent, audit_record
from mesh.kafka.reader import TopicReader
from mesh.runtime import retry
from mesh.topic import DLQ_SUFFIX
from mesh.kafka.transport import MAX_REQUEST_BYTES, OutRecord, Producer, Record

REPLAYED_FROM = "mesh-replayed-from"

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

    def replay_record(self, target: str) -> OutRecord:
        """The original record, headers as they were (same event id), to ``target``."""
        headers = tuple((k, v) for k, v in self.record.headers
                        if k not in DLQ_HEADERS and k != REPLAYED_FROM)
        origin = f"{self.record.topic}[{self.record.partition}]@{self.record.offset}"
        return OutRecord(target, self.record.value, self.record.key,
                         (*headers, (REPLAYED_FROM, origin.encode())))


async def read_dead_letters(settings: KafkaSettings, topic: str) -> list[DeadLetter]:
    """Every dead letter of ``topic`` (the topic or its ``.dlq`` name), oldest first."""
    name = topic if topic.endswith(DLQ_SUFFIX) else topic + DLQ_SUFFIX
    async with TopicReader(settings, [name]) as reader:
        records = await reader.read_to_end()
    return [DeadLetter.of(r) for r in sorted(records, key=lambda r: (r.timestamp_ms,
                                                                       r.partition, r.offset))]


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, "<=": operator.le, "!=": operator.ne, "=": operator.eq,
    ">": operator.gt, "<": operator.lt, "~": lambda a, b: str(b) in str(a)}
_WHERE = re.compile(r"^(\w+)(>=|<=|!=|=|>|<|~)(.*)$")


def parse_where(clauses: Sequence[str]) -> Callable[[DeadLetter], bool]:
    """A filter from ``field<op>value`` clauses, all of which must hold.

    Operators: ``= != > >= < <=`` and ``~`` (contains). Example:
    ``["error_class=DecodeError", "offset>=10", "error~timeout"]``.
    """
    tests = []
    known = set(DeadLetter.of(Record("t.dlq", 0, 0, None, b"", (), 0)).fields())
    for clause in clauses:
        match = _WHERE.match(clause.strip())
        if match is None or match.group(1) not in known:
            raise ConfigError(f"--where {clause!r} is not 'field<op>value' with a field of "
                              f"{', '.join(sorted(known))} and an op of {' '.join(_OPS)}.")
        name, op, raw = match.groups()
        tests.append((name, _OPS[op], raw))

    def holds(letter: DeadLetter) -> bool:
        values = letter.fields()
        for name, op, raw in tests:
            value = values[name]
            expected: Any = int(raw) if isinstance(value, int) and raw.lstrip("-").isdigit() \
                else raw
            if value is None or not op(value, expected):
                return False
        return True

    return holds


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What a replay did."""

    considered: int
    replayed: int
    target: str
    offsets: tuple[int, ...]


async def replay(settings: KafkaSettings, letters: Sequence[DeadLetter], *,
                 where: Callable[[DeadLetter], bool] | None = None, to: str | None = None,
                 codec: Codec | None = None) -> ReplayReport:
    """Re-publish the dead letters ``where`` selects to their origin topic (or ``to``),
    keeping each event id; record each replay on the audit topic."""
    chosen = [d for d in letters if where is None or where(d)]
    targets = {to or d.origin_topic for d in chosen}
    codec = codec or Codec()
    async with Producer(settings) as producer:
        await producer.send_all([d.replay_record(to or d.origin_topic) for d in chosen])
        await producer.send_all([_audit(codec, d, to or d.origin_topic) for d in chosen])
    return ReplayReport(len(letters), len(chosen), ", ".join(sorted(targets)) or "-",
                        tuple(d.record.offset for d in chosen))


def _audit(codec: Codec, letter: DeadLetter, target: str) -> OutRecord:
    event = AuditEvent(
        kind=DLQ_REPLAYED, agent=letter.agent or None, topic=letter.record.topic,
        partition=letter.record.partition, offset=letter.record.offset,
        event_id=letter.event_id, correlation_id=dict(letter.record.headers).get(
            CORRELATION_ID, b"").decode(errors="replace") or letter.event_id,
        outcome="replayed", error_class=letter.error_class or None,
        error=letter.error or None, size=len(letter.record.value or b""),
        details={"to": target, "origin": f"{letter.origin_topic}[{letter.origin_partition}]"
                                          f"@{letter.origin_offset}"})
    return audit_record(codec, event, source="dlq-replay")
