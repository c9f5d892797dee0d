"""``mesh dlq``: reading dead-letter topics, filtering them and replaying their records.

A dead letter (:class:`~mesh.runtime.dead_letter.DeadLetter`) is the original record
plus ``mesh-dlq-*`` headers saying where it came from and why it failed. Replay
re-publishes the original bytes and headers, so the event keeps its event id and
correlation id and a downstream that applies by event id applies it once; the replay is
recorded on the audit topic. The only view that writes: the CLI drives it.

Example:
    >>> letters = await read_dead_letters(settings.kafka, "shop.orders")  # doctest: +SKIP
    >>> report = await replay(settings.kafka, letters, where=parse_where(["error_class=X"]))
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mesh.config import KafkaSettings
from mesh.envelope import CORRELATION_ID
from mesh.errors import ConfigError
from mesh.kafka.base import OutRecord, Record
from mesh.kafka.reader import TopicReader
from mesh.kafka.transport import Producer
from mesh.runtime.audit import DLQ_REPLAYED, AuditEvent, audit_record
from mesh.runtime.dead_letter import DLQ_HEADERS, DeadLetter
from mesh.serde.codec import Codec
from mesh.topic import DLQ_SUFFIX

REPLAYED_FROM = "mesh-replayed-from"


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
        await producer.send_all([replay_record(d, to or d.origin_topic) for d in chosen])
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


def replay_record(letter: DeadLetter, target: str) -> OutRecord:
    """The original record of ``letter``, headers as they were (same event id), to
    ``target``, naming the dead letter it came from in ``mesh-replayed-from``."""
    record = letter.record
    headers = tuple((k, v) for k, v in record.headers
                    if k not in DLQ_HEADERS and k != REPLAYED_FROM)
    origin = f"{record.topic}[{record.partition}]@{record.offset}"
    return OutRecord(target, record.value, record.key,
                     (*headers, (REPLAYED_FROM, origin.encode())))
