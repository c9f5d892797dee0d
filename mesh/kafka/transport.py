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
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from itertools import chain
from typing import Any, NamedTuple, Self

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
    InvalidProducerEpoch,
    KafkaError,
    ProducerFenced,
    RebalanceInProgressError,
    UnsupportedCodecError,
)

from mesh.config import KafkaSettings
from mesh.errors import CommitFailed, TransportError, UnreadableBatch
from mesh.kafka.base import Acks, BaseProducer, OutRecord, Partition, RebalanceCallback, Record
from mesh.kafka.murmur import default_partitioner

logger = logging.getLogger(__name__)

# The producer may need to dead-letter a record larger than the mesh's own limit.
MAX_REQUEST_BYTES = 16 * 1024 * 1024


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


def transport_error(exc: KafkaError, what: str) -> TransportError:
    """aiokafka's ``exc`` as the mesh's TransportError, saying what failed."""
    return TransportError(f"{what} failed: {type(exc).__name__}: {exc}")


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

    Records are gathered per partition and handed to aiokafka as whole batches (its
    batch API), not one ``send`` per record: a record is queued with its partition
    (the key's, by the default partitioner, as aiokafka would pick it) and stamped
    with the time it was sent; one task per partition with queued records builds them
    into batches and queues each when the partition's batch before it has gone out, so
    what arrives meanwhile goes out together in the next. A partition's records keep
    the order they were sent in. This spares each record aiokafka's metadata wait,
    partitioner call, accumulator lookup and future (about three quarters of its CPU
    per record here: bench/README.md, "The runtime's sends in batches"). ``stop()``
    sends what is queued before it disconnects.

    Example:
        >>> async with Producer(settings) as producer:  # doctest: +SKIP
        ...     await producer.send_all([OutRecord("t", b"v")])
    """

    _role = "producer"
    _gather = True  # a transactional producer sends record by record (see there)
    _auto_idempotence = False  # idempotent by default, not by an explicit setting

    def __init__(self, settings: KafkaSettings) -> None:
        super().__init__()
        self._settings = settings
        self._auto_idempotence = settings.idempotence is None and settings.idempotent_producer
        self._client = self._make(idempotent=settings.idempotent_producer)
        # (topic, partition): the records queued for it and their acks; a partition is
        # here exactly while its task (in _senders) runs.
        self._queued: dict[tuple[str, int], list[tuple[OutRecord, int, asyncio.Future[Any]]]] = {}
        self._senders: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._partitions: dict[str, list[int]] = {}  # per topic, from the client's metadata

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
        if not self._gather:
            return await self._send_one(record)
        partitions = self._partitions.get(record.topic) or await self._partitions_of(
            record.topic)
        return self._enqueue(record, partitions)

    async def send_many(self, records: Iterable[OutRecord]) -> Acks:
        if not self._gather:
            return await super().send_many(records)
        known, acks = self._partitions, list[Awaitable[Any]]()
        for record in records:
            partitions = known.get(record.topic) or await self._partitions_of(record.topic)
            acks.append(self._enqueue(record, partitions))
        return Acks(acks)

    def _enqueue(self, record: OutRecord, partitions: list[int]) -> asyncio.Future[Any]:
        """Queue ``record`` for its partition (one of ``partitions``, its topic's) and
        start the partition's sender if none runs; the record's ack."""
        if not self._started:
            raise TransportError(f"Producing to {record.topic} failed: the producer is "
                                 "not started")
        partition = record.partition
        if partition is None:
            partition = default_partitioner(record.key, partitions, partitions)
        elif partition not in partitions:
            raise TransportError(f"Producing to {record.topic} failed: it has no partition "
                                 f"{partition} (partitions {partitions[0]}-{partitions[-1]})")
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        at = int(time.time() * 1000)  # the record's time is when it was sent, as with send()
        where = (record.topic, partition)
        queued = self._queued.get(where)
        if queued is None:
            self._queued[where] = [(record, at, ack)]
            self._senders[where] = asyncio.create_task(self._send_queued(where))
        else:
            queued.append((record, at, ack))
        return ack

    async def _send_one(self, record: OutRecord) -> Awaitable[Any]:
        try:
            ack: Awaitable[Any] = await self._client.send(  # aiokafka: an asyncio.Future
                record.topic, record.value, key=record.key, headers=list(record.headers),
                partition=record.partition)
        except KafkaError as exc:
            raise transport_error(exc, f"Producing to {record.topic}") from exc
        return ack

    async def _partitions_of(self, topic: str) -> list[int]:
        try:
            known = await self._client.partitions_for(topic)  # waits for the metadata
        except KafkaError as exc:
            raise transport_error(exc, f"Producing to {topic}") from exc
        partitions = self._partitions[topic] = sorted(known)
        return partitions

    async def _send_queued(self, where: tuple[str, int]) -> None:
        """Send what is queued for ``where`` as batches until nothing is left; each
        batch is queued in aiokafka once the partition's batch before it went out."""
        topic, partition = where
        client = self._client
        queued = self._queued[where]
        members: list[tuple[OutRecord, int, asyncio.Future[Any]]] = []  # of the open batch
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
            if known and len(known) != len(self._partitions.get(topic, ())):
                self._partitions[topic] = sorted(known)  # the topic grew (or was recreated)
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

    async def _close(self) -> None:
        while self._gather and self._senders:  # what is queued goes out first
            await asyncio.wait(list(self._senders.values()))
        await super()._close()


def _settle_when_sent(sent: asyncio.Future[Any],
                      members: list[tuple[OutRecord, int, asyncio.Future[Any]]],
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


class Sent(NamedTuple):
    """Where an acknowledged record landed."""

    partition: int
    offset: int


class Fenced(TransportError):
    """A transactional producer was fenced: another producer started with the same
    transactional id (the partition's new owner), or the broker aborted a transaction
    open longer than its timeout. Nothing of the open transaction is committed."""

    retriable = False


class TransactionalProducer(Producer):
    """A producer whose records are written in Kafka transactions, with the consumed
    offsets committed in the same transaction (consume-transform-produce).

    ``start()`` registers ``transactional_id`` with the broker (InitProducerId): any
    earlier producer with the same id is fenced, and its open transaction is aborted
    (or, if it was committing, completed) before ``start()`` returns. Readers with
    ``read_committed`` see a transaction's records only once it commits.

    Example:
        >>> txn = TransactionalProducer(settings, "stage2-orders-0")  # doctest: +SKIP
        >>> await txn.start(); await txn.begin()  # doctest: +SKIP
        >>> acks = await txn.send_many(records)  # doctest: +SKIP
        >>> await txn.commit({Partition("orders", 0): 42}, group_id="stage2")  # doctest: +SKIP
    """

    _role = "transactional producer"
    _gather = False  # its records are sent at once: commit() must find them in aiokafka

    def __init__(self, settings: KafkaSettings, transactional_id: str, *,
                 timeout_ms: int = 60_000) -> None:
        Client.__init__(self)
        self.transactional_id = transactional_id
        self._client = AIOKafkaProducer(
            **settings.client_kwargs(), acks=-1, transactional_id=transactional_id,
            transaction_timeout_ms=timeout_ms, linger_ms=settings.linger_ms,
            # A transaction begun right after a commit is answered CONCURRENT_TRANSACTIONS
            # until the commit markers are written: retry soon, not after 100 ms.
            retry_backoff_ms=20,
            max_batch_size=settings.max_batch_size, max_request_size=MAX_REQUEST_BYTES,
        )

    async def start(self) -> None:
        try:
            await super().start()
        except TransportError as exc:
            self._started = True  # the client's connections are open: stop() closes them
            raise self._error(exc.__cause__, "Registering the transactional id") from exc

    async def begin(self) -> None:
        """Open a transaction: records sent from now on belong to it."""
        try:
            await self._client.begin_transaction()
        except KafkaError as exc:
            raise self._error(exc, "Beginning a transaction") from exc

    async def commit(self, offsets: Mapping[Partition, int], group_id: str) -> None:
        """Add ``offsets`` (the next offset to read, per consumed partition) of
        ``group_id`` to the open transaction and commit it: its records and the offsets
        become visible together, or (on error) neither."""
        try:
            if offsets:
                await self._client.send_offsets_to_transaction(
                    {_tp(p): o for p, o in offsets.items()}, group_id)
            await self._client.commit_transaction()
        except KafkaError as exc:
            raise self._error(exc, "Committing a transaction") from exc

    async def abort(self) -> None:
        """Abort the open transaction: its records are never seen by ``read_committed``
        readers and its offsets never committed."""
        try:
            await self._client.abort_transaction()
        except KafkaError as exc:
            raise self._error(exc, "Aborting a transaction") from exc

    def _error(self, exc: BaseException | None, what: str) -> TransportError:
        name = f"{what} of {self.transactional_id}"
        if isinstance(exc, (ProducerFenced, InvalidProducerEpoch)):
            return Fenced(f"{name} failed: the producer was fenced ({type(exc).__name__}): "
                          "another producer registered the same transactional id (the "
                          "partition's new owner), or the transaction outlived "
                          "MESH_RUNTIME__TRANSACTION_TIMEOUT_MS.")
        if isinstance(exc, KafkaError):
            return transport_error(exc, name)
        return TransportError(f"{name} failed: {exc}")




class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_assigned: RebalanceCallback, on_revoked: RebalanceCallback) -> None:
        self._assigned, self._revoked = on_assigned, on_revoked

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._revoked([Partition(tp.topic, tp.partition) for tp in revoked])

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._assigned([Partition(tp.topic, tp.partition) for tp in assigned])


class Consumer(Client):
    """A consumer: in a group with manual commits, or group-less for reading topics.
    ``stop()`` leaves the group.

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
        self._client.subscribe(list(topics), listener=_Listener(on_assigned, on_revoked))

    def unsubscribe(self) -> None:
        """Leave the group's subscription (its partitions move to other members)."""
        self._client.unsubscribe()

    def assign(self, partitions: Sequence[Partition]) -> None:
        """Read ``partitions`` directly, outside any group."""
        self._client.assign([_tp(p) for p in partitions])

    async def partitions_of(self, topic: str) -> list[Partition]:
        """The partitions of ``topic`` from broker metadata (empty if it does not exist)."""
        parts = self._client.partitions_for_topic(topic)
        if parts is None:
            # the consumer's private client: aiokafka has no public metadata refresh
            await self._client._client.force_metadata_update()
            parts = self._client.partitions_for_topic(topic)
        return [Partition(topic, p) for p in sorted(parts or ())]

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Partition, list[Record]]:
        """Fetch what is ready on the assigned, unpaused partitions."""
        try:
            batches = await self._client.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except (UnsupportedCodecError, CorruptRecordException) as exc:
            raise _unreadable(exc, self._group) from exc
        except KafkaError as exc:
            raise transport_error(exc, "Fetching") from exc
        return {
            Partition(tp.topic, tp.partition): [
                Record(m.topic, m.partition, m.offset, m.key, m.value, _headers(m.headers),
                       m.timestamp)
                for m in msgs]
            for tp, msgs in batches.items()
        }

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
        self._client.seek(_tp(partition), offset)

    async def seek_to_beginning(self, partitions: Sequence[Partition]) -> None:
        await self._client.seek_to_beginning(*[_tp(p) for p in partitions])

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
