"""What every producer and consumer of the mesh deals in, free of any Kafka client:
records, partitions, acknowledgements, and :class:`BaseProducer`, the seam between the
runtime and a broker. :class:`mesh.kafka.transport.Producer` is the aiokafka
implementation and :class:`mesh.kafka.memory.InMemoryProducer` the in-memory one
(the test kit's), side by side as httpx keeps its transports.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Self

from mesh.errors import TransportError


class Partition(NamedTuple):
    """A topic partition."""

    topic: str
    partition: int


class Record(NamedTuple):
    """A consumed Kafka record (a named tuple: one per input, built three times faster
    than a frozen dataclass)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int

    @property
    def position(self) -> Partition:
        """The partition this record came from."""
        return Partition(self.topic, self.partition)


class OutRecord(NamedTuple):
    """A record to produce (a named tuple, like :class:`Record`: several per input)."""

    topic: str
    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int | None = None


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """What the admin client creates or finds: name, partitions, configs."""

    name: str
    partitions: int
    replication: int | None = None  # None: the cluster's size, at most 3
    configs: Mapping[str, str] | None = None


class Acks:
    """The broker's acknowledgements of records sent together."""

    __slots__ = ("_futures",)

    def __init__(self, futures: list[Awaitable[Any]]) -> None:
        self._futures = futures

    def __add__(self, other: Acks) -> Acks:
        """The acks of both sends."""
        return Acks(self._futures + other._futures)

    def done(self) -> bool:
        """Whether every record was acknowledged (or failed)."""
        return all(f.done() for f in self._futures)  # type: ignore[attr-defined]

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the event loop) once every record is acknowledged or
        failed; at once when there is nothing to wait for."""
        waiting = [f for f in self._futures if not f.done()]  # type: ignore[attr-defined]
        if not waiting:
            callback()
            return
        left = len(waiting)

        def one_done(_: object) -> None:
            nonlocal left
            left -= 1
            if left == 0:
                callback()

        for future in waiting:
            future.add_done_callback(one_done)  # type: ignore[attr-defined]

    def check(self) -> None:
        """Raise ``TransportError`` if a record failed; for acks that are :meth:`done`
        (what :meth:`wait` would raise, without a coroutine and its lists)."""
        for future in self._futures:
            error = future.exception()  # type: ignore[attr-defined]
            if error is not None:
                raise _ack_failed(error) from error

    async def wait(self) -> list[tuple[int, int]]:
        """(partition, offset) of each record; raises ``TransportError`` if any failed."""
        try:
            metas = [await ack for ack in self._futures]
        except Exception as exc:  # the client's own error (aiokafka's KafkaError)
            raise _ack_failed(exc) from exc
        return [(m.partition, m.offset) for m in metas]


def transport_error(exc: BaseException, what: str) -> TransportError:
    """A Kafka client's ``exc`` as the mesh's TransportError, saying what failed."""
    return TransportError(f"{what} failed: {type(exc).__name__}: {exc}")


def _ack_failed(error: BaseException) -> TransportError:
    """What a failed acknowledgement raises (from :meth:`Acks.wait` and :meth:`Acks.check`)."""
    return TransportError("Waiting for produce acknowledgements failed: "
                          f"{type(error).__name__}: {error}")


RebalanceCallback = Callable[[list[Partition]], Awaitable[None]]


class BaseProducer(abc.ABC):
    """Produces records; what the runtime, the emitter and the patterns need of a broker.

    A subclass implements :meth:`start`, :meth:`stop` and :meth:`send`; batching many
    records in flight (:meth:`send_many`) and waiting for them (:meth:`send_all`) build
    on ``send``.
    """

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect (safe to call twice)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Flush what is queued and disconnect (safe to call twice)."""

    @abc.abstractmethod
    async def send(self, record: OutRecord) -> Awaitable[Any]:
        """Queue ``record``; the returned awaitable resolves when the broker acks it."""

    async def send_many(self, records: Iterable[OutRecord]) -> Acks:
        """Queue ``records`` (they are batched with others) and return their acks,
        without waiting for them: callers keep many records in flight."""
        return Acks([await self.send(r) for r in records])

    async def send_all(self, records: Iterable[OutRecord]) -> list[tuple[int, int]]:
        """Produce ``records`` and wait until all are acknowledged; (partition, offset) each."""
        return await (await self.send_many(records)).wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
