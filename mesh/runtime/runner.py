"""Running agents: consume -> decode -> handle -> produce -> commit.

A replica of an agent is an :class:`AgentRunner`, composed of three parts (split as
aiokafka splits its consumer into consumer, fetcher and subscription state):

* here, the runner: the consumer loop (poll, feed the lanes, pause and resume, commit
  every ``runtime.commit_interval_ms`` beside the polling), the rebalance callbacks
  (restore the state tables, open and close lanes), timers, holds, quarantine and the
  rate limit;
* :mod:`mesh.runtime.lanes`: per partition, the order of its records, one worker per
  order key, the uncommitted window, its offsets and their commit;
* :mod:`mesh.runtime.process`: one record's fate: decode, handle, the retry decision,
  outputs, retry record or dead letter, audit, trace span, its :class:`Outcome`.

One record's walk: :meth:`AgentRunner._poll` -> :meth:`Lanes.feed` (or, once what
held it back passes, the lane's :meth:`Lanes.drain`) -> its key's worker, under a
handler slot -> :meth:`AgentRunner._take`
(rate limit, holds) -> :meth:`RecordProcessor.process` (sends what it produced) -> the
acks resolve -> :meth:`Lane.settle` advances the offset -> :meth:`Lanes.commit`.

Delivery contract (at-least-once; exactly-once is :mod:`mesh.runtime.transactions`):

* One consumer group per agent; replicas share it and Kafka balances partitions.
* Order, concurrency, commits to the lowest unfinished input, pausing busy partitions
  and committing on revoke: the lanes' part (:mod:`mesh.runtime.lanes`).
* Bad input and failed inputs to the dead-letter topic, retries: the processor's part
  (:mod:`mesh.runtime.process`).
* A transport failure (broker gone) stops the agent loudly with an error; the
  uncommitted inputs are redelivered when it (or a replica) runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

from mesh.agent import Agent, Context
from mesh.config import MeshSettings
from mesh.envelope import Envelope, new_event_id
from mesh.errors import BrokerLost, Held, UnreadableBatch
from mesh.kafka.base import Acks, BaseProducer, OutRecord, Partition, Record
from mesh.kafka.placement import PlacementCheck
from mesh.kafka.transport import Consumer
from mesh.runtime.lanes import Lanes
from mesh.runtime.process import Observer, Outcome, RecordProcessor
from mesh.serde.codec import Codec
from mesh.state import tables_for

# Outcome: its home is process
__all__ = ["AgentRunner", "Deadline", "Outcome", "RateLimit", "bounded"]

logger = logging.getLogger(__name__)


class AgentRunner:
    """Runs one agent: its consumer group, its lanes, its commits.

    Example:
        >>> runner = AgentRunner(answerer, settings, producer=producer,
        ...                      codec=codec)  # doctest: +SKIP
        >>> await runner.run(stop_event)  # doctest: +SKIP
    """

    lanes_kind: type[Lanes] = Lanes  # the exactly-once runner's lanes use transactions

    def __init__(self, agent: Agent[Any], settings: MeshSettings, *, producer: BaseProducer,
                 codec: Codec, deadline: Deadline | None = None) -> None:
        self.agent = agent
        self.settings = settings
        self.producer = producer
        self.codec = codec
        self.assigned = asyncio.Event()
        self._consumer: Consumer | None = None
        self.limiter = RateLimit(agent.rate_limit) if agent.rate_limit else None
        self._tasks: asyncio.TaskGroup | None = None
        self.revocations = 0  # while running; the leave at shutdown is not counted
        self._stopping = False
        self.tables = tables_for(list(agent.state), settings.kafka, codec)
        # Clear from a revoke (and before the first assignment) until the state tables
        # are rebuilt: aiokafka fetches for new partitions before on_partitions_assigned
        # returns, and a handler must never judge by a table that is not restored yet.
        self._state_ready = asyncio.Event()
        if not self.tables:
            self._state_ready.set()
        self._held_until = 0.0
        self.holds = 0
        self.quarantined = False
        self._released = asyncio.Event()
        self._fatal: BaseException | None = None
        self.lanes = self.lanes_kind(agent, settings, handle=self._take, spawn=self._spawn,
                                     ready=self._state_ready,
                                     held_until=lambda: self._held_until)
        # The shutdown's one bound, shared with the host's other runners and its flush.
        self.deadline = deadline or Deadline(settings.runtime.shutdown_timeout_s)
        self.lanes.deadline = self.deadline
        self.processor = RecordProcessor(agent, settings, codec=codec, send=self._send,
                                         context=self._context, state_first=agent.state_first)
        self.observers: list[Observer] = self.processor.observers  # metrics, heartbeats
        # Foreign producers: keys in another partition than murmur2's (retry topics keep
        # their input's partition on purpose, so only the inputs are checked), and
        # batches that cannot be read at all (per topic; the agent stops on the first).
        self.placement = PlacementCheck(agent.name, [t.name for t in agent.consumes])
        self.unreadable: dict[str, int] = {}

    @property
    def handled(self) -> int:
        """Inputs handled successfully."""
        return self.processor.handled

    @property
    def dead_lettered(self) -> int:
        """Inputs sent to the dead-letter topic."""
        return self.processor.dead_lettered

    @property
    def retried(self) -> int:
        """Inputs sent to a retry topic."""
        return self.processor.retried

    @property
    def invalid_headers(self) -> int:
        """Malformed optional headers of inputs, ignored and replaced."""
        return self.processor.invalid_headers

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then finish in-flight work, commit and leave."""
        runtime = self.settings.runtime
        consumer = self._consumer = self.lanes.consumer = Consumer(
            self.settings.kafka, group_id=self.agent.group,
            auto_offset_reset=runtime.auto_offset_reset)
        await self.agent.on_start(self.settings)
        await consumer.start()
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                self._subscribe()
                timers = [tasks.create_task(self._every(interval, timer, stop),
                                            name=f"{self.agent.name}:timer")
                          for interval, timer in self.agent.timers]
                await self._poll(consumer, stop)
                self.deadline.start()
                self._stopping = True
                await self.lanes.close(self.lanes.partitions())
                await bounded(asyncio.gather(*timers), self.deadline.left(),
                              f"agent {self.agent.name}: the timers' last sends")
        finally:
            self._tasks = None
            self.deadline.start()  # also when the agent failed
            # Leaving the group needs the broker; without one, do not hang the shutdown.
            await bounded(consumer.stop(), self.deadline.left(),
                          f"agent {self.agent.name}: leaving the group")
            logger.info("agent %s stopped: %d handled, %d dead-lettered", self.agent.name,
                        self.handled, self.dead_lettered)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Start a lane's task in the runner's task group."""
        assert self._tasks is not None
        return self._tasks.create_task(work, name=name)

    def _subscribe(self) -> None:
        assert self._consumer is not None
        self._consumer.subscribe([t.name for t in self.agent.consumes + self.agent.retry_topics],
                                 on_assigned=self._on_assigned, on_revoked=self._on_revoked)

    async def quarantine(self) -> None:
        """Stop taking work: finish the records in hand, commit, leave the group so the
        partitions move to healthy replicas. The process (and its timers) keeps running."""
        if self.quarantined or self._consumer is None:
            return
        self.quarantined = True
        self._released.clear()
        await self.lanes.close(self.lanes.partitions())
        self._consumer.unsubscribe()
        logger.warning("agent %s quarantined: left group %s", self.agent.name, self.agent.group)

    def release(self) -> None:
        """Take work again after :meth:`quarantine`."""
        if self.quarantined and self._consumer is not None:
            self.quarantined = False
            self._subscribe()
            self._released.set()
            logger.info("agent %s released: rejoining group %s", self.agent.name,
                        self.agent.group)

    def assignment(self) -> frozenset[tuple[str, int]]:
        """The partitions this replica holds now."""
        return self.lanes.partition_set()

    def in_flight(self) -> int:
        """Inputs taken from Kafka whose outputs are not acknowledged yet."""
        return self.lanes.in_flight()

    def lag(self) -> dict[Partition, int]:
        """Per assigned partition, records between what is done and the partition's end
        (the end as the last fetch reported it)."""
        return {partition: max(0, end - handled)
                for partition, end, handled in self.lanes.positions()}

    def check_log_ends(self) -> None:
        """Raise :class:`BrokerLost` if a partition's log now ends before what this
        agent has handled there: the broker lost records (see :mod:`mesh.runtime.liveness`)."""
        for partition, end, handled in self.lanes.positions():
            if end < handled:
                raise BrokerLost(
                    f"{partition.topic}[{partition.partition}] ends at offset {end}, but "
                    f"agent {self.agent.name} has handled it up to {handled}: the broker "
                    "lost records (a restarted memory-only broker, a recreated topic). "
                    "Stopping instead of skipping or re-reading silently.")

    async def _every(self, interval: float, timer: Any, stop: asyncio.Event) -> None:
        name = getattr(timer, "__name__", "timer")
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            if stop.is_set():
                return
            try:
                records = await self._timer_records(timer)
            except Exception:  # a timer bug must not stop the agent; it runs again
                logger.exception("agent %s: timer %s failed", self.agent.name, name)
                continue
            await self.producer.send_all(records)

    async def run_timer(self, timer: Any) -> None:
        """One run of ``timer`` (as :meth:`run` does every period), its emits and state
        writes produced and acknowledged; its errors are raised."""
        await self.producer.send_all(await self._timer_records(timer))

    async def _timer_records(self, timer: Any) -> list[OutRecord]:
        event = Envelope(None, new_event_id(), new_event_id(), source=self.agent.name)
        ctx = self._context(event)
        await timer(ctx)
        emitted = self.processor.outputs.emitted(self.agent, event, ctx)
        return ([r for _, r in emitted] + ctx.commit_state()
                + self.processor.auditor.produced(emitted))

    def _context(self, event: Envelope[Any]) -> Context:
        return Context(self.agent, event, tables=self.tables, assigned=self.assignment(),
                       runner=self)

    async def _poll(self, consumer: Consumer, stop: asyncio.Event) -> None:
        """Poll, feed the lanes, pause and resume, and commit every
        ``runtime.commit_interval_ms``. The commit runs beside the loop, one at a time,
        its error raised here: awaited inline, its round trip would hold every record
        fetched meanwhile, and aiokafka sends no fetch to a broker while records it
        fetched from it wait to be taken."""
        runtime = self.settings.runtime
        next_commit = 0.0
        committing: asyncio.Task[None] | None = None
        try:
            while not stop.is_set():
                if self._fatal is not None:
                    raise self._fatal
                if committing is not None and committing.done():
                    finished, committing = committing, None
                    finished.result()  # a transport error stops the agent, as before
                if self.quarantined:
                    await self._wait_released(stop)
                    continue
                await self._fetch(consumer)
                if committing is None and time.monotonic() >= next_commit:
                    committing = asyncio.create_task(self.lanes.commit(),
                                                     name=f"{self.agent.name}:commit")
                    next_commit = time.monotonic() + runtime.commit_interval_ms / 1000
        except BaseException:
            if committing is not None:  # uncommitted inputs are redelivered
                committing.cancel()
                await asyncio.wait([committing])
            raise
        if committing is not None:
            if committing.done():
                committing.result()
            else:  # closing the lanes commits next: a broker that does not answer is
                committing.cancel()  # waited for once, not twice
                await asyncio.wait([committing])

    async def _wait_released(self, stop: asyncio.Event) -> None:
        """Wait for :meth:`release` or ``stop``. Unsubscribed, aiokafka's getmany waits
        for a new assignment whatever its timeout, so each poll would only end at the
        consumer's bound on it (``POLL_GRACE_S`` past the timeout) with nothing."""
        waits = [asyncio.ensure_future(stop.wait()),
                 asyncio.ensure_future(self._released.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()

    async def _fetch(self, consumer: Consumer) -> None:
        """One poll: hand what was fetched to the lanes, then pause or resume."""
        try:
            batches = await consumer.getmany(timeout_ms=200,
                                             max_records=self.settings.runtime.max_records_per_poll)
        except UnreadableBatch as exc:  # stop once, loudly: a refetch fails the same way
            topic = exc.topic or "unknown"
            self.unreadable[topic] = self.unreadable.get(topic, 0) + 1
            logger.error("agent %s stops: %s", self.agent.name, exc)
            raise
        for partition, records in batches.items():
            self.placement.check(records, partitions=consumer.partition_count(partition.topic))
            self.lanes.feed(partition, records)
        self.lanes.flow_control()

    def hold(self, until: float) -> None:
        """Pause every partition until ``until`` (epoch seconds), polling on; the lanes
        keep the inputs they hold and hand them to the handler again then."""
        self._held_until = max(self._held_until, until)

    def end_hold(self) -> None:
        """End a hold now, as if its time had passed."""
        self._held_until = 0.0

    @property
    def held(self) -> bool:
        return time.time() < self._held_until

    async def _on_assigned(self, partitions: list[Partition]) -> None:
        if not self._not_taking(partitions):
            await self._fatal_on_error(self.assign(partitions))

    def _not_taking(self, partitions: list[Partition]) -> bool:
        """Whether the runner is stopping, so takes no partition of a rebalance.

        A rebalance that completes while the runner stops (a rolling stop: the other
        replica left first; or a stop while the state tables restore) hands out
        partitions nobody will handle here: take none; leaving the group right after
        gives them to the others."""
        if self._stopping or self._tasks is None:
            logger.info("agent %s stopping: not taking %d partition(s) of a rebalance",
                        self.agent.name, len(partitions))
            return True
        return False

    async def _on_revoked(self, partitions: list[Partition]) -> None:
        await self._fatal_on_error(self.revoke(partitions))

    async def _fatal_on_error(self, step: Awaitable[None]) -> None:
        """Run a rebalance step; aiokafka swallows callback errors, so one is kept for
        the poll loop to raise."""
        try:
            await step
        except BaseException as exc:
            self._fatal = exc
            raise

    async def assign(self, partitions: list[Partition]) -> None:
        """Take ``partitions`` (a rebalance assigned them): restore the state tables, then
        open their lanes. The exactly-once runner fences the previous owner first."""
        # Every lane was closed (and its writes acknowledged) on revoke, so reading each
        # state topic to its end now sees the latest value of every key.
        for table in self.tables.values():
            await table.restore()
        if self._not_taking(partitions):  # the runner began to stop while restoring
            return
        self._state_ready.set()
        self.lanes.wake()  # lanes opened while restoring may go on
        for partition in partitions:
            if partition not in self.lanes:
                self.lanes.open(partition)
        logger.info("agent %s assigned %s", self.agent.name, sorted(partitions))
        self.assigned.set()

    async def revoke(self, partitions: list[Partition]) -> None:
        """Give ``partitions`` up (a rebalance revoked them): their lanes finish the
        records in hand and commit; the state tables wait for the next restore."""
        logger.info("agent %s revoked %s", self.agent.name, sorted(partitions))
        if self.tables:
            self._state_ready.clear()
        if partitions and not self._stopping:
            self.revocations += 1
        await self.lanes.close([p for p in partitions if p in self.lanes])

    async def process(self, record: Record) -> Acks:
        """Handle one record (see :meth:`RecordProcessor.process`): its outputs (or its
        dead letter) are sent; the returned acks resolve when the broker has them."""
        return await self.processor.process(record)

    async def _take(self, record: Record) -> Acks | None:
        """Handle one record at the agent's rate; None when its handler holds (a breaker
        is open): the agent holds, and the lane keeps the record for later."""
        try:
            await self._throttle()
            return await self.process(record)
        except Held as held:
            self.hold(held.until)
            self.holds += 1
            logger.info("agent %s holding until %.1f: %s", self.agent.name, held.until, held)
            return None

    async def _send(self, record: Record, records: list[OutRecord]) -> Acks:
        """Send what handling ``record`` produced through the process's producer."""
        return await self.producer.send_many(records)

    async def _throttle(self) -> None:
        if self.limiter is not None:
            await self.limiter.acquire(self._share())

    def _share(self) -> float:
        """The part of the agent's rate limit this replica may use: its share of the
        consumed partitions (replicas split a group's partitions, so together they
        keep to the limit)."""
        consumed = {t.name for t in self.agent.consumes}
        mine = sum(1 for p in self.lanes.partitions() if p.topic in consumed)
        total = sum(t.partitions for t in self.agent.consumes)
        return 1.0 if not total or not mine else min(1.0, mine / total)


class RateLimit:
    """At most ``rate`` calls per second: a token bucket holding one second's calls.

    Example:
        >>> limit = RateLimit(5.0)
        >>> await limit.acquire()  # doctest: +SKIP
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = 1.0
        self._last = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self, share: float = 1.0) -> None:
        """Take one call of ``share`` x the rate (a replica's part), waiting for it."""
        rate = self.rate * share
        async with self._lock:  # first come, first served
            while True:
                now = time.monotonic()
                self._tokens = min(max(rate, 1.0), self._tokens + (now - self._last) * rate)
                self._last = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self._tokens) / rate)  # until the next token


class Deadline:
    """The one bound of a shutdown (``runtime.shutdown_timeout_s``). It starts when the
    stop is seen (the first :meth:`start`), and each step that may wait for a broker
    gets what is left of it: the in-flight inputs up to half of it (:class:`Lanes`), then
    the commit, the timers' last sends, leaving the group and the producer's flush. So a
    process stops within the bound of SIGTERM even with its broker gone, as a pod's
    grace period (30 s by default on Kubernetes) expects; bounds per step would add up.

    Example:
        >>> deadline = Deadline(30.0)
        >>> deadline.left()  # not started: all of it
        30.0
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._at: float | None = None

    def start(self) -> None:
        """Start counting (once; later calls change nothing)."""
        if self._at is None:
            self._at = time.monotonic() + self.seconds

    @property
    def started(self) -> bool:
        """Whether the shutdown has begun."""
        return self._at is not None

    def left(self) -> float:
        """Seconds left: all of them before :meth:`start`, never below 0."""
        if self._at is None:
            return self.seconds
        return max(0.0, self._at - time.monotonic())


async def bounded(work: Awaitable[Any], timeout: float, what: str) -> None:
    """Await ``work`` for at most ``timeout`` seconds (then cancel it and log): for
    shutdown steps that need a broker that may be gone."""
    try:
        await asyncio.wait_for(work, timeout)
    except TimeoutError:
        logger.error("%s did not finish within %.0f s; going on without it", what, timeout)
