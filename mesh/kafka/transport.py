"""aiokafka's producer and consumer behind the mesh's types (:mod:`mesh.kafka.admin` is
the admin client; only mesh/kafka/ imports aiokafka).

Everything above it sees :class:`Record` and :class:`Partition`, and mesh errors instead
of aiokafka's. Delivery settings are fixed here: producers wait for ``acks=all`` and are
idempotent except with the embedded profile (the embedded broker does not support
InitProducerId; ``KafkaSettings.idempotent_producer``); consumers never auto-commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from itertools import chain
from typing import Any, Self

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    TopicPartition,
)
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import (
    CommitFailedError,
    CorruptRecordException,
    IllegalStateError,
    KafkaError,
    RebalanceInProgressError,
    UnsupportedCodecError,
)

from mesh.config import KafkaSettings
from mesh.errors import CommitFailed, TransportError, UnreadableBatch
from mesh.kafka.base import (
    Acks,
    BaseProducer,
    OutRecord,
    Partition,
    RebalanceCallback,
    Record,
    transport_error,
)
from mesh.kafka.gather import Gathered
from mesh.kafka.holes import Holes
from mesh.kafka.murmur import default_partitioner

logger = logging.getLogger(__name__)

# The producer may need to dead-letter a record larger than the mesh's own limit.
MAX_REQUEST_BYTES = 16 * 1024 * 1024
# How much longer than its timeout a poll may wait. aiokafka's getmany waits for a
# rebalance's assignment whatever its timeout, so a poll loop would not see its stop
# while a rebalance does not end (a member frozen, or a broker that never completes it).
POLL_GRACE_S = 1.0
# How long a poll may wait for a partition's committed offset (the holes check's start).
COMMITTED_WAIT_S = 5.0


def _headers(headers: Sequence[tuple[str, bytes | None]] | None
             ) -> tuple[tuple[str, bytes], ...]:
    """A consumed record's headers, a null value as empty bytes. aiokafka gives a tuple
    of (name, bytes or None) pairs: kept as it is unless a value is null (looked for in
    C: this runs for every consumed record)."""
    if not headers:
        return ()
    if None in chain.from_iterable(headers):
        return tuple((k, b"" if v is None else bytes(v)) for k, v in headers)
    found: Any = headers  # no null value: the pairs are (str, bytes)
    return found if type(found) is tuple else tuple(found)


def _tp(p: Partition) -> TopicPartition:
    return TopicPartition(p.topic, p.partition)


class Client:
    """Start/stop (each safe to call twice) and the async context manager, shared by the
    producer, consumer and admin wrappers."""

    _client: Any
    _role = "client"

    def __init__(self) -> None:
        self._started = False

    async def start(self) -> None:
        if not self._started:
            try:
                await self._client.start()
            except KafkaError as exc:
                raise transport_error(exc, f"Starting the {self._role}") from exc
            self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._close()

    async def _close(self) -> None:
        # aiokafka 0.14: stopping a consumer whose fetch task has not run once yet raises
        # CancelledError; let it run first.
        await asyncio.sleep(0)
        await self._client.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class Producer(Client, BaseProducer):
    """Produces records and waits for the broker's acknowledgement.

    Records are gathered per partition and handed to aiokafka as whole batches
    (:mod:`mesh.kafka.gather`): a partition's records keep the order they were sent
    in, each is stamped with the time it was sent, and ``stop()`` sends what is queued
    before it disconnects.

    Example:
        >>> async with Producer(settings) as producer:  # doctest: +SKIP
        ...     await producer.send_all([OutRecord("t", b"v")])
    """

    _role = "producer"
    _auto_idempotence = False  # idempotent by default, not by an explicit setting

    def __init__(self, settings: KafkaSettings) -> None:
        super().__init__()
        self._settings = settings
        self._auto_idempotence = settings.idempotence is None and settings.idempotent_producer
        self._client = self._make(idempotent=settings.idempotent_producer)
        self._gathered = Gathered()  # the transactional producer has one too

    def _make(self, *, idempotent: bool) -> AIOKafkaProducer:
        settings = self._settings
        return AIOKafkaProducer(
            **settings.client_kwargs(), acks=-1 if settings.acks == "all" else int(settings.acks),
            enable_idempotence=idempotent, linger_ms=settings.linger_ms,
            max_batch_size=settings.max_batch_size, max_request_size=MAX_REQUEST_BYTES,
            partitioner=default_partitioner,
        )

    async def start(self) -> None:
        try:
            await super().start()
        except TransportError as exc:
            if not self._auto_idempotence:
                raise
            # A broker without InitProducerId (the embedded one reached with the kafka
            # profile, e.g. after `mesh broker`): at-least-once without idempotence, as
            # on the embedded profile; the event ids still dedup downstream.
            logger.warning("the broker refused the idempotent producer (%s): producing "
                           "without idempotence (MESH_KAFKA__IDEMPOTENCE=false says so "
                           "explicitly, MESH_KAFKA__PROFILE=embedded for the embedded "
                           "broker)", exc)
            with contextlib.suppress(Exception):
                await self._client.stop()
            self._auto_idempotence = False
            self._client = self._make(idempotent=False)
            await super().start()

    async def send(self, record: OutRecord) -> Awaitable[Any]:
        """Queue ``record``; the returned awaitable resolves when the broker acks it
        (to the record's partition and offset)."""
        return self._gathered.put(self._client, record,
                                  await self._partitions(self._gathered, record))

    async def send_many(self, records: Iterable[OutRecord]) -> Acks:
        gathered = self._gathered
        client, known = self._client, gathered.partitions
        acks = list[Awaitable[Any]]()
        for record in records:  # send()'s work without a coroutine per record
            partitions = known.get(record.topic) if self._started else None
            if partitions is None:
                partitions = await self._partitions(gathered, record)
            acks.append(gathered.put(client, record, partitions))
        return Acks(acks)

    async def send_all(self, records: Iterable[OutRecord]) -> list[tuple[int, int]]:
        gathered = self._gathered
        client, known = self._client, gathered.partitions
        placed = []  # per record: its batch's ack and its offset in the batch
        for record in records:  # waiting for whole batches: no ack per record
            partitions = known.get(record.topic) if self._started else None
            if partitions is None:
                partitions = await self._partitions(gathered, record)
            _, index, landed = gathered.place(client, record, partitions)
            placed.append((landed, index))
        batches = list(dict.fromkeys(landed for landed, _ in placed))
        firsts = dict(zip(batches, await Acks(list(batches)).wait(), strict=True))
        return [(firsts[landed][0], firsts[landed][1] + index) for landed, index in placed]

    async def _partitions(self, gathered: Gathered, record: OutRecord) -> list[int]:
        """The partitions of ``record``'s topic (waiting for its metadata the first
        time); TransportError when the producer is not started."""
        partitions = gathered.partitions.get(record.topic)
        if partitions is None:
            partitions = await gathered.partitions_of(self._client, record.topic)
        if not self._started:
            raise TransportError(f"Producing to {record.topic} failed: the producer is not "
                                 "started")
        return partitions

    async def _close(self) -> None:
        await self._gathered.drain()  # what is queued goes out first
        await super()._close()


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_assigned: RebalanceCallback, on_revoked: RebalanceCallback,
                 holes: Holes | None) -> None:
        self._assigned, self._revoked, self._holes = on_assigned, on_revoked, holes

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = list(revoked)
        if self._holes is not None:
            self._holes.forget(revoked)
        await self._revoked([Partition(tp.topic, tp.partition) for tp in revoked])

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        assigned = list(assigned)
        if self._holes is not None:  # each starts at its committed offset: looked up later
            self._holes.forget(assigned)
        await self._assigned([Partition(tp.topic, tp.partition) for tp in assigned])


