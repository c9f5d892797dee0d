"""Circuit breakers whose state lives in a compacted topic, shared by every replica.

A breaker guards one downstream (an LLM API, a search tool). It is *closed* (calls go
through), *open* (calls fail fast with :class:`~mesh.errors.BreakerOpen`, which makes
the runtime keep the input, pause the agent's partitions and hand the input back at
``opened_at + reset_timeout``: nothing is retried or dead-lettered) or *half-open*
(a bounded number of probe calls go through; a probe that fails reopens it, one that
succeeds closes it).

Shared state: transitions (closed -> open -> half-open -> closed) are written to a
compacted topic keyed by breaker name, by a producer the breaker owns (not with the
handler's outputs: an opening happens on a *failed* call, whose outputs are never
sent). Every instance follows the topic, so replicas of every agent guarding the same
downstream agree, and a restarted replica starts with the topic's state. Writes carry a
version (the previous one + 1); an instance applies a record only if its version is
higher than the one it holds, or equal and more open (open > half-open > closed), so
replays and stale writes are ignored and an opening wins over a concurrent close.
Failure *counting* (consecutive failures, the sliding window) and the probe budget are
per instance: a cluster-wide probe bound is ``replicas x half_open_probes``.

Each transition is also sent to the breaker events topic (``opened``, ``half_open``,
``closed``) for taps and dashboards; :attr:`CircuitBreaker.transitions` counts them.

Example:
    >>> topics = breaker_topics("shop")
    >>> breaker = CircuitBreaker("search-api", BreakerPolicy(failure_threshold=3),
    ...                          settings=settings, topics=topics)  # doctest: +SKIP
    >>> async with breaker:  # doctest: +SKIP
    ...     async with breaker.guard(correlation_id=ctx.correlation_id):
    ...         answer = await call_search(query)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

from mesh.codec import Codec
from mesh.config import MeshSettings
from mesh.errors import BreakerOpen, ConfigError, is_retriable
from mesh.provision import apply_topics
from mesh.state import CompactedTable
from mesh.topic import Topic
from mesh.transport import OutRecord, Producer

logger = logging.getLogger(__name__)

T = TypeVar("T")
State = Literal["closed", "open", "half_open"]
_RANK = {"closed": 0, "half_open": 1, "open": 2}
_EVENT = {"open": "opened", "half_open": "half_open", "closed": "closed"}


class BreakerRecord(BaseModel):
    """The shared state of one breaker (the value of the compacted breaker topic)."""

    name: str
    state: State = "closed"
    version: int = 0
    opened_at: float | None = None  # epoch seconds of the last opening
    failures: int = 0  # the failures that tripped it (for humans)
    probes: int = 0  # the probe budget of a half-open period
    updated_by: str = ""
    updated_at: float = 0.0
    reason: str = ""


class BreakerTransition(BaseModel):
    """A transition event on the breaker events topic, for taps."""

    name: str
    transition: Literal["opened", "half_open", "closed"]
    version: int
    at: float
    by: str
    reason: str = ""
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class BreakerTopics:
    """The compacted state topic and the events topic of a set of breakers."""

    state: Topic[BreakerRecord]
    events: Topic[BreakerTransition]


def breaker_topics(prefix: str) -> BreakerTopics:
    """The breaker topics ``<prefix>.breakers`` (compacted) and ``<prefix>.breaker-events``.

    Example:
        >>> breaker_topics("shop").state.name
        'shop.breakers'
    """
    return BreakerTopics(
        Topic(f"{prefix}.breakers", BreakerRecord, key="name", partitions=1, compacted=True),
        Topic(f"{prefix}.breaker-events", BreakerTransition, key="name", partitions=1))


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a breaker opens and how it recovers.

    It opens after ``failure_threshold`` consecutive failures, or (with
    ``failure_rate``) when at least ``min_calls`` of the last ``window`` calls were made
    and that share of them failed. After ``reset_timeout`` seconds it lets
    ``half_open_probes`` probe calls through. ``is_failure`` says which exceptions
    count (default: retriable ones; other errors mean the downstream answered).

    Example:
        >>> BreakerPolicy(failure_threshold=3, reset_timeout=10).half_open_probes
        1
    """

    failure_threshold: int = 5
    failure_rate: float | None = None
    window: int = 20
    min_calls: int = 10
    reset_timeout: float = 30.0
    half_open_probes: int = 1
    is_failure: Callable[[BaseException], bool] = is_retriable

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.half_open_probes < 1 or self.reset_timeout <= 0:
            raise ConfigError(
                f"BreakerPolicy(failure_threshold={self.failure_threshold}, half_open_probes="
                f"{self.half_open_probes}, reset_timeout={self.reset_timeout}): thresholds "
                "must be >= 1 and the reset timeout > 0. Fix the policy.")
        if self.failure_rate is not None and not (
                0 < self.failure_rate <= 1 and 1 <= self.min_calls <= self.window):
            raise ConfigError(
                f"BreakerPolicy(failure_rate={self.failure_rate}, min_calls={self.min_calls}, "
                f"window={self.window}): the rate must be in (0, 1] and 1 <= min_calls <= "
                "window. Fix the policy.")


