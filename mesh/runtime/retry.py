"""Non-blocking retries through retry topics (Uber's tiered retry topics).

A retriable failure does not stall the partition: the input is produced to
``<topic>.retry.<n>`` (tier ``n`` = the attempt that failed) with the attempt count, the
time it is due, the consumer group it is for and its first and last failure times in
headers; the original offset is then committed. The agent also consumes its retry
topics: a retry record waits in its own partition's lane until it is due (only that
retry partition waits; the main topic flows on), then goes to the handler again. After
the last attempt the input goes to ``<topic>.dlq`` with those headers.

Several agents (groups) may consume one topic: a retry record names its group and the
others skip it, so each group retries only its own failures.

A kill -9 while retries are pending loses none (they are records in Kafka, their
offsets uncommitted until handled) and redelivers none before its time (the due time
travels in the header).

Ordering-sensitive agents choose ``RetryPolicy(blocking=True)``: in-place retries
with backoff that hold the partition (and its order) until the input succeeds or fails
for good.

The policy (how many attempts, which delays) is declared with the agent:
:class:`mesh.policy.RetryPolicy`.

Example:
    >>> record = Record("shop.orders", 2, 41, b"k", b"...", (), 0)
    >>> retry_record(record, TimeoutError("slow"), policy=RetryPolicy(),
    ...              attempt=1, group="billing").topic
    'shop.orders.retry.1'
"""

from __future__ import annotations

import re

from mesh.envelope import ATTEMPT, now_ms
from mesh.kafka.base import OutRecord, Record
from mesh.policy import RetryPolicy, retry_topic

RETRY_DUE = "mesh-retry-due"
RETRY_GROUP = "mesh-retry-group"
RETRY_ORIGIN = "mesh-retry-origin"
FIRST_FAILURE = "mesh-first-failure"
LAST_FAILURE = "mesh-last-failure"
RETRY_ERROR = "mesh-retry-error"
RETRY_HEADERS = (RETRY_DUE, RETRY_GROUP, RETRY_ORIGIN, FIRST_FAILURE, LAST_FAILURE,
                 RETRY_ERROR, ATTEMPT)
_RETRY_TOPIC = re.compile(r"^(.*)\.retry\.(\d+)$")


def origin_of(topic_name: str) -> str:
    """The topic a retry topic retries (itself for any other topic)."""
    match = _RETRY_TOPIC.match(topic_name)
    return match.group(1) if match else topic_name


def is_retry_topic(topic_name: str) -> bool:
    return _RETRY_TOPIC.match(topic_name) is not None


def headers_of(record: Record) -> dict[str, str]:
    return {k: v.decode(errors="replace") for k, v in record.headers}


def _header(record: Record, name: str) -> str | None:
    """The last value of header ``name`` (as :func:`headers_of` would give it), without
    decoding the others: the lanes ask this of every record they take."""
    found = None
    for key, value in record.headers:
        if key == name:
            found = value
    return None if found is None else found.decode(errors="replace")


def due_ms(record: Record) -> int:
    """When a retry record may be handled (0 for any other record)."""
    return int(_header(record, RETRY_DUE) or 0)


def is_for(record: Record, group: str) -> bool:
    """Whether a retry record belongs to ``group`` (other records: always)."""
    found = _header(record, RETRY_GROUP)
    return found is None or found == group


def retry_record(record: Record, error: BaseException, *, policy: RetryPolicy,
                 attempt: int, group: str) -> OutRecord:
    """The record that schedules attempt ``attempt + 1`` of ``record``."""
    now = now_ms()
    old = headers_of(record)
    extra = {
        ATTEMPT: str(attempt + 1), RETRY_DUE: str(now + policy.delay_ms(attempt)),
        RETRY_GROUP: group, FIRST_FAILURE: old.get(FIRST_FAILURE, str(now)),
        LAST_FAILURE: str(now), RETRY_ERROR: f"{type(error).__name__}: {error}"[:2000],
        RETRY_ORIGIN: old.get(RETRY_ORIGIN, f"{record.topic}[{record.partition}]@{record.offset}"),
    }
    kept = tuple((k, v) for k, v in record.headers if k not in extra)
    headers = kept + tuple((k, v.encode()) for k, v in extra.items())
    target = retry_topic(origin_of(record.topic), min(attempt, policy.attempts - 1))
    # The same partition number as the input (tiers have the origin's partition count):
    # under the range assignor the member owning partition p of the origin owns p of
    # every tier too, so keyed state (gather, coordinator) stays with its owner.
    return OutRecord(target, record.value, record.key, headers, partition=record.partition)
