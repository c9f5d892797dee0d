"""Running agents: consume -> decode -> handle -> produce -> commit.

Delivery contract (at-least-once):

* One consumer group per agent; replicas share it and Kafka balances partitions.
* Records of one partition are taken in order by that partition's *lane* and handled
  by one worker per order key (``Agent(ordering=)``: the record key by default, the
  partition, or none): one key's inputs one at a time, in order; other keys and other
  partitions concurrently, up to ``Agent(concurrency=)`` handlers at once per replica.
* A partition's committed offset advances only to the lowest input not yet finished
  (handled, and every output acknowledged); at most ``runtime.max_uncommitted`` inputs
  are taken past it.
* An input's offset is committed only after every output it produced has been
  acknowledged by the broker; auto-commit is never used.
* The poll loop never waits for handlers: a busy partition is paused (and resumed
  when its lane drains), so a handler slower than ``max.poll.interval.ms`` does not
  make the consumer drop out of its group.
* On revoke, lanes of the revoked partitions finish the record in hand and their
  offsets are committed before the partitions move.
* Bad input (undecodable, wrong schema, oversize; never a header) and inputs whose
  handler fails for good go to ``<topic>.dlq`` with headers naming the original
  topic, partition, offset, error class and message; the partition moves on.
* A transport failure (broker gone) stops the agent loudly with an error; the
  uncommitted inputs are redelivered when it (or a replica) runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mesh.agent import Agent, Context
from mesh.serde.codec import Codec
from mesh.config import MeshSettings
from mesh.envelope import (
    Envelope,
    new_event_id,
    now_ms,
    read_headers,
)
from mesh.errors import (
    BrokerLost,
    CommitFailed,
    DecodeError,
    Held,
    InputError,
    PayloadTooLarge,
    UnreadableBatch,
)
from mesh.runtime.audit import DEAD_LETTER, OK, RETRY, Auditor
from mesh.runtime.tracing import HandlerTracer
from mesh.kafka.placement import PlacementCheck
from mesh.runtime import retry
from mesh.runtime.dead_letter import dead_letter
from mesh.state import tables_for
from mesh.kafka.transport import (
    Acks,
    Consumer,
    OutRecord,
    Partition,
    Producer,
    Record,
)

logger = logging.getLogger(__name__)


class Outputs:
    """Encodes a handler's outputs into records, enforcing the mesh's size limit."""

    def __init__(self, codec: Codec, max_bytes: int) -> None:
        self.codec, self.max_bytes = codec, max_bytes

    def emitted(self, agent: Agent[Any], event: Envelope[Any], ctx: Context, *,
                traceparent: str | None = None) -> list[tuple[Envelope[Any], OutRecord]]:
        """The emitted outputs of ``ctx`` with their envelopes (derived ids); every one
        carries ``traceparent`` when given (the handler's span)."""
        out = []
        carried = agent.propagated(event.extra_headers)
        for index, emitted in enumerate(ctx.outputs):
            extra = carried
            if emitted.headers:  # set on this output: over the carried ones of that name
                names = {name for name, _ in emitted.headers}
                extra = (*(h for h in carried if h[0] not in names), *emitted.headers)
            value, fingerprint = self.codec.encode(emitted.topic, emitted.payload)
            if len(value) > self.max_bytes:
                raise PayloadTooLarge(
                    f"Output {index} of {agent.name} to {emitted.topic.name} is {len(value)} "
                    f"bytes, above the limit of {self.max_bytes} "
                    "(MESH_RUNTIME__MAX_MESSAGE_BYTES). Send a reference, not the blob.")
            child = event.child(
                emitted.payload, agent=agent.name, index=index, key=emitted.key,
                extra_headers=extra, schema=fingerprint, correlation_id=emitted.correlation_id,
                causation_id=emitted.causation_id,  # a kept event's, not the input's
                traceparent=traceparent, other_trace=emitted.traceparent)
            out.append((child, OutRecord(emitted.topic.name, value, emitted.key,
                                         tuple(child.headers()))))
        return out


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one input, for observers (metrics, heartbeats, audit)."""

    agent: str
    topic: str
    partition: int
    offset: int
    event_id: str | None
    correlation_id: str | None
    ok: bool
    attempts: int
    duration_s: float
    outputs: int = 0
    error_class: str | None = None
    error: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0  # values produced: outputs and state writes (not audit, dead letters)
    result: str = OK  # as the audit says it: ok, retry (to a retry topic), dead_letter


Observer = Callable[[Outcome], None]


@dataclass(slots=True)
class _Lane:
    """The records of one partition: taken in offset order by one task, handled by one
    worker per key (per partition, or per record, as the agent's ordering says)."""

    partition: Partition
    backlog: deque[Record] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # offset -> the acks of its outputs once handled (None while its handler runs), in
    # offset order: ``done`` advances over the front while it is acknowledged
    pending: dict[int, Acks | None] = field(default_factory=dict)
    keys: dict[Any, deque[Record]] = field(default_factory=dict)  # waiting, per key
    workers: set[asyncio.Task[None]] = field(default_factory=set)
    halted: asyncio.Event = field(default_factory=asyncio.Event)  # set when it stops
    done: int | None = None  # next offset to commit
    committed: int | None = None
    stopping: bool = False
    task: asyncio.Task[None] | None = None


class AgentRunner:
    """Runs one agent: its consumer group, its lanes, its commits.

    Example:
        >>> runner = AgentRunner(answerer, settings, producer=producer,
        ...                      codec=codec)  # doctest: +SKIP
        >>> await runner.run(stop_event)  # doctest: +SKIP
    """

    def __init__(self, agent: Agent[Any], settings: MeshSettings, *, producer: Producer,
                 codec: Codec) -> None:
        self.agent = agent
        self.settings = settings
        self.producer = producer
        self.codec = codec
        self.outputs = Outputs(codec, settings.runtime.max_message_bytes)
        self.auditor = Auditor(codec, settings.audit, source=agent.name)
        self.tracer = HandlerTracer(settings.tracing)
        self.assigned = asyncio.Event()
        self._lanes: dict[Partition, _Lane] = {}
        self._consumer: Consumer | None = None
        # handlers running at once, across the replica's partitions (Agent(concurrency=))
        self._slots = asyncio.Semaphore(agent.concurrency or settings.runtime.concurrency)
        self.limiter = RateLimit(agent.rate_limit) if agent.rate_limit else None
        self._tasks: asyncio.TaskGroup | None = None
        self.handled = 0
        self.dead_lettered = 0
        self.revocations = 0  # while running; the leave at shutdown is not counted
        self._stopping = False
        self.tables = tables_for(list(agent.state), settings.kafka, codec)
        # Clear from a revoke (and before the first assignment) until the state tables
        # are rebuilt: aiokafka fetches for new partitions before on_partitions_assigned
        # returns, and a handler must never judge by a table that is not restored yet.
        self._state_ready = asyncio.Event()
        if not self.tables:
            self._state_ready.set()
        self.observers: list[Observer] = []
        self.quarantined = False
        self._fatal: BaseException | None = None
        self._held_until = 0.0
        self.holds = 0
        self.retried = 0
        self.invalid_headers = 0  # malformed optional headers, ignored and replaced
        self._warned_headers: set[tuple[str, str]] = set()
        self._released = asyncio.Event()
        # Foreign producers: keys in another partition than murmur2's (retry topics keep
        # their input's partition on purpose, so only the inputs are checked), and
        # batches that cannot be read at all (per topic; the agent stops on the first).
        self.placement = PlacementCheck(agent.name, [t.name for t in agent.consumes])
        self.unreadable: dict[str, int] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then finish in-flight work, commit and leave."""
        runtime = self.settings.runtime
        consumer = self._consumer = Consumer(
            self.settings.kafka, group_id=self.agent.group,
            auto_offset_reset=runtime.auto_offset_reset)
        await self.agent.on_start(self.settings)
        await consumer.start()
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                self._subscribe()
                for interval, timer in self.agent.timers:
                    tasks.create_task(self._every(interval, timer, stop),
                                      name=f"{self.agent.name}:timer")
                await self._poll(consumer, stop)
                self._stopping = True
                await self._close_lanes(list(self._lanes))
        finally:
            self._tasks = None
            # Leaving the group needs the broker; without one, do not hang the shutdown.
            await bounded(consumer.stop(), self.settings.runtime.shutdown_timeout_s,
                          f"agent {self.agent.name}: leaving the group")
            logger.info("agent %s stopped: %d handled, %d dead-lettered", self.agent.name,
                        self.handled, self.dead_lettered)

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
        await self._close_lanes(list(self._lanes))
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
        return frozenset(self._lanes)

    def in_flight(self) -> int:
        """Inputs taken from Kafka whose outputs are not acknowledged yet."""
        return sum(len(lane.backlog) + len(lane.pending) for lane in self._lanes.values())

    def lag(self) -> dict[Partition, int]:
        """Per assigned partition, records between what is done and the partition's end
        (the end as the last fetch reported it)."""
        return {partition: max(0, end - handled)
                for partition, end, handled in self._positions()}

    def _positions(self) -> list[tuple[Partition, int, int]]:
        """Per assigned partition whose end a fetch reported: (partition, the end, the
        offset up to which inputs are handled)."""
        found = []
        for partition, lane in list(self._lanes.items()):
            end = self._consumer.highwater(partition) if self._consumer else None
            if end is not None:
                found.append((partition, end, max(lane.done or 0, lane.committed or 0)))
        return found

    def check_log_ends(self) -> None:
        """Raise :class:`BrokerLost` if a partition's log now ends before what this
        agent has handled there: the broker lost records (see :mod:`mesh.runtime.liveness`)."""
        for partition, end, handled in self._positions():
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
        emitted = self.outputs.emitted(self.agent, event, ctx)
        return ([r for _, r in emitted] + ctx.commit_state()
                + self.auditor.produced(emitted))

    def _context(self, event: Envelope[Any]) -> Context:
        return Context(self.agent, event, tables=self.tables, assigned=self.assignment(),
                       runner=self)

    async def _poll(self, consumer: Consumer, stop: asyncio.Event) -> None:
        runtime = self.settings.runtime
        next_commit = 0.0
        while not stop.is_set():
            if self._fatal is not None:
                raise self._fatal
            if self.quarantined:
                # Unsubscribed: aiokafka's getmany would wait for a new assignment
                # (ignoring its timeout) and this loop would never see ``stop``.
                waits = [asyncio.ensure_future(stop.wait()),
                         asyncio.ensure_future(self._released.wait())]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for waiting in waits:
                    waiting.cancel()
                continue
            try:
                batches = await consumer.getmany(timeout_ms=200,
                                                 max_records=runtime.max_records_per_poll)
            except UnreadableBatch as exc:  # stop once, loudly: a refetch fails the same way
                topic = exc.topic or "unknown"
                self.unreadable[topic] = self.unreadable.get(topic, 0) + 1
                logger.error("agent %s stops: %s", self.agent.name, exc)
                raise
            for partition, records in batches.items():
                self.placement.check(records,
                                     partitions=consumer.partition_count(partition.topic))
                lane = self._lanes.get(partition) or self._open_lane(partition)
                lane.backlog.extend(records)
                lane.wakeup.set()
            self._flow_control(consumer)
            if time.monotonic() >= next_commit:
                await self._commit(list(self._lanes.values()))
                next_commit = time.monotonic() + runtime.commit_interval_ms / 1000

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

    def _flow_control(self, consumer: Consumer) -> None:
        if self.held:
            if set(self._lanes) - consumer.paused():
                consumer.pause(set(self._lanes) - consumer.paused())
            return
        limit = self.settings.runtime.max_records_per_poll
        paused = consumer.paused()
        busy = {p for p, lane in self._lanes.items() if len(lane.backlog) >= limit}
        idle = {p for p, lane in self._lanes.items() if not lane.backlog}
        if busy - paused:
            consumer.pause(busy - paused)
        if idle & paused:
            consumer.resume(idle & paused)

    def _open_lane(self, partition: Partition) -> _Lane:
        lane = self._lanes[partition] = _Lane(partition)
        assert self._tasks is not None
        lane.task = self._tasks.create_task(self._drain(lane),
                                            name=f"{self.agent.name}:{partition}")
        return lane

    async def _on_assigned(self, partitions: list[Partition]) -> None:
        if self._stopping or self._tasks is None:
            # A rebalance that completes while the runner stops (a rolling stop: the
            # other replica left first) hands out partitions nobody will handle here:
            # take none; leaving the group right after gives them to the others.
            logger.info("agent %s stopping: not taking %d partition(s) of a rebalance",
                        self.agent.name, len(partitions))
            return
        try:
            await self._assign(partitions)
        except BaseException as exc:  # aiokafka swallows callback errors: re-raise in _poll
            self._fatal = exc
            raise

    async def _on_revoked(self, partitions: list[Partition]) -> None:
        try:
            await self._revoke(partitions)
        except BaseException as exc:
            self._fatal = exc
            raise

    async def _assign(self, partitions: list[Partition]) -> None:
        # Every lane was closed (and its writes acknowledged) on revoke, so reading each
        # state topic to its end now sees the latest value of every key.
        for table in self.tables.values():
            await table.restore()
        self._state_ready.set()
        for lane in self._lanes.values():  # lanes opened while restoring may go on
            lane.wakeup.set()
        for partition in partitions:
            if partition not in self._lanes:
                self._open_lane(partition)
        logger.info("agent %s assigned %s", self.agent.name, sorted(partitions))
        self.assigned.set()

    async def _revoke(self, partitions: list[Partition]) -> None:
        logger.info("agent %s revoked %s", self.agent.name, sorted(partitions))
        if self.tables:
            self._state_ready.clear()
        if partitions and not self._stopping:
            self.revocations += 1
        await self._close_lanes([p for p in partitions if p in self._lanes])

    async def _close_lanes(self, partitions: Sequence[Partition]) -> None:
        """Stop the lanes: each finishes the record in hand (within a bound), its
        acknowledged offsets are committed, and it is gone, even if the commit fails."""
        lanes = [self._lanes[p] for p in partitions]
        try:
            for lane in lanes:
                lane.stopping = True
                lane.backlog.clear()  # uncommitted: redelivered to the next owner
                lane.keys.clear()
                lane.wakeup.set()
                lane.halted.set()
            tasks = [lane.task for lane in lanes if lane.task is not None]
            if tasks:
                _, late = await asyncio.wait(tasks, timeout=self._close_timeout())
                for task in late:  # nothing past `done` is committed: cancelling is safe
                    logger.warning("agent %s: %s still busy after %.0f s, cancelled",
                                   self.agent.name, task.get_name(), self._close_timeout())
                    task.cancel()
                late |= {w for lane in lanes for w in lane.workers}
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.wait(late)
            await self._commit(lanes)
        finally:
            for lane in lanes:
                self._lanes.pop(lane.partition, None)

    def _close_timeout(self) -> float:
        # Inside a rebalance callback, waiting past max.poll.interval.ms gets the member
        # removed from the group: stay well below it.
        poll_s = self.settings.kafka.max_poll_interval_ms / 1000
        return min(self.settings.runtime.shutdown_timeout_s, poll_s / 2)

    async def _commit(self, lanes: Sequence[_Lane]) -> None:
        if self._consumer is None:
            return
        owned = self._consumer.assignment()
        due = {lane.partition: lane.done for lane in lanes
               if lane.done is not None and lane.done != lane.committed
               and lane.partition in owned}
        if not due:
            return
        try:
            # Bounded: without a broker a commit would wait forever (the broker watch
            # stops the agent; a shutdown must not hang on it either).
            async with asyncio.timeout(self._close_timeout()):
                await self._consumer.commit(due)
        except CommitFailed as exc:  # the group moved on; the new owner redelivers
            logger.warning("agent %s: commit of %s failed: %s", self.agent.name, due, exc)
            return
        except TimeoutError:
            logger.error("agent %s: commit of %s got no answer within %.0f s", self.agent.name,
                         due, self._close_timeout())
            return
        for lane in lanes:
            if lane.partition in due:
                lane.committed = due[lane.partition]

    async def _drain(self, lane: _Lane) -> None:
        """Take the lane's records in offset order and hand each to the worker of its key
        (:meth:`_work`): inputs of one key run one at a time, in order; other keys run
        concurrently, up to the agent's concurrency across the replica. ``done`` (the
        offset to commit) advances only over a prefix of inputs that are handled and
        whose outputs are all acknowledged; at most ``runtime.max_uncommitted`` inputs
        of the partition are taken past it."""
        window = self.settings.runtime.max_uncommitted
        try:
            while not lane.stopping:
                # Cleared before looking: new records, a finished input, an ack, the
                # restore or a stop that comes after this wakes the waits below.
                lane.wakeup.clear()
                await self._settle(lane, wait=False)
                if not lane.backlog or not self._state_ready.is_set():
                    await lane.wakeup.wait()
                    continue
                if self.held:
                    await self._wait(lane, self._held_until)
                    continue
                record = lane.backlog[0]
                if not retry.is_for(record, self.agent.group):  # another group's retry
                    lane.backlog.popleft()
                    lane.pending[record.offset] = Acks([])  # done: nothing to wait for
                    continue
                if retry.due_ms(record) > now_ms():  # a retry waits for its time
                    await self._wait(lane, retry.due_ms(record) / 1000)
                    continue
                if len(lane.pending) >= window:  # the uncommitted window is full
                    await lane.wakeup.wait()
                    continue
                self._dispatch(lane, lane.backlog.popleft())
        finally:
            if lane.workers:  # each finishes the input in hand (bounded by _close_lanes)
                await asyncio.wait(set(lane.workers))
            await self._settle(lane, wait=True)

    def _order_key(self, record: Record) -> Any:
        """Inputs with equal order keys are handled one at a time, in offset order."""
        ordering = self.agent.ordering
        if ordering == "key":
            return record.key  # keyless inputs share one queue: their partition order
        return None if ordering == "partition" else record.offset

    def _dispatch(self, lane: _Lane, record: Record) -> None:
        lane.pending[record.offset] = None
        key = self._order_key(record)
        queue = lane.keys.get(key)
        if queue is not None:  # its key's worker takes it after the ones before it
            queue.append(record)
            return
        lane.keys[key] = deque([record])
        assert self._tasks is not None
        worker = self._tasks.create_task(self._work(lane, key),
                                         name=f"{self.agent.name}:{lane.partition}:worker")
        lane.workers.add(worker)
        worker.add_done_callback(lane.workers.discard)

    async def _work(self, lane: _Lane, key: Any) -> None:
        """Handle the inputs queued under ``key``, in order, until none is left."""
        queue = lane.keys.get(key)
        if queue is None:  # the lane closed before this worker's first step
            return
        try:
            while queue and not lane.stopping:
                if self.held:
                    await self._hold_off(lane)
                    continue
                record = queue[0]
                try:
                    async with self._slots:
                        if lane.stopping:
                            break
                        await self._throttle()
                        acks = await self.process(record)
                except Held as held:  # not now: keep the input, pause, try it again later
                    self.hold(held.until)
                    self.holds += 1
                    logger.info("agent %s holding until %.1f: %s", self.agent.name,
                                held.until, held)
                    continue
                queue.popleft()
                lane.pending[record.offset] = acks
                # the lane advances `done` over it once its outputs are acknowledged
                acks.when_done(lane.wakeup.set)
        finally:
            if lane.keys.get(key) is queue:
                del lane.keys[key]

    async def _hold_off(self, lane: _Lane) -> None:
        """Wait while the agent holds (a breaker is open), at most a second at a time so
        that :meth:`end_hold` and a stop are seen."""
        remaining = self._held_until - time.time()
        if remaining > 0 and not lane.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.halted.wait(), timeout=min(remaining, 1.0))

    async def _throttle(self) -> None:
        if self.limiter is not None:
            await self.limiter.acquire(self._share())

    def _share(self) -> float:
        """The part of the agent's rate limit this replica may use: its share of the
        consumed partitions (replicas split a group's partitions, so together they
        keep to the limit)."""
        consumed = {t.name for t in self.agent.consumes}
        mine = sum(1 for p in self._lanes if p.topic in consumed)
        total = sum(t.partitions for t in self.agent.consumes)
        return 1.0 if not total or not mine else min(1.0, mine / total)

    @staticmethod
    async def _wait(lane: _Lane, until: float) -> None:
        """Wait until ``until`` (epoch seconds) or until the lane is stopped."""
        while not lane.stopping and (remaining := until - time.time()) > 0:
            lane.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.wakeup.wait(), timeout=min(remaining, 1.0))

    @staticmethod
    async def _settle(lane: _Lane, *, wait: bool) -> None:
        """Advance ``done`` over the front of the lane's inputs while they are handled
        and acknowledged (with ``wait``, waiting for the acks of handled ones). An input
        still being handled stops it there. A failed ack raises ``TransportError``."""
        while lane.pending:
            offset = next(iter(lane.pending))
            acks = lane.pending[offset]
            if acks is None or (not wait and not acks.done()):
                return
            await acks.wait()
            del lane.pending[offset]
            lane.done = offset + 1

    async def process(self, record: Record) -> Acks:
        """Handle one record: its outputs (or its dead letter) are sent; the returned acks
        resolve when the broker has them."""
        started = time.monotonic()
        try:
            event = await self._decode(record)
        except InputError as exc:
            logger.warning("agent %s: bad input %s[%d]@%d: %s", self.agent.name, record.topic,
                           record.partition, record.offset, exc)
            audit = self._audit(record, None, DEAD_LETTER, started, exc)
            acks = await self._dead_letter(record, exc, attempts=1, extra=audit)
            self._observe(record, None, started, attempts=1, error=exc, outputs=(),
                          result=DEAD_LETTER)
            return acks
        acks, attempts, error, outputs, result = await self._handle(record, event)
        self._observe(record, event, started, attempts=attempts, error=error, outputs=outputs,
                      result=result)
        return acks

    def _observe(self, record: Record, event: Envelope[Any] | None, started: float, *,
                 attempts: int, error: BaseException | None,
                 outputs: Sequence[OutRecord], result: str) -> None:
        if not self.observers:
            return
        outcome = Outcome(
            self.agent.name, record.topic, record.partition, record.offset,
            event.event_id if event else None, event.correlation_id if event else None,
            ok=error is None, attempts=attempts, duration_s=time.monotonic() - started,
            outputs=len(outputs), error_class=type(error).__name__ if error else None,
            error=str(error) if error else None, bytes_in=len(record.value or b""),
            bytes_out=sum(len(r.value or b"") for r in outputs), result=result)
        for observer in self.observers:
            try:
                observer(outcome)
            except Exception:  # an observer must never break processing
                logger.exception("agent %s: observer failed", self.agent.name)

    async def _decode(self, record: Record) -> Envelope[Any]:
        limit = self.settings.runtime.max_message_bytes
        if record.value is None:
            raise DecodeError(f"{record.topic}[{record.partition}]@{record.offset} has no "
                              "value (a tombstone); agents consume events, not deletions.")
        if len(record.value) > limit:
            raise PayloadTooLarge(f"Record of {len(record.value)} bytes is above the limit of "
                                  f"{limit} (MESH_RUNTIME__MAX_MESSAGE_BYTES).")
        problems: list[str] = []
        meta = read_headers(record.headers, topic=record.topic, partition=record.partition,
                            offset=record.offset, key=record.key, problems=problems)
        if problems:
            self._bad_headers(record, problems)
        payload = await self.codec.decode(self.agent.topic_named(record.topic), record.value)
        return meta.with_payload(payload)  # type: ignore[arg-type]  # None -> the payload

    def _bad_headers(self, record: Record, problems: list[str]) -> None:
        """Malformed optional headers were replaced: count them, and warn once per topic
        and header (a foreign producer repeats its mistake on every record)."""
        self.invalid_headers += len(problems)
        for problem in problems:
            name = problem.split(":", 1)[0]
            level = logging.DEBUG
            if (record.topic, name) not in self._warned_headers:
                self._warned_headers.add((record.topic, name))
                level = logging.WARNING
            logger.log(level, "agent %s: %s[%d]@%d header %s; ignored and replaced (further "
                       "ones on this topic are counted in mesh_invalid_headers_total)",
                       self.agent.name, record.topic, record.partition, record.offset, problem)

    def _audit(self, record: Record, event: Envelope[Any] | None, outcome: str,
               started: float, error: BaseException | None = None,
               emitted: Sequence[tuple[Envelope[Any], OutRecord]] = ()) -> list[OutRecord]:
        """The audit records of one input's handling (sent with its outputs)."""
        if not self.auditor.enabled:
            return []
        took = time.monotonic() - started
        return self.auditor.consumed(record, event, outcome=outcome,
                                     started_ms=now_ms() - round(took * 1000),
                                     duration_s=took, error=error, outputs=emitted)

    async def _handle(self, record: Record, event: Envelope[Any]
                      ) -> tuple[Acks, int, BaseException | None, list[OutRecord], str]:
        """Run the handler: a retriable failure goes to the retry topic (or, with a
        blocking policy, is retried in place); returns the acks, the attempts made here,
        the final error (None on success), the output records (with state writes) and
        the result (ok, retry or dead_letter, as the audit names it).
        Every attempt is audited, with the outputs of the last."""
        policy = self.agent.retry
        in_place = policy.attempts if policy.blocking else 1
        first_failure: int | None = None
        earlier: list[OutRecord] = []  # audits of failed in-place attempts
        for attempt in range(1, in_place + 1):
            tried = time.monotonic()
            this = event if attempt == 1 else replace(event, attempt=event.attempt + attempt - 1)
            ctx = self._context(this)
            try:
                with self.tracer.span(self.agent.name, record.topic, this) as traceparent:
                    result = await self.agent.handle(event.payload, ctx)
                    for topic, payload in self.agent.outputs_of(result):
                        ctx.emit(topic, payload)
                    emitted = self.outputs.emitted(self.agent, event, ctx,
                                                   traceparent=traceparent)
                records = [r for _, r in emitted] + ctx.commit_state()
            except Held:
                raise  # not a failure: the lane holds the input and tries again later
            except Exception as exc:  # user code: classify, retry or dead-letter
                first_failure = first_failure or now_ms()
                if policy.retries(exc) and attempt < in_place:
                    logger.info("agent %s attempt %d failed (%s), retrying", self.agent.name,
                                attempt, exc)
                    earlier += self._audit(record, this, RETRY, tried, exc)
                    await asyncio.sleep(policy.delay_ms(attempt) / 1000)
                    continue
                if (policy.retries(exc) and not policy.blocking
                        and event.attempt < policy.attempts):
                    logger.info("agent %s attempt %d failed (%s): to the retry topic",
                                self.agent.name, event.attempt, exc)
                    self.retried += 1
                    acks = await self._send(record, [retry.retry_record(
                        record, exc, policy=policy, attempt=event.attempt,
                        group=self.agent.group), *self._audit(record, this, RETRY, tried, exc)])
                    return acks, attempt, exc, [], RETRY
                logger.warning("agent %s failed on %s[%d]@%d after %d attempt(s): %s: %s",
                               self.agent.name, record.topic, record.partition, record.offset,
                               attempt, type(exc).__name__, exc)
                total = event.attempt + attempt - 1
                acks = await self._failed(
                    record, event, exc, attempts=total, first_failure_ms=first_failure,
                    audit=functools.partial(self._failure_audit, record, this, tried, exc,
                                            earlier))
                return acks, attempt, exc, [], DEAD_LETTER
            self.handled += 1
            audit = earlier + self._audit(record, this, OK, tried, emitted=emitted)
            return (await self._send(record, records + audit), attempt, None, records,
                    OK)
        raise AssertionError("unreachable: the last attempt returns or dead-letters")

    def _failure_audit(self, record: Record, event: Envelope[Any], tried: float,
                       error: BaseException, earlier: list[OutRecord],
                       emitted: Sequence[tuple[Envelope[Any], OutRecord]]) -> list[OutRecord]:
        """The audit of an input failing for good (after ``earlier`` in-place attempts),
        listing what its failure handler emitted."""
        return [*earlier, *self._audit(record, event, DEAD_LETTER, tried, error, emitted)]

    async def _failed(self, record: Record, event: Envelope[Any], error: BaseException, *,
                      attempts: int, first_failure_ms: int | None = None,
                      audit: Callable[[Sequence[tuple[Envelope[Any], OutRecord]]],
                                      list[OutRecord]]) -> Acks:
        """An input that failed for good: the agent's failure handler may emit (e.g. a
        ``ChainFailed``), then the input goes to the dead-letter topic; ``audit`` gives
        the failure's audit records, listing what the failure handler emitted."""
        ctx = self._context(event)
        records: list[OutRecord] = []
        emitted: list[tuple[Envelope[Any], OutRecord]] = []
        try:
            await self.agent.on_failure(event.payload, ctx, error)
            emitted = self.outputs.emitted(self.agent, event, ctx)
            records = [r for _, r in emitted] + ctx.commit_state()
        except Exception:  # the failure handler failed too: the dead letter still goes
            logger.exception("agent %s: on_failure raised", self.agent.name)
        return await self._dead_letter(record, error, attempts=attempts,
                                       extra=[*records, *audit(emitted)],
                                       first_failure_ms=first_failure_ms)

    async def _send(self, record: Record, records: list[OutRecord]) -> Acks:
        """Send what handling ``record`` produced (outputs, state writes, audit, retry
        or dead letter); the exactly-once runner sends them in the partition's
        transaction instead (:mod:`mesh.runtime.transactions`)."""
        return await self.producer.send_many(records)

    async def _dead_letter(self, record: Record, error: BaseException, *, attempts: int,
                           extra: Sequence[OutRecord] = (),
                           first_failure_ms: int | None = None) -> Acks:
        self.dead_lettered += 1
        return await self._send(record, [
            *extra, dead_letter(record, error, agent=self.agent.name, attempts=attempts,
                                first_failure_ms=first_failure_ms)])


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


async def bounded(work: Awaitable[Any], timeout: float, what: str) -> None:
    """Await ``work`` for at most ``timeout`` seconds (then cancel it and log): for
    shutdown steps that need a broker that may be gone."""
    try:
        await asyncio.wait_for(work, timeout)
    except TimeoutError:
        logger.error("%s did not finish within %.0f s; going on without it", what, timeout)
