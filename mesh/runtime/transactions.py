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
* A partition's lane handles the records of a poll in one transaction (at most
  ``MESH_RUNTIME__TRANSACTION_MAX_RECORDS`` records and
  ``MESH_RUNTIME__TRANSACTION_MAX_MS`` of work): every output, state write, audit
  record, retry record and dead letter of those inputs, and the next offset to read,
  are committed together. A crash (kill -9) mid-transaction leaves nothing of it
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
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mesh.agent import Agent
from mesh.config import MeshSettings
from mesh.envelope import now_ms
from mesh.errors import ConfigError, TransportError
from mesh.kafka.base import Acks, BaseProducer, OutRecord, Partition, Record
from mesh.kafka.transport import Fenced, TransactionalProducer
from mesh.runtime import retry
from mesh.runtime.lanes import Handle, Lane, Lanes, Spawn
from mesh.runtime.runner import AgentRunner, bounded
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
               codec: Codec) -> AgentRunner:
    """The runner ``agent`` needs: transactional when it runs exactly-once."""
    kind = TransactionalRunner if exactly_once(agent, settings) else AgentRunner
    return kind(agent, settings, producer=producer, codec=codec)


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
        """One transaction: handle the lane's records as they come until
        ``transaction_max_ms`` have passed (as Kafka Streams' commit interval: fewer,
        larger transactions), ``transaction_max_records`` are taken, or a record must
        wait; then commit them with the offset after the last one."""
        runtime = self.settings.runtime
        owned = self.owned[lane.partition]
        deadline = time.monotonic() + runtime.transaction_max_ms / 1000
        taken: list[Acks] = []
        after: int | None = None  # the offset to commit
        while len(taken) < runtime.transaction_max_records:
            if not lane.backlog:
                if not await self._linger(lane, deadline if owned.open else 0.0):
                    break
                continue
            record = lane.backlog[0]
            if owned.start is not None and record.offset < owned.start:
                lane.backlog.popleft()  # committed by the partition's previous owner
                continue
            if lane.stopping or self.held or (taken and time.monotonic() > deadline):
                break
            mine = retry.is_for(record, self.agent.group)
            if mine and retry.due_ms(record) > now_ms():
                break
            if not owned.open:
                await owned.producer.begin()
                owned.open = True
            lane.backlog.popleft()
            if mine:
                async with self.slots:  # the agent's concurrency and rate, as at-least-once
                    acks = await self.handle(record)
                if acks is None:  # held: commit what is done, try it again after the hold
                    lane.backlog.appendleft(record)
                    break
                taken.append(acks)
            else:  # another group's retry: nothing to do but move past it
                taken.append(Acks([]))
            after = record.offset + 1
        if owned.open:
            await self._finish(lane, owned, taken, after)

    @staticmethod
    async def _linger(lane: Lane, deadline: float) -> bool:
        """Wait for more records until ``deadline`` (monotonic); False when the time is
        up or the lane stops."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or lane.stopping:
            return False
        lane.wakeup.clear()
        if not lane.backlog and not lane.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.wakeup.wait(), remaining)
        return True

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
                 codec: Codec) -> None:
        # Inputs and state tables are read committed: never an aborted transaction's.
        kafka = settings.kafka.model_copy(update={"isolation_level": "read_committed"})
        super().__init__(agent, settings.model_copy(update={"kafka": kafka}),
                         producer=producer, codec=codec)
        self.processor.send = self.lanes.send

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
