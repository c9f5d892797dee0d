"""One workflow, rebuilt from the audit topic: which agent handled which event, on
which topic, when, how long, and how it ended (``mesh trace CORRELATION_ID``).

A :class:`Trace` is a tree of events. Each :class:`TraceNode` is one event id: where
it was produced (topic, producing agent or emitter, time, size), every
:class:`Handling` of it (one per consuming agent, with each :class:`Attempt`), and its
children: the events whose causation id is this event's id, i.e. what the handlers
that consumed it produced. Roots are events without a cause, or whose cause is not in
the audit (then ``cause_in_audit`` is false: the audit was off there, or it expired).

Kafka semantics show through: a retried input is one handling with several attempts
(``retry`` ... then ``ok`` or ``dead_letter``); with at-least-once delivery an input
handled again after a crash is an attempt labelled ``redelivery`` (the same attempt
number twice), and an output produced twice keeps its derived event id, so it is one
node with ``produced`` > 1. A consumption after ``mesh dlq replay`` is a ``replay``.

Reading: the audit topic is keyed by correlation id, so all of a workflow's audit
records are in the one partition Kafka's default partitioner gives that key;
:func:`read_trace` reads only that partition, to its end as of the call, and skips
records of other workflows by key before decoding them. What ``mesh trace X`` shows is
therefore the events of correlation X *audited under X's key*. One case is not: an
output emitted with another correlation id than its input's
(``Context.emit(..., correlation_id=Y)``) is listed in the input's ``consumed`` record,
keyed X, so ``mesh trace Y`` shows that event as a root whose production is not in the
audit (its consumptions, audited under Y, are there). ``all_partitions=True``
(``mesh trace --all-partitions``) reads and decodes every audit record instead, and
finds those too, at the cost of reading the whole topic.

Example:
    >>> trace = build_trace("c1", [
    ...     AuditEvent(kind="produced", at_ms=1000, agent="emit", topic="orders",
    ...                event_id="e1", correlation_id="c1"),
    ...     AuditEvent(kind="consumed", at_ms=1005, agent="answerer", topic="orders",
    ...                event_id="e1", correlation_id="c1", outcome="ok",
    ...                duration_ms=12.5, attempt=1)])
    >>> [(n.topic, n.producer, [h.agent for h in n.handlings]) for n in trace.walk()]
    [('orders', 'emit', ['answerer'])]
    >>> trace.wall_ms
    17.5
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mesh.config import KafkaSettings
from mesh.errors import MeshError
from mesh.kafka.base import Record
from mesh.kafka.reader import TopicReader
from mesh.runtime.audit import (
    CONSUMED,
    DEAD_LETTER,
    DLQ_REPLAYED,
    PRODUCED,
    RETRY,
    AuditEvent,
    audit_topic,
    expand,
)
from mesh.serde.codec import Codec
from mesh.topic import DLQ_SUFFIX

logger = logging.getLogger(__name__)

FIRST, RETRIED, REDELIVERY, REPLAY = "first", "retry", "redelivery", "replay"
_RETRY_TOPIC = re.compile(r"^(.*)\.retry\.\d+$")


@dataclass(frozen=True, slots=True)
class Attempt:
    """One consumption of an event by an agent (one ``consumed`` audit event).

    ``delivery`` says why it happened: ``first``, ``retry`` (a later attempt after a
    retriable failure), ``redelivery`` (an attempt number seen before: at-least-once
    redelivery after a crash or rebalance) or ``replay`` (after ``mesh dlq replay``).
    """

    agent: str
    topic: str | None
    at_ms: int
    outcome: str
    attempt: int
    delivery: str
    duration_ms: float | None = None
    partition: int | None = None
    offset: int | None = None
    error_class: str | None = None
    error: str | None = None

    def to_dict(self, start_ms: int) -> dict[str, Any]:
        return {"agent": self.agent, "topic": self.topic, "partition": self.partition,
                "offset": self.offset, "at_ms": self.at_ms, "rel_ms": self.at_ms - start_ms,
                "outcome": self.outcome, "attempt": self.attempt, "delivery": self.delivery,
                "duration_ms": self.duration_ms, "error_class": self.error_class,
                "error": self.error}


@dataclass(frozen=True, slots=True)
class Handling:
    """Everything one agent did with one event: its attempts in time order."""

    agent: str
    attempts: tuple[Attempt, ...]

    @property
    def outcome(self) -> str:
        """The outcome of the last attempt (``ok``, ``retry``, ``dead_letter``)."""
        return self.attempts[-1].outcome

    def to_dict(self, start_ms: int) -> dict[str, Any]:
        return {"agent": self.agent, "outcome": self.outcome,
                "attempts": [a.to_dict(start_ms) for a in self.attempts]}


@dataclass(frozen=True, slots=True)
class Note:
    """Another audit event about this event id (e.g. ``dlq_replayed``)."""

    kind: str
    at_ms: int
    agent: str | None = None
    outcome: str | None = None
    details: dict[str, str] = field(default_factory=dict)

    def to_dict(self, start_ms: int) -> dict[str, Any]:
        return {"kind": self.kind, "at_ms": self.at_ms, "rel_ms": self.at_ms - start_ms,
                "agent": self.agent, "outcome": self.outcome, "details": dict(self.details)}


@dataclass(slots=True)
class TraceNode:
    """One event of the workflow, how it was handled and what it caused.

    ``producer`` is None when no ``produced`` audit exists for it (an event from a
    system that does not audit); ``topic`` and ``at_ms`` then come from its first
    consumption. ``produced`` counts its ``produced`` audits: more than one means the
    producer handled its input again (at-least-once) and re-produced the same id.
    """

    event_id: str
    topic: str | None
    producer: str | None
    at_ms: int
    causation_id: str | None
    size: int | None = None
    produced: int = 0
    cause_in_audit: bool = True
    handlings: list[Handling] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    children: list[TraceNode] = field(default_factory=list)

    def to_dict(self, start_ms: int) -> dict[str, Any]:
        return {"event_id": self.event_id, "topic": self.topic, "producer": self.producer,
                "at_ms": self.at_ms, "rel_ms": self.at_ms - start_ms, "size": self.size,
                "causation_id": self.causation_id, "cause_in_audit": self.cause_in_audit,
                "produced": self.produced,
                "consumed_by": [h.to_dict(start_ms) for h in self.handlings],
                "notes": [n.to_dict(start_ms) for n in self.notes],
                "children": [c.to_dict(start_ms) for c in self.children]}


@dataclass(slots=True)
class Trace:
    """The audit history of one correlation id as a tree of events.

    ``start_ms`` is the first audit event's time, ``end_ms`` the end of the last
    handling (or the last event); ``events`` counts the audit events used.
    """

    correlation_id: str
    roots: list[TraceNode]
    start_ms: int = 0
    end_ms: float = 0.0
    events: int = 0

    @property
    def found(self) -> bool:
        return bool(self.roots)

    @property
    def wall_ms(self) -> float:
        """From the first audit event to the end of the last handling."""
        return round(float(self.end_ms - self.start_ms), 3)

    def walk(self) -> Iterator[TraceNode]:
        """Every node, depth first, parents before children."""
        stack = list(reversed(self.roots))
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def node(self, event_id: str) -> TraceNode:
        """The node of ``event_id``; KeyError names the ids there are."""
        for node in self.walk():
            if node.event_id == event_id:
                return node
        known = ", ".join(n.event_id for n in self.walk())
        raise KeyError(f"Event {event_id!r} is not in trace {self.correlation_id!r} "
                       f"(events: {known}).")

    def counts(self) -> dict[str, int]:
        """How many events, handlings, retries, dead letters and redeliveries."""
        attempts = [a for n in self.walk() for h in n.handlings for a in h.attempts]
        return {"events": sum(1 for _ in self.walk()),
                "handlings": sum(len(n.handlings) for n in self.walk()),
                "retries": sum(a.outcome == RETRY for a in attempts),
                "dead_letters": sum(a.outcome == DEAD_LETTER for a in attempts),
                "redeliveries": sum(a.delivery == REDELIVERY for a in attempts)
                + sum(max(0, n.produced - 1) for n in self.walk())}

    def to_dict(self) -> dict[str, Any]:
        """The tree as plain data (``mesh trace --json``); times in epoch ms, ``rel_ms``
        relative to ``start_ms``."""
        return {"correlation_id": self.correlation_id, "start_ms": self.start_ms,
                "end_ms": self.end_ms, "wall_ms": self.wall_ms, "audit_events": self.events,
                **self.counts(), "roots": [r.to_dict(self.start_ms) for r in self.roots]}


# --- building the tree ------------------------------------------------------------


def build_trace(correlation_id: str, events: Iterable[AuditEvent]) -> Trace:
    """The tree of the audit events of ``correlation_id`` (others are ignored).

    Example:
        >>> build_trace("nothing", []).found
        False
    """
    flat = (one for event in events for one in expand(event))  # outputs -> produced
    mine = sorted((e for e in flat if e.correlation_id == correlation_id and e.event_id),
                  key=lambda e: (e.at_ms, e.kind != PRODUCED))
    by_id: dict[str, list[AuditEvent]] = defaultdict(list)
    for event in mine:
        assert event.event_id is not None
        by_id[event.event_id].append(event)
    nodes = {event_id: _node(event_id, history) for event_id, history in by_id.items()}
    roots: list[TraceNode] = []
    for node in nodes.values():
        parent = nodes.get(node.causation_id) if node.causation_id else None
        if parent is None or parent is node:
            node.cause_in_audit = node.causation_id is None
            roots.append(node)
        else:
            parent.children.append(node)
    roots += _cycles(nodes, roots)
    for node in nodes.values():
        node.children.sort(key=lambda n: (n.at_ms, n.event_id))
    roots.sort(key=lambda n: (n.at_ms, n.event_id))
    if not mine:
        return Trace(correlation_id, [])
    end = max(e.at_ms + (e.duration_ms or 0) for e in mine)
    return Trace(correlation_id, roots, start_ms=mine[0].at_ms, end_ms=float(end),
                 events=len(mine))


def _node(event_id: str, history: list[AuditEvent]) -> TraceNode:
    """One event id's node from its audit events (in time order)."""
    # A re-send of the same event id to a retry or dead-letter topic is not a production.
    produced = [e for e in history if e.kind == PRODUCED and not _resent(e.topic)]
    consumed = [e for e in history if e.kind == CONSUMED]
    origin = produced[0] if produced else (consumed[0] if consumed else history[0])
    topic = origin.topic if produced else _base_topic(origin.topic)
    notes = [Note(e.kind, e.at_ms, e.agent, e.outcome, dict(e.details))
             for e in history if e.kind not in (PRODUCED, CONSUMED)]
    return TraceNode(
        event_id=event_id, topic=topic, producer=origin.agent if produced else None,
        at_ms=origin.at_ms, causation_id=next(
            (e.causation_id for e in (*produced, *consumed) if e.causation_id), None),
        size=origin.size, produced=sum(e.topic == topic for e in produced),
        handlings=_handlings(consumed, replays=[n.at_ms for n in notes
                                                if n.kind == DLQ_REPLAYED]),
        notes=notes)