class Consumer(Client):
    """A consumer: in a group with manual commits, or group-less for reading topics.
    ``stop()`` leaves the group. With the embedded profile every delivery is checked for
    records the broker's fetch skipped, which are read again (:mod:`mesh.kafka.holes`).

    Example:
        >>> consumer = Consumer(settings, group_id="writer")  # doctest: +SKIP
        >>> await consumer.start()  # doctest: +SKIP
        >>> consumer.subscribe(["demo.q"], on_assigned=grow, on_revoked=shrink)  # doctest: +SKIP
    """

    _role = "consumer"

    def __init__(self, settings: KafkaSettings, *, group_id: str | None,
                 auto_offset_reset: str = "earliest", max_poll_interval_ms: int | None = None,
                 isolation_level: str | None = None) -> None:
        super().__init__()
        self._group = group_id
        # None: the settings' (read_uncommitted unless MESH_KAFKA__ISOLATION_LEVEL says)
        self.isolation_level = isolation_level or settings.isolation_level
        self._holes = Holes() if settings.embedded_profile else None
        timings = settings.group_timings()
        self._client = AIOKafkaConsumer(
            **settings.client_kwargs(), group_id=group_id, enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset, isolation_level=self.isolation_level,
            max_poll_interval_ms=max_poll_interval_ms or settings.max_poll_interval_ms,
            fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=MAX_REQUEST_BYTES,
            # Range (Kafka's own default, not aiokafka's round robin) gives one member the
            # same partition numbers of every topic it reads: topics keyed alike are
            # co-partitioned, so one replica owns all of a key's state.
            partition_assignment_strategy=(RangePartitionAssignor,),
            # static membership (opt-in): no LeaveGroup at stop, no rebalance on a quick return
            group_instance_id=settings.group_instance_id if group_id else None,
            **timings,
        )

    def subscribe(self, topics: Sequence[str], *, on_assigned: RebalanceCallback,
                  on_revoked: RebalanceCallback) -> None:
        """Join the group for ``topics``; the callbacks run inside each rebalance."""
        self._client.subscribe(list(topics),
                               listener=_Listener(on_assigned, on_revoked, self._holes))

    def unsubscribe(self) -> None:
        """Leave the group's subscription (its partitions move to other members)."""
        self._client.unsubscribe()

    def assign(self, partitions: Sequence[Partition]) -> None:
        """Read ``partitions`` directly, outside any group."""
        tps = [_tp(p) for p in partitions]
        if self._holes is not None:
            self._holes.forget(tps)
        self._client.assign(tps)

    async def partitions_of(self, topic: str) -> list[Partition]:
        """The partitions of ``topic`` from broker metadata (empty if it does not exist)."""
        parts = self._client.partitions_for_topic(topic)
        if parts is None:
            # the consumer's private client: aiokafka has no public metadata refresh
            await self._client._client.force_metadata_update()
            parts = self._client.partitions_for_topic(topic)
        return [Partition(topic, p) for p in sorted(parts or ())]

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Partition, list[Record]]:
        """Fetch what is ready on the assigned, unpaused partitions; nothing when a
        rebalance keeps aiokafka waiting past the timeout (and ``POLL_GRACE_S``)."""
        bound = asyncio.timeout(timeout_ms / 1000 + POLL_GRACE_S)
        try:
            async with bound:
                batches = await self._client.getmany(timeout_ms=timeout_ms,
                                                     max_records=max_records)
        except TimeoutError:
            if not bound.expired():
                raise
            # aiokafka takes records from its buffer without awaiting, so a poll cut
            # while it waits has taken none: they are delivered by a later poll.
            return {}
        except (UnsupportedCodecError, CorruptRecordException) as exc:
            raise _unreadable(exc, self._group) from exc
        except KafkaError as exc:
            raise transport_error(exc, "Fetching") from exc
        if self._holes is not None and batches:
            await self._read_holes_again(batches)
        return {
            Partition(tp.topic, tp.partition): [
                Record(m.topic, m.partition, m.offset, m.key, m.value, _headers(m.headers),
                       m.timestamp)
                for m in msgs]
            for tp, msgs in batches.items()
        }

    async def _read_holes_again(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """Cut each partition's delivery at a hole the embedded broker's fetch left and
        seek back to it (:mod:`mesh.kafka.holes`); a group's partition is checked from
        its committed offset, where its first fetch after an assignment starts."""
        holes = self._holes
        assert holes is not None
        for tp, msgs in list(batches.items()):
            if self._group is not None and not holes.known(tp):
                # Unknown (no answer, or none within the bound: aiokafka retries this
                # request for as long as the coordinator is unavailable): the partition
                # is checked from its first delivery.
                with contextlib.suppress(KafkaError, TimeoutError):
                    async with asyncio.timeout(COMMITTED_WAIT_S):
                        committed = await self._client.committed(tp)
                    if committed is not None:
                        holes.expect(tp, committed)
            index = holes.cut(tp, msgs)
            if index is None:
                continue
            with contextlib.suppress(IllegalStateError):  # revoked meanwhile: not ours
                self._client.seek(tp, holes.resume_at(tp))
            if index:
                batches[tp] = msgs[:index]
            else:
                del batches[tp]

    def assignment(self) -> set[Partition]:
        return {Partition(tp.topic, tp.partition) for tp in self._client.assignment()}

    def pause(self, partitions: Iterable[Partition]) -> None:
        self._client.pause(*[_tp(p) for p in partitions])

    def resume(self, partitions: Iterable[Partition]) -> None:
        self._client.resume(*[_tp(p) for p in partitions])

    def paused(self) -> set[Partition]:
        return {Partition(tp.topic, tp.partition) for tp in self._client.paused()}

    async def commit(self, offsets: Mapping[Partition, int]) -> None:
        """Commit the next offset to read, per partition."""
        if not offsets:
            return
        try:
            await self._client.commit({_tp(p): o for p, o in offsets.items()})
        except (CommitFailedError, IllegalStateError, RebalanceInProgressError) as exc:
            raise CommitFailed(f"Commit refused: {type(exc).__name__}: {exc}") from exc
        except KafkaError as exc:
            raise transport_error(exc, "Committing offsets") from exc

    async def committed(self, partition: Partition) -> int | None:
        return await self._client.committed(_tp(partition))  # type: ignore[no-any-return]

    def seek(self, partition: Partition, offset: int) -> None:
        tp = _tp(partition)
        self._client.seek(tp, offset)
        if self._holes is not None:
            self._holes.expect(tp, offset)

    async def seek_to_beginning(self, partitions: Sequence[Partition]) -> None:
        tps = [_tp(p) for p in partitions]
        await self._client.seek_to_beginning(*tps)
        if self._holes is not None:
            for tp in tps:  # known once the seek returns: no request
                self._holes.expect(tp, await self._client.position(tp))

    async def position(self, partition: Partition) -> int:
        return await self._client.position(_tp(partition))  # type: ignore[no-any-return]

    def highwater(self, partition: Partition) -> int | None:
        """The partition's end as reported by the last fetch (reliable on every broker,
        unlike ``end_offsets()`` on the embedded one)."""
        return self._client.highwater(_tp(partition))  # type: ignore[no-any-return]

    def last_stable_offset(self, partition: Partition) -> int | None:
        """The partition's last stable offset (below it every transaction is decided)
        as reported by the last fetch: the end a ``read_committed`` consumer can reach."""
        return self._client.last_stable_offset(_tp(partition))  # type: ignore[no-any-return]


    def partition_count(self, topic: str) -> int | None:
        """The number of partitions of ``topic`` in the consumer's metadata (None when
        the metadata has not got it yet); no request is made."""
        parts = self._client.partitions_for_topic(topic)
        return len(parts) if parts else None


CODECS = {1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}  # Kafka's compression type ids


def _unreadable(exc: KafkaError, group: str | None) -> UnreadableBatch:
    """The mesh's error for a fetched batch aiokafka cannot read: where it is and the fix.

    aiokafka raises while iterating the fetched records, without saying where; the
    frames of its record iterator hold the partition (``tp``) and the batch
    (``next_batch``), so they are read from the traceback when they are there.
    """
    tp: Any = None
    batch: Any = None
    tb = exc.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals
        if isinstance(local.get("tp"), TopicPartition):
            tp = local["tp"]
            batch = local.get("next_batch", batch)
        tb = tb.tb_next
    topic, partition = (tp.topic, tp.partition) if tp is not None else (None, None)
    offset = getattr(batch, "base_offset", None)
    where = (f"{topic}[{partition}]" if tp is not None
             else "one of the assigned partitions (the client did not say which)")
    if offset is not None:
        where += f" at offset {offset} (offsets {offset}-{batch.next_offset - 1})"
    detail = str(exc) if str(exc).startswith(type(exc).__name__) else (
        f"{type(exc).__name__}: {exc}")
    message = (f"Cannot read the record batch of {where}: {detail}. "
               f"{_unreadable_fix(exc, batch)} The agent stops instead of skipping the "
               "batch: nothing past it is handled or committed.")
    if topic is not None and offset is not None and group is not None:
        message += (f" To drop the batch's records instead, move group {group} past it "
                    f"while the agent is stopped: kafka-consumer-groups.sh --group {group} "
                    f"--topic {topic}:{partition} --reset-offsets --to-offset "
                    f"{batch.next_offset} --execute.")
    return UnreadableBatch(message, topic=topic, partition=partition, offset=offset)


def _unreadable_fix(exc: KafkaError, batch: Any) -> str:
    if not isinstance(exc, UnsupportedCodecError):
        return ("The batch is corrupt (a CRC mismatch or truncated): if it reads the same "
                "after a restart, the log is damaged on the broker.")
    codec = CODECS.get(getattr(batch, "compression_type", 0) or 0)
    named = re.search(r"for (\w+) compression", str(exc))
    codec = codec or (named.group(1) if named else None)
    what = f"{codec}-compressed" if codec else "compressed with a codec Kafka does not define"
    return (f"The batch is {what} and this process cannot decompress it. Fix: install the "
            "codec libraries the mesh depends on (pip install 'aiokafka[lz4,snappy,zstd]': "
            "a partial install or an old image lacks them) and start the agent again, or "
            "have the producer use compression.type=gzip or none.")
