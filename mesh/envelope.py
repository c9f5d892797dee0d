"""Event metadata carried in Kafka headers, and the typed ``Envelope[Model]``.

Every mesh event has these headers (UTF-8 values):

==================== =====================================================
``mesh-event-id``     unique id; an agent's outputs get ids derived from
                      (agent, input event id, output index), so a replay
                      after a crash yields the same ids and sinks dedup
``mesh-correlation``  the workflow this event belongs to
``mesh-causation``    the id of the event that caused this one
``traceparent``       W3C trace context (``00-<trace>-<span>-01``)
``mesh-source``       the agent (or ``emit``/system) that produced it
``mesh-attempt``      delivery attempt, 1-based
``mesh-schema``       CRC-64-AVRO fingerprint of the writer schema (hex)
``mesh-produced-at``  production time, epoch milliseconds
``tracestate``        W3C vendor trace state, carried with ``traceparent``
==================== =====================================================

Records produced by other Kafka clients may omit any of them: a missing event id is
derived from (topic, partition, offset), so it is stable across redeliveries; a missing
correlation id is the event id. Every header is optional: one that is present but
malformed (not UTF-8, not a number, a traceparent that is not W3C trace context) is
ignored and replaced as if it were missing, and reported to the caller (the runtime
logs it once per topic and header and counts it); only the value can send a record to
the dead-letter topic. As W3C Trace Context says, an invalid ``traceparent`` starts a
new trace and drops its ``tracestate``.

Headers the mesh does not own (any name not starting with ``mesh-``, other than
``traceparent``/``tracestate``: a tenant id, a producer's own tags) are kept in
:attr:`Envelope.extra_headers`; an agent's outputs carry its input's (see
``Agent(propagate_headers=...)``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from mesh.errors import HeaderInvalid

ExtraHeaders = tuple[tuple[str, bytes], ...]

EVENT_ID = "mesh-event-id"
CORRELATION_ID = "mesh-correlation"
CAUSATION_ID = "mesh-causation"
TRACEPARENT = "traceparent"
SOURCE = "mesh-source"
ATTEMPT = "mesh-attempt"
SCHEMA = "mesh-schema"
PRODUCED_AT = "mesh-produced-at"
TRACESTATE = "tracestate"
MESH_PREFIX = "mesh-"

MESH_HEADERS = (EVENT_ID, CORRELATION_ID, CAUSATION_ID, TRACEPARENT, SOURCE, ATTEMPT, SCHEMA,
                PRODUCED_AT)

Headers = Sequence[tuple[str, bytes]]
P = TypeVar("P")

_NAMESPACE = uuid.UUID("5b0c7f4e-7d1a-4c39-9a52-6f1f3c2d8e10")
_TRACEPARENT = re.compile(r"^00-(?!0{32})([0-9a-f]{32})-(?!0{16})([0-9a-f]{16})-([0-9a-f]{2})$")


def derive_event_id(agent: str, input_event_id: str, index: int) -> str:
    """The id of output number ``index`` that ``agent`` produced from ``input_event_id``.

    Deterministic, so re-processing the same input after a crash yields the same ids.

    Example:
        >>> derive_event_id("writer", "e1", 0) == derive_event_id("writer", "e1", 0)
        True
    """
    return _uuid5(f"{agent}\x00{input_event_id}\x00{index}")


def record_event_id(topic: str, partition: int, offset: int) -> str:
    """The id of a record that came without one: stable for that record's position."""
    return _uuid5(f"record\x00{topic}\x00{partition}\x00{offset}")


_NAMESPACE_BYTES = _NAMESPACE.bytes


def _uuid5(name: str) -> str:
    """``str(uuid.uuid5(_NAMESPACE, name))`` without building a ``UUID`` (a quarter of
    its cost; this runs for every output): SHA-1 of namespace and name, its first 16
    bytes with the version (5) and the RFC 4122 variant set, as 8-4-4-4-12 hex."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode()).digest()[:16])
    digest[6] = digest[6] & 0x0F | 0x50
    digest[8] = digest[8] & 0x3F | 0x80
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds (the unit of ``mesh-produced-at``)."""
    return int(time.time() * 1000)