def _handlings(consumed: list[AuditEvent], *, replays: list[int]) -> list[Handling]:
    """Consumptions grouped by agent (in order of first consumption), each attempt
    labelled first / retry / redelivery / replay."""
    by_agent: dict[str, list[AuditEvent]] = defaultdict(list)
    for event in consumed:
        by_agent[event.agent or "?"].append(event)
    handlings = []
    for agent, events in by_agent.items():
        events.sort(key=lambda e: (e.at_ms, e.attempt or 1))
        attempts: list[Attempt] = []
        seen: set[int] = set()
        last_at = None
        for event in events:
            number = event.attempt or 1
            replayed = last_at is not None and any(last_at <= r <= event.at_ms
                                                   for r in replays)
            if replayed:
                delivery, seen = REPLAY, set()
            elif number in seen:
                delivery = REDELIVERY
            else:
                delivery = RETRIED if number > 1 else FIRST
            seen.add(number)
            last_at = event.at_ms
            attempts.append(Attempt(
                agent=agent, topic=event.topic, at_ms=event.at_ms,
                outcome=event.outcome or "?", attempt=number, delivery=delivery,
                duration_ms=event.duration_ms, partition=event.partition,
                offset=event.offset, error_class=event.error_class, error=event.error))
        handlings.append(Handling(agent, tuple(attempts)))
    return handlings


