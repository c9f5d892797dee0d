"""The mesh's producer's send path: records sent one by one, gathered per partition
and handed to aiokafka as whole batches (its batch API) instead of one
``AIOKafkaProducer.send`` per record (:class:`mesh.kafka.transport.Producer` uses it).

A record is queued with its partition (its key's, by the default partitioner, as
aiokafka would pick it; the topic's partitions are read from the client's metadata
once and again whenever a partition's queue empties) and stamped with the time it was
sent. One task per partition with queued records builds them into batches and queues
each in aiokafka once the partition's batch before it has gone out, so what is sent
meanwhile goes out together in the next. A partition's records keep the order they
were sent in; each record's ack resolves to its own partition and offset. This spares
each record aiokafka's metadata wait, partitioner call, accumulator lookup and future:
bench/README.md, "The runtime's sends in batches".

Example:
    >>> gathered = Gathered()  # doctest: +SKIP
    >>> partitions = await gathered.partitions_of(client, "orders")  # doctest: +SKIP
    >>> ack = gathered.put(client, OutRecord("orders", b"v", b"k"), partitions)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from mesh.errors import TransportError
from mesh.kafka.base import OutRecord, transport_error
from mesh.kafka.murmur import partition_for

# A queued record: the record, when it was sent (ms since the epoch), its ack.
Queued = tuple[OutRecord, int, "asyncio.Future[Any]"]


class Sent(NamedTuple):
    """Where an acknowledged record landed (what its ack resolves to)."""

    partition: int
    offset: int


class Gathered:
    """The records of one producer queued per partition, and the tasks sending them."""

    def __init__(self) -> None:
        # (topic, partition): its queued records; a partition is here exactly while its
        # task (in _senders) runs.
        self._queued: dict[tuple[str, int], list[Queued]] = {}
        self._senders: dict[tuple[str, int], asyncio.Task[None]] = {}
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
        """Queue ``record`` for its partition (one of ``partitions``, its topic's) and
        start the partition's sender if none runs; the record's ack."""
        partition, key = record.partition, record.key
        if partition is None:
            partition = (random.choice(partitions) if key is None
                         else partitions[partition_for(key, len(partitions))])
        elif partition not in partitions:
            raise TransportError(f"Producing to {record.topic} failed: it has no partition "
                                 f"{partition} (partitions {partitions[0]}-{partitions[-1]})")
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        at = int(time.time() * 1000)  # the record's time is when it was sent, as with send()
        where = (record.topic, partition)
        queued = self._queued.get(where)
        if queued is None:
            self._queued[where] = [(record, at, ack)]
            self._senders[where] = asyncio.create_task(self._send_queued(client, where))
        else:
            queued.append((record, at, ack))
        return ack

    async def drain(self) -> None:
        """Return once everything queued has been handed to aiokafka (or failed)."""
        while self._senders:
            await asyncio.wait(list(self._senders.values()))

    async def _send_queued(self, client: AIOKafkaProducer, where: tuple[str, int]) -> None:
        """Send what is queued for ``where`` as batches until nothing is left; each
        batch is queued in aiokafka once the partition's batch before it went out."""
        topic, partition = where
        queued = self._queued[where]
        members: list[Queued] = []  # of the open batch
        position = 0  # in queued: the records before it are in members or sent batches
        try:
            while queued:
                self._queued[where] = []  # what is sent meanwhile goes in the next round
                batch, members = client.create_batch(), []
                for position, item in enumerate(queued):  # noqa: B007 (read on failure)
                    record, at, ack = item
                    try:  # a full batch goes out; a new one always takes a record
                        while batch.append(timestamp=at, key=record.key, value=record.value,
                                           headers=list(record.headers)) is None:
                            sent = await client.send_batch(batch, topic, partition=partition)
                            _settle_when_sent(sent, members, partition)
                            batch, members = client.create_batch(), []
                    except (TypeError, ValueError) as exc:  # this record's own fault
                        ack.set_exception(exc)
                        continue
                    members.append(item)
                position = len(queued)
                sent = await client.send_batch(batch, topic, partition=partition)
                _settle_when_sent(sent, members, partition)
                queued, members, position = self._queued[where], [], 0
            known = client.client.cluster.partitions_for_topic(topic)
            if known and len(known) != len(self.partitions.get(topic, ())):
                self.partitions[topic] = sorted(known)  # the topic grew (or was recreated)
        except BaseException as exc:
            failed = transport_error(exc, f"Producing to {topic}") if isinstance(
                exc, KafkaError) else exc
            for _, _, ack in (*members, *queued[position:], *self._queued[where]):
                if ack.done():
                    continue
                if isinstance(exc, Exception):
                    ack.set_exception(failed)
                else:
                    ack.cancel()
            if not isinstance(exc, Exception):
                raise
        finally:
            del self._queued[where], self._senders[where]


def _settle_when_sent(sent: asyncio.Future[Any], members: list[Queued],
                      partition: int) -> None:
    """Resolve each member's ack when the batch ``sent`` is acknowledged (to the
    record's own offset) or failed (to its error)."""
    def settle(done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            error: BaseException | None = TransportError(
                "Producing failed: the batch was cancelled")
        else:
            error = done.exception()
        base = -1 if error is not None else done.result().offset
        for relative, (_, _, ack) in enumerate(members):
            if ack.done():
                continue
            if error is not None:
                ack.set_exception(error)
            else:
                ack.set_result(Sent(partition, base + relative))

    sent.add_done_callback(settle)
