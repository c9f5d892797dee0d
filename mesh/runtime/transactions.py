"""Exactly-once agents: consume-transform-produce in Kafka transactions (opt-in).

``Agent(..., exactly_once=True)`` or ``MESH_RUNTIME__EXACTLY_ONCE=true`` runs the agent
with :class:`TransactionalRunner` instead of the at-least-once runner:

* Each consumed partition (retry tiers included) has its own transactional producer,
  with the id ``<group>-<topic>-<partition>`` (aiokafka's producer-per-partition
  pattern: aiokafka 0.14 sends ``TxnOffsetCommit`` v0, without the consumer group
  generation of KIP-447, so fencing is by transactional id). A replica that is assigned
  a partition registers its id before handling anything: the previous owner's producer
  is fenced and its open transaction aborted (or, if it was committing, completed); the
  replica then reads the committed offset again and skips what was fetched below it.
* A partition's lane handles a batch of records in one transaction (taken for at most
  ``MESH_RUNTIME__TRANSACTION_MAX_MS`` and at most
  ``MESH_RUNTIME__TRANSACTION_MAX_RECORDS`` records): every output, state write, audit
  record, retry record and dead letter of those inputs, and the next offset to read,
  are committed together, once every record of the batch is handled. The batch's
  records run concurrently as the agent's ordering allows (``key``: one record of a key
  at a time, in offset order; ``partition``: one at a time; ``none``: all at once), at
  most ``Agent(concurrency=)`` of a batch unfinished at once, so an LLM agent's
  throughput is its concurrency / call latency, not partitions / call latency. A
  hold keeps the records not handled yet for after it: the transaction commits the
  ones before the first of them, or aborts if one after it was handled. A batch of
  one hot key lasts up to concurrency x call latency: keep that below
  ``MESH_RUNTIME__TRANSACTION_TIMEOUT_MS``. A crash (kill -9) mid-transaction leaves nothing of it
  visible to ``read_committed`` readers, and its inputs are handled again by the next
  owner: the output log holds each output once.
* The agent reads its inputs ``read_committed`` (and restores its state tables so), so
  a chain of exactly-once agents never sees an aborted output. Other readers choose:
  ``MESH_KAFKA__ISOLATION_LEVEL=read_committed`` (``mesh tap``, ``TopicReader``) or
  ``TopicReader(..., isolation_level="read_committed")``.
* Timers are not consume-transform-produce: their emits go through the process's
  shared producer, at least once, as with at-least-once agents.
* A transaction that cannot commit (the broker gone, a fence) stops the agent loudly;
  nothing of it is visible and its inputs are redelivered when the agent runs again.

Brokers without transactions (the embedded broker: InitProducerId fails) are refused at
start by :func:`require_transactions`, naming the setting.

Example:
    >>> @agent(consumes=orders, produces=invoices, exactly_once=True)  # doctest: +SKIP
    ... async def billing(order: Order, ctx: Context) -> Invoice: ...
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.agent import Agent
from mesh.config import MeshSettings
from mesh.envelope import now_ms
from mesh.errors import ConfigError, TransportError
from mesh.kafka.base import Acks, BaseProducer, OutRecord, Partition, Record
from mesh.kafka.transactional import Fenced, TransactionalProducer
from mesh.runtime import retry
from mesh.runtime.lanes import Handle, Lane, Lanes, Spawn
from mesh.runtime.runner import AgentRunner, Deadline, bounded
from mesh.serde.codec import Codec

logger = logging.getLogger(__name__)

SETTING = "Agent(exactly_once=True) / MESH_RUNTIME__EXACTLY_ONCE=true"


def exactly_once(agent: Agent[Any], settings: MeshSettings) -> bool:
    """Whether ``agent`` runs exactly-once: its own setting, else the global one."""
    return (agent.exactly_once if agent.exactly_once is not None
            else settings.runtime.exactly_once)


def transactional_id(group: str, partition: Partition) -> str:
    """The transactional id of a consumed partition: ``<group>-<topic>-<partition>``."""
    return f"{group}-{partition.topic}-{partition.partition}"


def runner_for(agent: Agent[Any], settings: MeshSettings, *, producer: BaseProducer,
               codec: Codec, deadline: Deadline | None = None) -> AgentRunner:
    """The runner ``agent`` needs: transactional when it runs exactly-once."""
    kind = TransactionalRunner if exactly_once(agent, settings) else AgentRunner
    return kind(agent, settings, producer=producer, codec=codec, deadline=deadline)


async def require_transactions(settings: MeshSettings, agents: Sequence[Agent[Any]]) -> None:
    """Refuse to start exactly-once agents on a broker without transactions.

    Registers a probe transactional id (InitProducerId); the embedded broker fails it.
    Raises :class:`~mesh.errors.ConfigError` naming the agents, the setting and the fix.
    Does nothing when no agent runs exactly-once.
    """
    chosen = [a for a in agents if exactly_once(a, settings)]
    if not chosen:
        return
    names = [a.name for a in chosen]
    probe = TransactionalProducer(settings.kafka, f"{chosen[0].group}-probe")
    try:
        async with asyncio.timeout(settings.kafka.request_timeout_ms / 1000):
            await probe.start()
    except (TransportError, TimeoutError) as exc:
        broker = ("the embedded broker has none" if settings.kafka.embedded_profile
                  else f"the broker at {settings.kafka.bootstrap_servers} refused them")
        raise ConfigError(
            f"Agent(s) {names} run exactly-once ({SETTING}), which needs a broker with "
            f"Kafka transactions, and {broker} (InitProducerId: {exc or 'no answer'}). Run "
            "them on Apache Kafka (`mesh broker --kafka`, then "
            "MESH_KAFKA__BOOTSTRAP_SERVERS=...), or turn exactly-once off "
            "(MESH_RUNTIME__EXACTLY_ONCE=false, Agent(exactly_once=False)): at-least-once "
            "with deterministic event ids is the default.") from exc
    finally:
        await bounded(probe.stop(), settings.runtime.shutdown_timeout_s,
                      "stopping the transactions probe")


@dataclass(slots=True)
class _Owned:
    """A consumed partition this replica owns: its producer and where it starts."""

    producer: TransactionalProducer
    start: int | None  # the committed offset once fenced; records below it are done
    open: bool = False  # a transaction is open


@dataclass(slots=True)
class _Batch:
    """The records of one transaction, handled concurrently as the agent's ordering
    allows: one worker per order key takes that key's records in offset order."""

    taken: list[Record] = field(default_factory=list)  # in offset order
    handled: dict[int, Acks] = field(default_factory=dict)  # offset -> its outputs' acks
    keys: dict[Any, deque[Record]] = field(default_factory=dict)  # waiting, per order key
    workers: set[asyncio.Task[None]] = field(default_factory=set)
    failure: BaseException | None = None  # a worker's error: the transaction aborts
    stopped: bool = False  # a worker left records unhandled (a hold, a stop)

    @property
    def unfinished(self) -> int:
        """Records taken and not handled yet."""
        return len(self.taken) - len(self.handled)

    def left(self) -> list[Record]:
        """The taken records not handled, in offset order."""
        return [r for r in self.taken if r.offset not in self.handled]

    def worker_done(self, lane: Lane, worker: asyncio.Task[None]) -> None:
        """Forget a finished worker, keep its error (the first one) and wake the lane."""
        self.workers.discard(worker)
        if not worker.cancelled() and worker.exception() is not None:
            self.failure = self.failure or worker.exception()
        lane.wakeup.set()


