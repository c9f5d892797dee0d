"""The mesh's producer's send path: records sent one by one, gathered per partition
and handed to aiokafka as whole batches (its batch API) instead of one
``AIOKafkaProducer.send`` per record (:class:`mesh.kafka.transport.Producer` uses it).

A record is appended, when it is sent, to its partition's open batch (its key's
partition, by the default partitioner, as aiokafka would pick it; the topic's
partitions are read from the client's metadata once and again whenever a partition's
batches are all handed over), stamped with the time it was sent. One task per
partition with batches to hand over gives them to aiokafka in order; aiokafka takes a
partition's next batch once the one before it has gone out, and until it does, the
open batch keeps taking records. A batch handed over is closed, so aiokafka sends it
at once instead of holding it ``linger_ms`` for records that can no longer join it
(the gathering was done here). A partition's records keep the order they were sent
in; each record's ack resolves to its own partition and offset. This spares each
record aiokafka's metadata wait, partitioner call, accumulator lookup and future:
docs/performance.md, "The runtime's sends in batches".

Example:
    >>> gathered = Gathered()  # doctest: +SKIP
    >>> partitions = await gathered.partitions_of(client, "orders")  # doctest: +SKIP
    >>> ack = gathered.put(client, OutRecord("orders", b"v", b"k"), partitions)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.errors import IllegalOperation, KafkaError

from mesh.errors import TransportError
from mesh.kafka.base import OutRecord, transport_error
from mesh.kafka.murmur import default_partitioner

# A batch being filled or handed over: aiokafka's builder, its records' acks (None for
# a record whose caller waits for the whole batch) and the batch's own ack.
AckList = list["asyncio.Future[Any] | None"]
Batch = tuple[Any, AckList, "asyncio.Future[Sent]"]


class Sent(NamedTuple):
    """Where an acknowledged record landed (what its ack resolves to)."""

    partition: int
    offset: int


class _Batches:
    """One partition's batches not yet handed to aiokafka, oldest first; the last one
    takes records (until aiokafka has it)."""

    __slots__ = ("batches", "task")

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.task: asyncio.Task[None] | None = None


class Gathered:
    """The records of one producer gathered per partition, and the tasks handing them
    to aiokafka."""

    def __init__(self) -> None:
        # (topic, partition): its batches; a partition is here exactly while its task runs.
        self._pending: dict[tuple[str, int], _Batches] = {}
        self.partitions: dict[str, list[int]] = {}  # per topic, from the client's metadata

    async def partitions_of(self, client: AIOKafkaProducer, topic: str) -> list[int]:
        """``topic``'s partitions, waiting for its metadata (when it is not known yet)."""
        try:
            known = await client.partitions_for(topic)
        except KafkaError as exc:
            raise transport_error(exc, f"Producing to {topic}") from exc
        partitions = self.partitions[topic] = sorted(known)
        return partitions

    def put(self, client: AIOKafkaProducer, record: OutRecord,
            partitions: list[int]) -> asyncio.Future[Any]:
        """Append ``record`` to its partition's open batch (its partition is one of
        ``partitions``, its topic's) and start the partition's task if none runs; the
        record's ack. Raises what aiokafka raises for a record it cannot encode."""
        acks, index, _ = self.place(client, record, partitions)
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        acks[index] = ack
        return ack

    def place(self, client: AIOKafkaProducer, record: OutRecord, partitions: list[int]
              ) -> tuple[AckList, int, asyncio.Future[Sent]]:
        """:meth:`put` without an ack of the record's own: the acks of its batch, its
        index there (its offset in the batch) and the batch's ack (to the partition and
        offset of the batch's first record), for a caller that waits for whole batches."""
        partition, key = record.partition, record.key
        if partition is None:
            partition = default_partitioner(key, partitions, partitions)
        elif partition not in partitions:
            raise TransportError(f"Producing to {record.topic} failed: it has no partition "
                                 f"{partition} (partitions {partitions[0]}-{partitions[-1]})")
        where = (record.topic, partition)
        pending = self._pending.get(where) or _Batches()  # kept once it holds a record
        at = int(time.time() * 1000)  # the record's time is when it was sent, as with send()
        headers = list(record.headers)
        if pending.batches:
            batch, acks, landed = pending.batches[-1]
            appended = batch.append(timestamp=at, key=key, value=record.value,
                                    headers=headers) is not None
        else:
            appended = False
        if not appended:  # a new batch: the first, or the open one is full
            batch, acks = client.create_batch(), []
            if batch.append(timestamp=at, key=key, value=record.value,
                            headers=headers) is None:  # an empty batch takes any record
                raise TransportError(f"Producing to {record.topic} failed: aiokafka took "
                                     "no record into an empty batch")
            landed = asyncio.get_running_loop().create_future()
            pending.batches.append((batch, acks, landed))
        acks.append(None)
        if pending.task is None:
            self._pending[where] = pending
            pending.task = asyncio.create_task(self._hand_over(client, where, pending))
        return acks, len(acks) - 1, landed

    async def drain(self) -> None:
        """Return once every batch has been handed to aiokafka (or failed)."""
        while self._pending:
            await asyncio.wait([p.task for p in self._pending.values() if p.task is not None])

    async def _hand_over(self, client: AIOKafkaProducer, where: tuple[str, int],
                         pending: _Batches) -> None:
        """Hand ``where``'s batches to aiokafka in order until none is left. While
        aiokafka waits for the partition's batch before it to go out, the batch being
        handed over still takes records if it is the open one."""
        topic, partition = where
        try:
            while pending.batches:
                batch, acks, landed = pending.batches[0]
                sent = await client.send_batch(batch, topic, partition=partition)
                # aiokafka has it from here: nothing more goes in (no await since), so
                # closed, as a full batch is: aiokafka would otherwise hold it for
                # linger_ms for records that can no longer come (the gathering was here).
                pending.batches.pop(0)
                batch.close()
                _settle_when_sent(sent, acks, landed, partition)
            known = client.client.cluster.partitions_for_topic(topic)
            if known and len(known) != len(self.partitions.get(topic, ())):
                self.partitions[topic] = sorted(known)  # the topic grew (or was recreated)
        except BaseException as exc:
            # aiokafka's errors, KafkaError or not (IllegalOperation: a transactional
            # producer's batch outside a transaction), as the mesh's TransportError
            failed = transport_error(exc, f"Producing to {topic}") if isinstance(
                exc, (KafkaError, IllegalOperation)) else exc
            for _, acks, landed in pending.batches:
                _fail(acks, landed, failed if isinstance(exc, Exception) else None)
            if not isinstance(exc, Exception):
                raise
        finally:
            del self._pending[where]


def _settle_when_sent(sent: asyncio.Future[Any], acks: AckList,
                      landed: asyncio.Future[Sent], partition: int) -> None:
    """Resolve the batch's ack and each record's when the batch ``sent`` is
    acknowledged (to the record's own offset) or failed (to its error)."""
    def settle(done: asyncio.Future[Any]) -> None:
        error = TransportError("Producing failed: the batch was cancelled") if (
            done.cancelled()) else done.exception()
        if error is not None:
            _fail(acks, landed, error)
            return
        base = done.result().offset
        if not landed.done():
            landed.set_result(Sent(partition, base))
        for relative, ack in enumerate(acks):
            if ack is not None and not ack.done():
                ack.set_result(Sent(partition, base + relative))

    sent.add_done_callback(settle)


def _fail(acks: AckList, landed: asyncio.Future[Sent], error: BaseException | None) -> None:
    """Fail a batch's acks with ``error`` (cancel them when None). The batch's own ack is
    marked read: its records' acks tell the caller when none waits on it."""
    for ack in (*acks, landed):
        if ack is None or ack.done():
            continue
        if error is None:
            ack.cancel()
        else:
            ack.set_exception(error)
    if not landed.cancelled():
        landed.exception()