class CircuitBreaker:
    """A circuit breaker guarding one downstream; see the module docstring.

    Without ``settings`` it is local to this process (unit tests, scripts). With them it
    owns a producer and a follower of ``topics.state``; ``start()``/``stop()`` (or
    ``async with``) are safe to call twice. With ``hold_on_trip`` (the default) the
    failure that opens it (or a failed probe) is raised as ``BreakerOpen`` chained to
    the original error, so inside a handler that input is held like the ones after it
    instead of being retried to the dead-letter topic; other failures are re-raised.

    Example:
        >>> async with CircuitBreaker("llm", settings=settings, topics=topics) as b:  # doctest: +SKIP
        ...     reply = await b.call(client.complete, prompt)
    """

    def __init__(self, name: str, policy: BreakerPolicy | None = None, *,
                 settings: MeshSettings | None = None, topics: BreakerTopics | None = None,
                 replica: str | None = None, hold_on_trip: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        if settings is not None and topics is None:
            raise ConfigError(f"Breaker {name!r} has settings but no topics: pass "
                              "topics=breaker_topics(prefix) so its state can be shared.")
        self.name = name
        self.hold_on_trip = hold_on_trip
        self.policy = policy or BreakerPolicy()
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self.record = BreakerRecord(name=name)
        self.transitions: Counter[str] = Counter()  # opened / half_open / closed seen
        self.rejected = 0  # calls refused with BreakerOpen
        self._settings, self._topics, self._clock = settings, topics, clock
        self._outcomes: deque[bool] = deque(maxlen=self.policy.window)  # True = failed
        self._consecutive = 0
        self._probes = 0  # probes admitted in the current half-open period
        self._lock = asyncio.Lock()
        self._producer: Producer | None = None
        self._codec = Codec()
        self._table: CompactedTable[BreakerRecord] | None = None
        self._follower: asyncio.Task[None] | None = None

    @property
    def state(self) -> State:
        """``closed``, ``open`` or ``half_open`` as this instance knows it."""
        return self.record.state

    async def __aenter__(self) -> CircuitBreaker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Create the topics if missing, restore the state, follow it, open the producer."""
        if self._settings is None or self._producer is not None:
            return
        assert self._topics is not None
        topics = [self._topics.state, self._topics.events]
        await apply_topics(self._settings.kafka, topics)
        codec = self._codec = Codec(self._settings.schema_registry)
        await codec.prepare(topics)
        self._table = CompactedTable(self._topics.state, self._settings.kafka, codec)
        self._table.on_change(self._on_change)
        self._producer = Producer(self._settings.kafka)
        await self._producer.start()
        await self._table.restore()
        # Replays the topic once more (applying nothing older): no gap between the two.
        self._follower = asyncio.create_task(self._table.follow(), name=f"breaker:{self.name}")
        logger.info("breaker %s started: %s v%d", self.name, self.state, self.record.version)

    async def stop(self) -> None:
        """Stop following and close the producer."""
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    def _on_change(self, key: str, value: BreakerRecord | None) -> None:
        if key == self.name and value is not None:
            self.observe(value)

    def observe(self, incoming: BreakerRecord) -> bool:
        """Apply a record written by any instance if it is newer; returns whether it was.

        Newer: a higher version, or the same version and more open (open > half-open >
        closed), so an opening wins over a concurrent close and replays change nothing.
        """
        mine = self.record
        if incoming.name != self.name or (incoming.version, _RANK[incoming.state]) <= (
                mine.version, _RANK[mine.state]):
            return False
        self.record = incoming
        if incoming.state != mine.state:
            self.transitions[_EVENT[incoming.state]] += 1
            self._probes = 0
            if incoming.state == "closed":
                self._outcomes.clear()
                self._consecutive = 0
            logger.info("breaker %s %s (v%d by %s)", self.name, _EVENT[incoming.state],
                        incoming.version, incoming.updated_by)
        return True

    @contextlib.asynccontextmanager
    async def guard(self, *, correlation_id: str | None = None) -> AsyncIterator[None]:
        """Run the body through the breaker: raises ``BreakerOpen`` when it is open (or
        the half-open probes are taken); records the body's success or failure."""
        probe = await self._admit(correlation_id)
        try:
            yield
        except BaseException as exc:
            if await self._settle(probe, exc, correlation_id) and self.hold_on_trip:
                until = (self.record.opened_at or self._clock()) + self.policy.reset_timeout
                raise BreakerOpen(f"Breaker {self.name!r} opened on this call ({exc!r}); "
                                  f"calls resume at {until:.1f}.", until=until) from exc
            raise
        await self._settle(probe, None, correlation_id)

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any,
                   correlation_id: str | None = None, **kwargs: Any) -> T:
        """``await fn(*args, **kwargs)`` through the breaker (see :meth:`guard`)."""
        async with self.guard(correlation_id=correlation_id):
            return await fn(*args, **kwargs)

    async def _admit(self, correlation_id: str | None) -> bool:
        async with self._lock:
            now, record = self._clock(), self.record
            if record.state == "open":
                until = (record.opened_at or now) + self.policy.reset_timeout
                if now < until:
                    self.rejected += 1
                    raise BreakerOpen(f"Breaker {self.name!r} is open since "
                                      f"{record.opened_at or now:.1f} ({record.reason}); calls resume "
                                      f"at {until:.1f}.", until=until)
                await self._write("half_open", "reset timeout elapsed", correlation_id)
            if self.record.state == "half_open":
                if self._probes >= self.policy.half_open_probes:
                    self.rejected += 1
                    until = now + min(1.0, self.policy.reset_timeout)
                    raise BreakerOpen(f"Breaker {self.name!r} is half-open and its "
                                      f"{self.policy.half_open_probes} probe(s) are taken; "
                                      "try again shortly.", until=until)
                self._probes += 1
                return True
            return False

    async def _settle(self, probe: bool, error: BaseException | None,
                      correlation_id: str | None) -> bool:
        """Record an outcome; returns whether this failure opened the breaker."""
        if isinstance(error, BreakerOpen | asyncio.CancelledError):
            return False  # not an answer from the downstream
        failed = error is not None and self.policy.is_failure(error)
        async with self._lock:
            if probe:
                if self.record.state == "half_open":
                    if failed:
                        await self._write("open", f"probe failed: {error!r}", correlation_id)
                        return True
                    await self._write("closed", "probe succeeded", correlation_id)
                return False
            if self.record.state != "closed":
                return False  # a call that started before another one opened the breaker
            self._outcomes.append(failed)
            self._consecutive = self._consecutive + 1 if failed else 0
            reason = self._trip_reason(error)
            if reason:
                await self._write("open", reason, correlation_id)
            return bool(reason)

    def _trip_reason(self, error: BaseException | None) -> str:
        policy = self.policy
        if self._consecutive >= policy.failure_threshold:
            return f"{self._consecutive} consecutive failures, last {error!r}"
        calls, failures = len(self._outcomes), sum(self._outcomes)
        if (policy.failure_rate is not None and calls >= policy.min_calls
                and failures / calls >= policy.failure_rate):
            return f"{failures} of the last {calls} calls failed, last {error!r}"
        return ""

    async def _write(self, state: State, reason: str, correlation_id: str | None) -> None:
        """Apply a transition locally, then persist it and its event (acknowledged)."""
        now = self._clock()
        record = self.record.model_copy(update={
            "state": state, "version": self.record.version + 1, "updated_by": self.replica,
            "updated_at": now, "reason": reason,
            "opened_at": now if state == "open" else self.record.opened_at,
            "failures": self._consecutive if state == "open" else self.record.failures,
            "probes": self.policy.half_open_probes if state == "half_open" else 0})
        self.observe(record)
        if self._producer is None or self._table is None or self._topics is None:
            return
        event = BreakerTransition(name=self.name, transition=_EVENT[state],
                                  version=record.version, at=now, by=self.replica,
                                  reason=reason, correlation_id=correlation_id)
        value, fingerprint = self._codec.encode(self._topics.events, event)
        await self._producer.send_all([
            self._table.record_of(self.name, record),
            OutRecord(self._topics.events.name, value, self.name.encode(),
                      (("mesh-schema", fingerprint.encode()),))])


