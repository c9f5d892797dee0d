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

Example:
    >>> policy = RetryPolicy(attempts=4, base_ms=200, factor=3.0)
    >>> [policy.delay_ms(n) for n in (1, 2, 3)]
    [200, 600, 1800]
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh.envelope import ATTEMPT, now_ms
from mesh.errors import ConfigError, InputError, is_retriable
from mesh.topic import Topic
from mesh.kafka.transport import OutRecord, Record

RETRY_DUE = "mesh-retry-due"
RETRY_GROUP = "mesh-retry-group"
RETRY_ORIGIN = "mesh-retry-origin"
FIRST_FAILURE = "mesh-first-failure"
LAST_FAILURE = "mesh-last-failure"
RETRY_ERROR = "mesh-retry-error"
RETRY_HEADERS = (RETRY_DUE, RETRY_GROUP, RETRY_ORIGIN, FIRST_FAILURE, LAST_FAILURE,
                 RETRY_ERROR, ATTEMPT)
_RETRY_TOPIC = re.compile(r"^(.*)\.retry\.(\d+)$")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How an agent retries retriable failures.

    Args:
        attempts: total attempts, the first included (1 = no retry).
        base_ms: delay after the first failure; then times ``factor`` per attempt.
        max_ms: the longest delay.
        jitter: +/- this fraction of each delay, at random (spreads retry storms).
        blocking: retry in place, holding the partition (keeps per-key order).
        retry_on: which failures are retried: exception classes, or a predicate. The
            default (None) retries every exception except those that cannot succeed
            on another attempt: the :class:`~mesh.errors.InputError` family (decode,
            validation, signature, size) and errors that say ``retriable=False``
            (:func:`mesh.errors.is_retriable`). An ``InputError`` is never retried,
            whatever ``retry_on`` says.

    Example:
        >>> RetryPolicy(retry_on=(TimeoutError,)).retries(ValueError("bug"))
        False
        >>> RetryPolicy().retries(ValueError("flaky"))
        True
    """

    attempts: int = 3
    base_ms: int = 500
    factor: float = 2.0
    max_ms: int = 60_000
    jitter: float = 0.0
    blocking: bool = False
    retry_on: tuple[type[BaseException], ...] | Callable[[BaseException], bool] | None = None

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_ms < 0 or self.factor < 1 or self.max_ms < 0:
            raise ConfigError(f"{self!r}: attempts >= 1, base_ms >= 0, factor >= 1 and "
                              "max_ms >= 0 are required.")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"RetryPolicy jitter {self.jitter} must be in [0, 1).")

    def retries(self, error: BaseException) -> bool:
        """Whether a failure with ``error`` is retried (attempts left aside)."""
        if isinstance(error, InputError):
            return False
        if self.retry_on is None:
            return is_retriable(error)
        if isinstance(self.retry_on, tuple):
            return isinstance(error, self.retry_on)
        return bool(self.retry_on(error))

    def delay_ms(self, failed_attempt: int) -> int:
        """The wait after attempt ``failed_attempt`` (1-based) failed."""
        delay = min(self.max_ms, self.base_ms * self.factor ** (failed_attempt - 1))
        if self.jitter:
            delay *= 1 + random.uniform(-self.jitter, self.jitter)
        return int(delay)

    def topics_for(self, topic: Topic[Any]) -> list[Topic[Any]]:
        """The retry tiers of ``topic`` (none when blocking or without retries)."""
        if self.blocking:
            return []
        return [Topic(retry_topic(topic.name, n), topic.model, key=topic.key,
                      partitions=topic.partitions, replication=topic.replication,
                      dead_letters=False)
                for n in range(1, self.attempts)]


def retry_topic(name: str, tier: int) -> str:
    return f"{name}.retry.{tier}"


def origin_of(topic_name: str) -> str:
    """The topic a retry topic retries (itself for any other topic)."""
    match = _RETRY_TOPIC.match(topic_name)
    return match.group(1) if match else topic_name


def is_retry_topic(topic_name: str) -> bool:
    return _RETRY_TOPIC.match(topic_name) is not None


def headers_of(record: Record) -> dict[str, str]:
    return {k: v.decode(errors="replace") for k, v in record.headers}


def due_ms(record: Record) -> int:
    """When a retry record may be handled (0 for any other record)."""
    return int(headers_of(record).get(RETRY_DUE, "0") or 0)


def is_for(record: Record, group: str) -> bool:
    """Whether a retry record belongs to ``group`` (other records: always)."""
    found = headers_of(record).get(RETRY_GROUP)
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
