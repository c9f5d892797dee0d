"""The transactional producer: records and consumed offsets committed together.

Split from :mod:`mesh.kafka.transport`, whose client lifecycle, error translation and
gathered sends (:mod:`mesh.kafka.gather`) it shares. ``commit()`` and ``abort()`` first
hand every gathered batch to aiokafka, which sends them all before it ends the
transaction.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiokafka import AIOKafkaProducer
from aiokafka.errors import InvalidProducerEpoch, KafkaError, ProducerFenced

from mesh.config import KafkaSettings
from mesh.errors import TransportError
from mesh.kafka.base import Partition, transport_error
from mesh.kafka.gather import Gathered
from mesh.kafka.transport import MAX_REQUEST_BYTES, Client, Producer, _tp


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
        self._gathered = Gathered()

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
            await self._gathered.drain()  # every record in aiokafka, which sends it first
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
            await self._gathered.drain()  # none handed over once the transaction is gone
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