def new_event_id() -> str:
    """A fresh random event id, for events entering the mesh."""
    return str(uuid.uuid4())


def new_traceparent() -> str:
    """A new W3C trace context, sampled."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def child_traceparent(parent: str, event_id: str) -> str:
    """The trace context of an event caused by one with ``parent``: same trace, a span
    id derived from ``event_id`` (so a replay keeps its span ids too)."""
    if not is_traceparent(parent):
        return new_traceparent()
    span = hashlib.blake2b(event_id.encode(), digest_size=8).hexdigest()
    return f"00-{parent[3:35]}-{span}-{parent[53:55]}"  # the trace id and the flags


_valid = [""]  # the traceparent last found valid (a one-entry cache, by identity)


def is_traceparent(value: str) -> bool:
    """Whether ``value`` is W3C trace context (version 00, non-zero ids).

    The last valid one is remembered by identity: an input's traceparent, checked when
    its headers are read, is the parent of each of its outputs.

    Example:
        >>> is_traceparent("00-" + "a" * 32 + "-" + "b" * 16 + "-01"), is_traceparent("x")
        (True, False)
    """
    if value is _valid[0]:
        return True
    if _TRACEPARENT.match(value) is None:
        return False
    _valid[0] = value
    return True


@dataclass(frozen=True, slots=True)
class Envelope(Generic[P]):
    """A payload with its event metadata and, once consumed, its position.

    Example:
        >>> env = Envelope.new("hello", source="emit")
        >>> env.correlation_id == env.event_id
        True
    """

    payload: P
    event_id: str
    correlation_id: str
    causation_id: str | None = None
    traceparent: str = field(default_factory=new_traceparent)
    source: str = "unknown"
    attempt: int = 1
    schema: str | None = None
    produced_at_ms: int = field(default_factory=now_ms)
    key: bytes | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    tracestate: str | None = None
    extra_headers: ExtraHeaders = ()

    def __post_init__(self) -> None:
        if not self.event_id or not self.correlation_id:
            raise HeaderInvalid("An event needs a non-empty event id and correlation id.")
        if self.attempt < 1:
            raise HeaderInvalid(f"Attempt {self.attempt} is not valid: attempts count from 1.")

    @classmethod
    def new(cls, payload: P, *, source: str, correlation_id: str | None = None,
            key: bytes | None = None) -> Envelope[P]:
        """An event entering the mesh (from ``mesh emit`` or an existing system)."""
        event_id = new_event_id()
        return cls(payload, event_id, correlation_id or event_id, source=source, key=key)

    def child(self, payload: P, *, agent: str, index: int, key: bytes | None,
              extra_headers: ExtraHeaders = (), schema: str | None = None,
              correlation_id: str | None = None, causation_id: str | None = None,
              traceparent: str | None = None, other_trace: str | None = None,
              other_state: str | None = None) -> Envelope[P]:
        """Output number ``index`` that ``agent`` produced from this event: same
        correlation and trace (with its ``tracestate``), carrying ``extra_headers``.

        ``correlation_id``/``causation_id`` name others than this event's; ``traceparent``
        is the output's own (a handler's span); ``other_trace`` continues another trace
        than this event's, with ``other_state`` as its ``tracestate`` (this event's is
        not carried). Built in one go: this runs for every output.
        """
        event_id = derive_event_id(agent, self.event_id, index)
        state = self.tracestate
        if other_trace is not None:
            traceparent, state = child_traceparent(other_trace, event_id), other_state
        elif traceparent is None:
            traceparent = child_traceparent(self.traceparent, event_id)
        return Envelope(payload, event_id, correlation_id or self.correlation_id,
                        causation_id=causation_id or self.event_id, traceparent=traceparent,
                        source=agent, schema=schema, key=key, tracestate=state,
                        extra_headers=extra_headers)

    def with_payload(self, payload: P, schema: str | None = None) -> Envelope[P]:
        """The same metadata around another payload (used by the decoder, for every
        input: built directly, ``dataclasses.replace`` costs three times as much)."""
        return Envelope(payload, self.event_id, self.correlation_id, self.causation_id,
                        self.traceparent, self.source, self.attempt, schema or self.schema,
                        self.produced_at_ms, self.key, self.topic, self.partition,
                        self.offset, self.tracestate, self.extra_headers)

    def headers(self) -> list[tuple[str, bytes]]:
        """The Kafka headers for this event (in the order of :data:`MESH_HEADERS`, then
        ``tracestate``, then the extra headers)."""
        found = [(EVENT_ID, self.event_id.encode()),
                 (CORRELATION_ID, self.correlation_id.encode())]
        if self.causation_id is not None:
            found.append((CAUSATION_ID, self.causation_id.encode()))
        found.append((TRACEPARENT, self.traceparent.encode()))
        found.append((SOURCE, self.source.encode()))
        found.append((ATTEMPT, _SMALL_INTS[self.attempt] if self.attempt < 10
                      else str(self.attempt).encode()))
        if self.schema is not None:
            found.append((SCHEMA, self.schema.encode()))
        found.append((PRODUCED_AT, str(self.produced_at_ms).encode()))
        if self.tracestate is not None:
            found.append((TRACESTATE, self.tracestate.encode()))
        found.extend(self.extra_headers)
        return found


_SMALL_INTS = [str(n).encode() for n in range(10)]


def read_headers(headers: Headers, *, topic: str, partition: int, offset: int,
                 key: bytes | None = None, problems: list[str] | None = None,
                 payload: P | None = None) -> Envelope[P | None]:
    """The metadata of a consumed record, around ``payload`` when given (the decoder
    passes the decoded value: one envelope per input, not two). Never raises for a
    header: a malformed one is replaced as if missing and described in ``problems``
    (when given)."""
    values: dict[str, str] = {}
    extra: list[tuple[str, bytes]] = []
    bad: list[str] = [] if problems is None else problems
    for name, raw in headers:
        if name in _OWN or name.startswith(MESH_PREFIX):
            try:
                values[name] = (raw if type(raw) is bytes else bytes(raw)).decode()
            except (UnicodeDecodeError, TypeError):
                bad.append(f"{name}: not UTF-8 text")
        else:
            extra.append((name, bytes(raw)))
    event_id = values.get(EVENT_ID) or record_event_id(topic, partition, offset)
    trace, state = values.get(TRACEPARENT), values.get(TRACESTATE)
    if trace is not None and not is_traceparent(trace):
        bad.append(f"traceparent: {trace[:80]!r} is not W3C trace context "
                   "(00-<32 hex>-<16 hex>-<2 hex>); a new trace was started")
        trace = state = None
    attempt = _int_header(values, ATTEMPT, 1, bad)
    if attempt < 1:
        bad.append(f"{ATTEMPT}: {attempt} is not a delivery attempt (they count from 1)")
        attempt = 1
    return Envelope(
        payload, event_id, values.get(CORRELATION_ID) or event_id,
        values.get(CAUSATION_ID) or None, trace or new_traceparent(),
        values.get(SOURCE) or "external", attempt, values.get(SCHEMA) or None,
        _int_header(values, PRODUCED_AT, now_ms(), bad), key, topic, partition, offset,
        state, tuple(extra))


_OWN = frozenset((*MESH_HEADERS, TRACESTATE))


def _int_header(values: dict[str, str], name: str, default: int, problems: list[str]) -> int:
    raw = values.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        problems.append(f"{name}: {raw[:40]!r} is not an integer")
        return default
