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

Half-open probes are shared too: at most ``half_open_probes`` per half-open period across
all replicas, decided by the order in which the breaker partition holds their claims
(see :mod:`mesh.resilience.probe`). A local breaker (no settings) counts its probes in
memory.

Failure counting (consecutive failures, the sliding window) is per replica. The first
replica that reaches the threshold opens the breaker for every replica: each applies the
opening as soon as its follower reads it (well under a second), so with N replicas at
most ``N x (failure_threshold - 1) + 1`` failing calls (plus calls already in flight)
reach the downstream before everyone refuses.

Each transition is also sent to the breaker events topic (``opened``, ``half_open``,
``closed``) for taps and dashboards; :attr:`CircuitBreaker.transitions` counts the ones
an instance applied. A breaker is read at scrape time by the :class:`BreakerMetrics` of
the metrics given to it (``metrics=``), else of the host it is created, started or
first called under (:func:`mesh.runtime.metrics.host_metrics`: no wiring in ``mesh run``).

The module is over 500 lines because the records, the topics, the policy and the state
machine that writes and applies them share one set of rules (versions, the rank of
states, the partition of a breaker's records); the shared probe budget, which has rules
of its own, is :mod:`mesh.resilience.probe`.

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
import zlib
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel

from mesh.config import MeshSettings
from mesh.errors import BreakerOpen, ConfigError, is_retriable
from mesh.kafka.base import OutRecord
from mesh.kafka.provision import apply_topics
from mesh.kafka.transport import Producer
from mesh.resilience.probe import CLAIM_TIMEOUT, Probe, ProbeBudget
from mesh.resilience.probe import is_claim_key as is_claim_key  # its home before probe.py
from mesh.runtime.metrics import Members, MeshMetrics, host_metrics
from mesh.serde.codec import Codec
from mesh.state import CompactedTable
from mesh.topic import Topic

logger = logging.getLogger(__name__)

T = TypeVar("T")
State = Literal["closed", "open", "half_open"]
Transition = Literal["opened", "half_open", "closed"]
STATES: tuple[State, ...] = ("closed", "half_open", "open")
_RANK = {"closed": 0, "half_open": 1, "open": 2}
TRANSITIONS: dict[State, Transition] = {
    "open": "opened", "half_open": "half_open", "closed": "closed"}
"""The transition (event) name of entering each state."""
_HALF_OPEN_HOLD = 1.0  # seconds a call refused while half-open is held (at most)


class BreakerRecord(BaseModel):
    """The shared state of one breaker (the value of the compacted breaker topic).

    A probe claim is a record of this model too, under a claim key (``version`` is its
    epoch, ``reason`` says ``probe claim``), so every reader of the topic decodes it.
    """

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
    transition: Transition
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
    ``half_open_probes`` probe calls through (across all replicas). A half-open period
    with no probe outcome after ``probe_timeout`` seconds (its prober died) is replaced
    by a new one. ``is_failure`` says which exceptions count (default: retriable ones;
    other errors mean the downstream answered).

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
    probe_timeout: float = 60.0
    is_failure: Callable[[BaseException], bool] = is_retriable

    def __post_init__(self) -> None:
        if (self.failure_threshold < 1 or self.half_open_probes < 1
                or self.reset_timeout <= 0 or self.probe_timeout <= 0):
            raise ConfigError(
                f"BreakerPolicy(failure_threshold={self.failure_threshold}, half_open_probes="
                f"{self.half_open_probes}, reset_timeout={self.reset_timeout}, probe_timeout="
                f"{self.probe_timeout}): thresholds must be >= 1 and the timeouts > 0. "
                "Fix the policy.")
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

    ``transitions`` counts the transitions this instance applied (``opened``,
    ``half_open``, ``closed``: its own and other replicas', not the state restored at
    start); ``rejected`` counts the calls it refused. Both are served by ``metrics``
    (default: the host's, see the module docstring) from creation or start until
    :meth:`stop`.

    Example:
        >>> breaker = CircuitBreaker("llm", settings=settings, topics=topics)  # doctest: +SKIP
        >>> async with breaker:  # doctest: +SKIP
        ...     reply = await breaker.call(client.complete, prompt)
    """

    def __init__(self, name: str, policy: BreakerPolicy | None = None, *,
                 settings: MeshSettings | None = None, topics: BreakerTopics | None = None,
                 replica: str | None = None, hold_on_trip: bool = True,
                 clock: Callable[[], float] = time.time,
                 metrics: MeshMetrics | None = None) -> None:
        if settings is not None and topics is None:
            raise ConfigError(f"Breaker {name!r} has settings but no topics: pass "
                              "topics=breaker_topics(prefix) so its state can be shared.")
        if not name or "/" in name:
            raise ConfigError(f"Breaker name {name!r} is empty or contains '/', which "
                              "separates the parts of probe claim keys. Rename it.")
        self.name = name
        self.hold_on_trip = hold_on_trip
        self.policy = policy or BreakerPolicy()
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self.record = BreakerRecord(name=name)
        self.transitions: Counter[str] = Counter()  # opened / half_open / closed applied
        self.rejected = 0  # calls refused with BreakerOpen
        self._settings, self._topics, self._clock = settings, topics, clock
        self._outcomes: deque[bool] = deque(maxlen=self.policy.window)  # True = failed
        self._consecutive = 0
        self._budget = ProbeBudget(name, self.policy.half_open_probes, replica=self.replica)
        self._counting = True  # False while restoring: a restored state is no transition
        self._partition = zlib.crc32(name.encode()) % (topics.state.partitions if topics else 1)
        self._lock = asyncio.Lock()
        self._producer: Producer | None = None
        self._codec = Codec()
        self._table: CompactedTable[BreakerRecord] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._metrics = metrics
        self._metered: MeshMetrics | None = None  # the metrics reporting this breaker
        self._meter()

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
        self._meter()
        if self._settings is None or self._producer is not None:
            return
        assert self._topics is not None
        topics: list[Topic[Any]] = [self._topics.state, self._topics.events]
        await apply_topics(self._settings.kafka, topics)
        codec = self._codec = Codec(self._settings.schema_registry)
        await codec.prepare(topics)
        self._table = CompactedTable(self._topics.state, self._settings.kafka, codec)
        self._table.on_change(self._on_change)
        self._producer = Producer(self._settings.kafka)
        await self._producer.start()
        self._counting = False
        try:
            await self._table.restore()
        finally:
            self._counting = True
        # Replays the topic once more (applying nothing older): no gap between the two.
        self._follower = asyncio.create_task(self._table.follow(), name=f"breaker:{self.name}")
        self._budget.share(self._write_claim, self._follower)
        logger.info("breaker %s started: %s v%d", self.name, self.state, self.record.version)

    async def stop(self) -> None:
        """Stop following and close the producer; no longer reported by the metrics."""
        if self._metered is not None:
            self._metered.part(BreakerMetrics).discard(self)
        self._budget.unshare()
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    def _meter(self) -> None:
        """Be reported by the metrics given, else by the host's (when there is one)."""
        metrics = self._metrics or host_metrics()
        if metrics is not None:
            metrics.part(BreakerMetrics).add(self)
            self._metered = metrics

    def _on_change(self, key: str, value: BreakerRecord | None) -> None:
        if key == self.name:
            if value is not None:
                self.observe(value)
        elif value is not None and self._budget.owns(key):
            self._budget.count(key)  # a claim's tombstone changes no rank: ignored

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
        self._budget.new_state(incoming.version)  # a new state or half-open epoch
        if incoming.state != mine.state or incoming.state != "closed":
            if self._counting:
                self.transitions[TRANSITIONS[incoming.state]] += 1
            if incoming.state == "closed":
                self._outcomes.clear()
                self._consecutive = 0
            logger.info("breaker %s %s (v%d by %s)", self.name, TRANSITIONS[incoming.state],
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

    async def _admit(self, correlation_id: str | None) -> Probe | None:
        """None for a plain call (closed), the granted probe when half-open, else refused."""
        if self._metered is None:  # created outside a host, called under one
            self._meter()
        async with self._lock:
            now, record, policy = self._clock(), self.record, self.policy
            if record.state == "open":
                if now < (record.opened_at or now) + policy.reset_timeout:
                    raise self._refusal(now)
                await self._write("half_open", "reset timeout elapsed", correlation_id)
            elif record.state == "half_open" and now >= record.updated_at + policy.probe_timeout:
                await self._write("half_open", f"no probe outcome within {policy.probe_timeout:g}"
                                  " s: a new half-open period", correlation_id)
            if self.record.state == "closed":
                return None
            return await self._take_probe()

    def _refusal(self, now: float, why: str = "") -> BreakerOpen:
        """The ``BreakerOpen`` refusing a call now (counted in ``rejected``)."""
        self.rejected += 1
        record = self.record
        if record.state == "open":
            until = (record.opened_at or now) + self.policy.reset_timeout
            return BreakerOpen(f"Breaker {self.name!r} is open since {record.opened_at or now:.1f}"
                               f" ({record.reason}); calls resume at {until:.1f}.", until=until)
        return BreakerOpen(f"Breaker {self.name!r} is half-open and its "
                           f"{self.policy.half_open_probes} probe(s) are taken{why}; try "
                           "again shortly.",
                           until=now + min(_HALF_OPEN_HOLD, self.policy.reset_timeout))

    async def _take_probe(self) -> Probe | None:
        """A probe of the current half-open epoch if its budget allows, else refused."""
        probe = await self._budget.take(self.record.version)
        if probe.granted:
            return probe
        if probe.unread:
            self.rejected += 1
            topic = self._table.topic.name if self._table else "?"
            raise BreakerOpen(
                f"Breaker {self.name!r}: probe claim {probe.claim!r} was not read back from "
                f"{topic} within {CLAIM_TIMEOUT:g} s; the call is held. Check the broker.",
                until=self._clock() + min(_HALF_OPEN_HOLD, self.policy.reset_timeout))
        if self.record.state == "closed":
            return None  # closed while the claim was in flight: a plain call
        raise self._refusal(self._clock(), probe.why)

    async def _write_claim(self, key: str, epoch: int | None) -> None:
        """Produce a probe claim of ``epoch`` (a record of this breaker, see
        :class:`BreakerRecord`), or the claim's tombstone when ``epoch`` is None."""
        claim = None if epoch is None else BreakerRecord(
            name=self.name, state="half_open", version=epoch, updated_by=self.replica,
            updated_at=self._clock(), reason="probe claim")
        await self._send([self._row(key, claim)])

    async def _settle(self, probe: Probe | None, error: BaseException | None,
                      correlation_id: str | None) -> bool:
        """Record an outcome; returns whether this failure opened the breaker."""
        if isinstance(error, BreakerOpen | asyncio.CancelledError):
            return False  # not an answer: a probe's claim stays until its epoch ends
        failed = error is not None and self.policy.is_failure(error)
        async with self._lock:
            if probe is not None:
                done = [probe.claim] if probe.claim else []
                if self.record.state == "half_open":
                    if failed:
                        await self._write("open", f"probe failed: {error!r}", correlation_id,
                                          drop=done)
                        return True
                    await self._write("closed", "probe succeeded", correlation_id, drop=done)
                else:
                    await self._send([self._row(k, None) for k in done])
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

    async def _write(self, state: State, reason: str, correlation_id: str | None, *,
                     drop: Iterable[str] = ()) -> None:
        """Apply a transition locally, then persist it, the tombstones of the claims of
        the epoch it ends (and of ``drop``) and its event (acknowledged)."""
        now, mine = self._clock(), self.record
        ended = self._budget.claims_of(mine.version) if mine.state == "half_open" else []
        record = mine.model_copy(update={
            "state": state, "version": mine.version + 1, "updated_by": self.replica,
            "updated_at": now, "reason": reason,
            "opened_at": now if state == "open" else mine.opened_at,
            "failures": self._consecutive if state == "open" else mine.failures,
            "probes": self.policy.half_open_probes if state == "half_open" else 0})
        self.observe(record)
        if self._producer is None or self._topics is None:
            return
        event = BreakerTransition(name=self.name, transition=TRANSITIONS[state],
                                  version=record.version, at=now, by=self.replica,
                                  reason=reason, correlation_id=correlation_id)
        value, fingerprint = self._codec.encode(self._topics.events, event)
        # The transition first: a reader reaching the tombstones has seen the epoch end.
        await self._send([
            self._row(self.name, record),
            *(self._row(key, None) for key in dict.fromkeys([*ended, *drop])),
            OutRecord(self._topics.events.name, value, self.name.encode(),
                      (("mesh-schema", fingerprint.encode()),))])

    def _row(self, key: str, value: BreakerRecord | None) -> OutRecord:
        """A record of the state topic, in this breaker's partition (set explicitly, so
        its claims and its state share one log order whatever the partitioner)."""
        assert self._table is not None
        return self._table.record_of(key, value)._replace(partition=self._partition)

    async def _send(self, records: list[OutRecord]) -> None:
        if self._producer is not None and records:
            await self._producer.send_all(records)


class BreakerRegistry:
    """The breakers of one process, created and started lazily on first use.

    Declare one at module level in the agent's module; a handler asks it for a started
    breaker (the agent's settings come from ``ctx.runner``). ``stop()`` closes them all.
    Its breakers report to ``metrics``, else to the host's they are created under.

    Example:
        >>> breakers = BreakerRegistry(breaker_topics("shop"))
        >>> async def handle(item, ctx):  # doctest: +SKIP
        ...     search = await breakers.get("search", ctx.runner.settings, policy)
        ...     async with search.guard(correlation_id=ctx.correlation_id):
        ...         return await call_search(item)
    """

    def __init__(self, topics: BreakerTopics, *, metrics: MeshMetrics | None = None) -> None:
        self.topics = topics
        self.metrics = metrics
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
                created = CircuitBreaker(name, policy, settings=settings, topics=self.topics,
                                         metrics=self.metrics)
                await created.start()
                self.breakers[name] = created
            return self.breakers[name]

    async def stop(self) -> None:
        """Stop every breaker (safe twice)."""
        for breaker in list(self.breakers.values()):
            await breaker.stop()
        self.breakers.clear()


class BreakerMetrics(Members[CircuitBreaker]):
    """The breakers reported by one metrics registry (a part, see
    :meth:`mesh.runtime.metrics.MeshMetrics.part`), read when Prometheus scrapes:

    * ``mesh_breaker_state{breaker,state}``: a state set (Prometheus' idiom for an enum):
      1 on the breaker's current state (``closed``, ``half_open``, ``open``), 0 on the
      others. A breaker that cycles open -> half-open -> open is never closed, so alert
      on ``max_over_time(mesh_breaker_state{state="closed"}[10m]) == 0``
      (ops/alerts.yml). Every replica reports the shared state: aggregate with
      ``max by (breaker)``;
    * ``mesh_breaker_transitions_total{breaker,to}``: transitions this process applied,
      its own and other replicas' (every replica counts every transition: ``max by``,
      not ``sum``, across replicas), not the state restored at start;
    * ``mesh_breaker_rejections_total{breaker}``: calls this process's breaker refused.

    Two breakers of one name (tests, two replicas in one process) are reported once: the
    most open state, the most transitions, the sum of rejections.

    Example:
        >>> from prometheus_client import CollectorRegistry, generate_latest
        >>> metrics = MeshMetrics(CollectorRegistry())
        >>> breaker = CircuitBreaker("docs-example", metrics=metrics)
        >>> 'mesh_breaker_state{breaker="docs-example",state="closed"} 1.0' in (
        ...     generate_latest(metrics.registry).decode())
        True
    """

    def collect(self) -> Iterator[Any]:
        state = GaugeMetricFamily("mesh_breaker_state", "1 on the state each breaker is in "
                                  "(closed, half_open, open), 0 on the others",
                                  labels=["breaker", "state"])
        transitions = CounterMetricFamily("mesh_breaker_transitions", "Breaker transitions "
                                          "applied (this replica's and others'), by state "
                                          "entered", labels=["breaker", "to"])
        rejections = CounterMetricFamily("mesh_breaker_rejections", "Calls refused by a "
                                         "breaker (open, or half-open probes taken)",
                                         labels=["breaker"])
        by_name: dict[str, list[CircuitBreaker]] = {}
        for breaker in self.snapshot():
            by_name.setdefault(breaker.name, []).append(breaker)
        for name, group in sorted(by_name.items()):
            current = max((b.state for b in group), key=STATES.index)  # the most open
            for each in STATES:
                state.add_metric([name, each], 1 if each == current else 0)
                transitions.add_metric([name, each], max(
                    b.transitions.get(TRANSITIONS[each], 0) for b in group))
            rejections.add_metric([name], sum(b.rejected for b in group))
        yield from (state, transitions, rejections)