class BreakerRegistry:
    """The breakers of one process, created and started lazily on first use.

    Declare one at module level in the agent's module; a handler asks it for a started
    breaker (the agent's settings come from ``ctx.runner``). ``stop()`` closes them all.

    Example:
        >>> breakers = BreakerRegistry(breaker_topics("shop"))
        >>> async def handle(item, ctx):  # doctest: +SKIP
        ...     search = await breakers.get("search", ctx.runner.settings, policy)
        ...     async with search.guard(correlation_id=ctx.correlation_id):
        ...         return await call_search(item)
    """

    def __init__(self, topics: BreakerTopics) -> None:
        self.topics = topics
        self.breakers: dict[str, CircuitBreaker] = {}
        self._lock = asyncio.Lock()

    async def get(self, name: str, settings: MeshSettings,
                  policy: BreakerPolicy | None = None) -> CircuitBreaker:
        """The started breaker called ``name`` (created with ``policy`` the first time)."""
        breaker = self.breakers.get(name)
        if breaker is not None:
            return breaker
        async with self._lock:
            if name not in self.breakers:
                created = CircuitBreaker(name, policy, settings=settings, topics=self.topics)
                await created.start()
                self.breakers[name] = created
            return self.breakers[name]

    async def stop(self) -> None:
        """Stop every breaker (safe twice)."""
        for breaker in list(self.breakers.values()):
            await breaker.stop()
        self.breakers.clear()