class TransactionalLanes(Lanes):
    """Lanes that handle their records in Kafka transactions, one per batch, each with
    its partition's own transactional producer; offsets are committed in the
    transactions, never by the consumer (see the module docstring).

    Example:
        >>> await lanes.own(partitions)  # doctest: +SKIP
        >>> lanes.open(partition)  # doctest: +SKIP
    """

    def __init__(self, agent: Agent[Any], settings: MeshSettings, *, handle: Handle,
                 spawn: Spawn, ready: asyncio.Event, held_until: Callable[[], float]) -> None:
        super().__init__(agent, settings, handle=handle, spawn=spawn, ready=ready,
                         held_until=held_until)
        self.owned: dict[Partition, _Owned] = {}
        self.transactions = 0  # committed
        self.aborted = 0
        # Records of a transaction unfinished at once: the agent's concurrency (its
        # slots bound the replica as a whole); one by partition order, so that a
        # transaction lasts one record's handling past transaction_max_ms, as before.
        self.window = (1 if agent.ordering == "partition"
                       else agent.concurrency or settings.runtime.concurrency)

    async def own(self, partitions: Sequence[Partition]) -> None:
        """Register the transactional ids of the new ``partitions`` (fencing their
        previous owner) and read where each starts."""
        new = [p for p in partitions if p not in self.owned]
        producers = {p: TransactionalProducer(
            self.settings.kafka, transactional_id(self.agent.group, p),
            timeout_ms=self.settings.runtime.transaction_timeout_ms) for p in new}
        try:
            # InitProducerId fences the previous owner and settles its open transaction
            # (aborted, or completed if it was committing) before returning ...
            await asyncio.gather(*(producer.start() for producer in producers.values()))
        except BaseException:
            for producer in producers.values():
                await bounded(producer.stop(), self.close_timeout, "a producer")
            raise
        assert self.consumer is not None
        for partition, producer in producers.items():
            # ... so the committed offset read now is final; aiokafka may have fetched
            # from an older one before this callback ran: those records are skipped.
            start = await self.consumer.committed(partition)
            self.owned[partition] = _Owned(producer, start)

    async def release(self, partitions: Sequence[Partition]) -> None:
        """Stop the producers of ``partitions`` (their lanes are closed)."""
        for partition in partitions:
            owned = self.owned.pop(partition)
            await bounded(owned.producer.stop(), self.close_timeout,
                          f"agent {self.agent.name}: stopping the producer of {partition}")

    async def commit(self, lanes: Sequence[Lane] | None = None) -> None:
        """Offsets are committed in the transactions, never by the consumer."""

    async def send(self, record: Record, records: list[OutRecord]) -> Acks:
        """Send what handling ``record`` produced in its partition's open transaction."""
        owned = self.owned.get(record.position)
        if owned is None or not owned.open:
            raise Fenced(f"agent {self.agent.name}: {record.topic}[{record.partition}] "
                         "has no open transaction (the partition was revoked).")
        return await owned.producer.send_many(records)

    def _hand_out(self, lane: Lane) -> float | None:
        """Records wait for the lane's transaction (:meth:`drain`), not for workers."""
        return None

    async def drain(self, lane: Lane) -> None:
        """Handle the lane's records in transactions, one per batch, until stopped."""
        try:
            while not lane.stopping:
                if await self._ready(lane):
                    await self._transaction(lane)
        except Fenced as exc:
            logger.error("agent %s stops: %s", self.agent.name, exc)
            raise
        finally:
            owned = self.owned.get(lane.partition)
            if owned is not None and owned.open:  # cancelled or failed mid-transaction
                await self._abort(lane.partition, owned)

    async def _ready(self, lane: Lane) -> bool:
        """Wait (once) for what keeps the lane from starting a transaction now; True
        when it can start one."""
        if not lane.backlog or lane.partition not in self.owned:
            lane.wakeup.clear()
            if (not lane.backlog or lane.partition not in self.owned) and not lane.stopping:
                await lane.wakeup.wait()  # set by the poll loop, assign and stopping
            return False
        if not self.ready.is_set():
            lane.wakeup.clear()
            if not self.ready.is_set() and not lane.stopping:
                await lane.wakeup.wait()
            return False
        if self.held:
            await lane.wait_until(self.held_until())
            return False
        head = lane.backlog[0]
        if retry.is_for(head, self.agent.group) and retry.due_ms(head) > now_ms():
            await lane.wait_until(retry.due_ms(head) / 1000)
            return False
        return True

    async def _transaction(self, lane: Lane) -> None:
        """One transaction: take the lane's records as they come, each handed to the
        worker of its order key (:meth:`_work_key`, so that they run concurrently as the
        agent's ordering allows), at most :attr:`window` of them unfinished at once,
        until ``transaction_max_ms`` have passed (as Kafka Streams' commit interval:
        fewer, larger transactions), ``transaction_max_records`` are taken, or a record
        must wait; then, once every taken record is handled, commit them with the offset
        after the last one (:meth:`_settle`). A worker's error aborts the batch."""
        runtime = self.settings.runtime
        owned = self.owned[lane.partition]
        deadline = time.monotonic() + runtime.transaction_max_ms / 1000
        batch = _Batch()
        try:
            while len(batch.taken) < runtime.transaction_max_records:
                # Cleared before looking: a record, a handled input, a failure or a stop
                # that comes after this wakes the linger.
                lane.wakeup.clear()
                if batch.failure is not None or batch.stopped:
                    break
                if not lane.backlog or batch.unfinished >= self.window:
                    if not await self._linger(lane, deadline if owned.open else 0.0):
                        break
                    continue
                record = lane.backlog[0]
                if owned.start is not None and record.offset < owned.start:
                    lane.backlog.popleft()  # committed by the partition's previous owner
                    continue
                if lane.stopping or self.held or (batch.taken and time.monotonic() > deadline):
                    break
                mine = retry.is_for(record, self.agent.group)
                if mine and retry.due_ms(record) > now_ms():
                    break
                if not owned.open:
                    await owned.producer.begin()
                    owned.open = True
                self._enqueue(lane, batch, lane.backlog.popleft(), mine=mine)
            await self._complete(batch)
        finally:
            for worker in batch.workers:  # only left on a failure or a cancel
                worker.cancel()
            if batch.workers:
                await asyncio.wait(set(batch.workers))
        if owned.open:
            await self._settle(lane, owned, batch)

    @staticmethod
    async def _linger(lane: Lane, deadline: float) -> bool:
        """Wait for the lane's wakeup (more records, a handled input) until ``deadline``
        (monotonic); False when the time is up or the lane stops."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or lane.stopping:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lane.wakeup.wait(), remaining)
        return True

    def _enqueue(self, lane: Lane, batch: _Batch, record: Record, *, mine: bool) -> None:
        """Add ``record`` to the batch: queued for the worker of its order key (started
        if the key has none), or done at once when it is another group's retry (nothing
        to do but move past it)."""
        batch.taken.append(record)
        if not mine:
            batch.handled[record.offset] = Acks([])
            return
        key = self._order_key(record)
        queue = batch.keys.get(key)
        if queue is not None:  # its key's worker takes it after the ones before it
            queue.append(record)
            return
        queue = batch.keys[key] = deque([record])
        worker = asyncio.create_task(self._work_key(lane, batch, key, queue),
                                     name=f"{self.agent.name}:{lane.partition}:worker")
        batch.workers.add(worker)
        worker.add_done_callback(functools.partial(batch.worker_done, lane))

    async def _work_key(self, lane: Lane, batch: _Batch, key: Any,
                        queue: deque[Record]) -> None:
        """Handle the batch's records of one order key in offset order, each under a
        handler slot (the agent's concurrency and rate, as at-least-once). Stops, leaving
        the rest unhandled (``batch.stopped``), when the agent holds or the lane stops."""
        try:
            while queue:
                if self.held or lane.stopping or batch.stopped:
                    batch.stopped = True
                    return
                record = queue[0]
                async with self.slots:
                    acks = None if lane.stopping else await self.handle(record)
                if acks is None:  # held or stopping: handed over again later
                    batch.stopped = True
                    return
                queue.popleft()
                batch.handled[record.offset] = acks
                lane.wakeup.set()
        finally:
            if batch.keys.get(key) is queue:
                del batch.keys[key]

    @staticmethod
    async def _complete(batch: _Batch) -> None:
        """Wait until every worker of the batch is done; raise the first one's error."""
        while batch.workers and batch.failure is None:
            await asyncio.wait(set(batch.workers), return_when=asyncio.FIRST_COMPLETED)
        if batch.failure is not None:
            raise batch.failure

    async def _settle(self, lane: Lane, owned: _Owned, batch: _Batch) -> None:
        """Commit the batch with the offset after its last record. When a hold or a stop
        left records unhandled, they go back to the front of the backlog with every
        record after the first of them; the transaction commits the records before it,
        or is aborted (all of the batch back in the backlog) when a record after it was
        handled: its outputs are in the transaction and cannot be taken out."""
        taken = batch.taken
        left = batch.left()
        if left:
            first = left[0].offset
            kept = [r for r in taken if r.offset < first]
            if any(offset > first for offset in batch.handled):
                kept = []
            lane.backlog.extendleft(reversed(taken[len(kept):]))
            taken = kept
        after = taken[-1].offset + 1 if taken else None
        await self._finish(lane, owned, [batch.handled[r.offset] for r in taken], after)

    async def _finish(self, lane: Lane, owned: _Owned, taken: list[Acks],
                      after: int | None) -> None:
        """Commit the open transaction with the offset ``after`` (abort it if nothing
        was taken); an error aborts it and stops the agent."""
        if after is None:
            await self._abort(lane.partition, owned)
            return
        try:
            for acks in taken:
                await acks.wait()
            await owned.producer.commit({lane.partition: after}, self.agent.group)
        except Fenced:
            owned.open = False  # a fenced producer can neither commit nor abort
            raise
        except TransportError as exc:
            await self._abort(lane.partition, owned)
            raise TransportError(
                f"agent {self.agent.name}: the transaction of {lane.partition.topic}"
                f"[{lane.partition.partition}] up to offset {after} failed and was "
                f"aborted: {exc}. The agent stops; nothing of it is visible to "
                "read_committed readers and its inputs are handled again when the agent "
                "runs again.") from exc
        owned.open = False
        self.transactions += 1
        lane.done = lane.committed = after

    async def _abort(self, partition: Partition, owned: _Owned) -> None:
        owned.open = False
        self.aborted += 1
        with contextlib.suppress(TransportError, TimeoutError):
            async with asyncio.timeout(self.close_timeout):
                await owned.producer.abort()
                return
        logger.warning("agent %s: the transaction of %s could not be aborted; the broker "
                       "aborts it after MESH_RUNTIME__TRANSACTION_TIMEOUT_MS, or the next "
                       "owner's producer does at once", self.agent.name, partition)


class TransactionalRunner(AgentRunner):
    """Runs an agent exactly-once: per consumed partition, batches of inputs are handled
    in one Kafka transaction with their offsets (see the module docstring). It is the
    at-least-once runner with :class:`TransactionalLanes`, whose transactions carry
    what the processor sends, and which fence a partition's previous owner on assign.

    Example:
        >>> runner = TransactionalRunner(billing, settings, producer=producer,
        ...                              codec=codec)  # doctest: +SKIP
        >>> await runner.run(stop_event)  # doctest: +SKIP
    """

    lanes_kind = TransactionalLanes
    lanes: TransactionalLanes

    def __init__(self, agent: Agent[Any], settings: MeshSettings, *, producer: BaseProducer,
                 codec: Codec, deadline: Deadline | None = None) -> None:
        # Inputs and state tables are read committed: never an aborted transaction's.
        kafka = settings.kafka.model_copy(update={"isolation_level": "read_committed"})
        super().__init__(agent, settings.model_copy(update={"kafka": kafka}),
                         producer=producer, codec=codec, deadline=deadline)
        self.processor.send = self.lanes.send
        self.processor.state_first = False  # the transaction shows outputs and state together

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await super().run(stop)
        finally:
            await self.lanes.release(list(self.lanes.owned))

    async def assign(self, partitions: list[Partition]) -> None:
        await self.lanes.own(partitions)
        await super().assign(partitions)

    async def revoke(self, partitions: list[Partition]) -> None:
        await super().revoke(partitions)  # lanes commit their transactions first
        await self.lanes.release([p for p in partitions if p in self.lanes.owned])
