"""Declared policies: how an agent retries its failures.

:class:`RetryPolicy` is what a user writes in an agent's declaration (``Agent(retry=)``);
the mechanics of retrying (retry records, their headers, when one is due) live in
:mod:`mesh.runtime.retry`. The policy also names the retry topics an agent consumes,
``<topic>.retry.<n>``, since they are declared with the agent's other topics.

Example:
    >>> policy = RetryPolicy(attempts=4, base_ms=200, factor=3.0)
    >>> [policy.delay_ms(n) for n in (1, 2, 3)]
    [200, 600, 1800]
    >>> from pydantic import BaseModel
    >>> [t.name for t in policy.topics_for(Topic("shop.orders", BaseModel))]
    ['shop.orders.retry.1', 'shop.orders.retry.2', 'shop.orders.retry.3']
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh.errors import ConfigError, InputError, is_retriable
from mesh.topic import Topic


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
    """The name of tier ``tier`` of topic ``name``'s retry topics."""
    return f"{name}.retry.{tier}"