def _cycles(nodes: dict[str, TraceNode], roots: list[TraceNode]) -> list[TraceNode]:
    """Nodes unreachable from the roots (causes forming a cycle, which a correct mesh
    never writes): each cycle is cut at its earliest node, which becomes a root."""
    reached = {n.event_id for n in Trace("", roots).walk()}
    extra: list[TraceNode] = []
    for node in sorted(nodes.values(), key=lambda n: (n.at_ms, n.event_id)):
        if node.event_id in reached:
            continue
        parent = nodes[node.causation_id] if node.causation_id else None
        if parent is not None:
            parent.children.remove(node)
        node.cause_in_audit = False
        extra.append(node)
        reached |= {n.event_id for n in Trace("", [node]).walk()}
    return extra


def _resent(topic: str | None) -> bool:
    return topic is not None and (topic != _base_topic(topic) or topic.endswith(DLQ_SUFFIX))


def _base_topic(topic: str | None) -> str | None:
    """``orders`` for ``orders.retry.2``: the topic an event was first sent to."""
    match = _RETRY_TOPIC.match(topic or "")
    return match.group(1) if match else topic


# --- reading the audit topic ------------------------------------------------------


async def read_trace(settings: KafkaSettings, correlation_id: str, *,
                     codec: Codec | None = None, timeout: float = 60.0,
                     all_partitions: bool = False) -> Trace:
    """The trace of ``correlation_id`` from ``mesh.audit``, read to its end as of now.

    Reads only the partition the correlation id's key maps to, keeping the records
    keyed by it (others are skipped before they are decoded, and nothing else is held
    in memory): the events audited under that key (see the module docstring for the
    one kind that is not). With ``all_partitions`` every record of every partition is
    decoded and kept when it, or one of the outputs it lists, has ``correlation_id``:
    complete, but as slow as the topic is long. A record that does not decode is
    logged and skipped.

    Example:
        >>> trace = await read_trace(settings.kafka, "c1")  # doctest: +SKIP
        >>> trace.found, trace.wall_ms  # doctest: +SKIP
        (True, 212.5)
    """
    codec = codec or Codec()
    key = correlation_id.encode()
    reader = (TopicReader(settings, [audit_topic.name]) if all_partitions
              else TopicReader.for_key(settings, [audit_topic.name], key))
    events: list[AuditEvent] = []
    async with reader:
        async for record in reader.iter_to_end(timeout=timeout):
            if record.key != key and not all_partitions:
                continue
            event = await _decode(codec, record)
            if event is not None and (record.key == key or _mentions(event, correlation_id)):
                events.append(event)
    return build_trace(correlation_id, events)


async def _decode(codec: Codec, record: Record) -> AuditEvent | None:
    try:
        event = await codec.decode(audit_topic, record.value or b"")
    except MeshError as exc:
        logger.warning("skipping %s[%d]@%d: not an audit event: %s", record.topic,
                       record.partition, record.offset, exc)
        return None
    return event if isinstance(event, AuditEvent) else None


def _mentions(event: AuditEvent, correlation_id: str) -> bool:
    """Whether ``event`` or an output it lists belongs to ``correlation_id``."""
    return event.correlation_id == correlation_id or any(
        out.correlation_id == correlation_id for out in event.outputs)


# --- rendering --------------------------------------------------------------------
