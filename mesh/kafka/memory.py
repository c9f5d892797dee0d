"""The in-memory side of the producer seam: :class:`InMemoryProducer` stores every record
at once in a log the caller owns (the test kit's :class:`mesh.testing.InMemoryTopics`)
and hands back an acknowledgement that is already resolved. Beside
:class:`mesh.kafka.transport.Producer`, the aiokafka one; both are a
:class:`mesh.kafka.base.BaseProducer`, so the real runtime takes either as is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, NamedTuple, Protocol

from mesh.kafka.base import BaseProducer, OutRecord, Record


class RecordLog(Protocol):
    """Where an in-memory producer's records go: it stores one and says where."""

    def append(self, out: OutRecord) -> Record: ...


class _Ack(NamedTuple):
    """What the broker's acknowledgement tells: where the record was stored."""

    partition: int
    offset: int


class InMemoryProducer(BaseProducer):
    """A producer whose broker is a :class:`RecordLog`.

    Example:
        >>> producer = InMemoryProducer(InMemoryTopics())  # doctest: +SKIP
        >>> await producer.send_all([OutRecord("t", b"v")])  # doctest: +SKIP
        [(0, 0)]
    """

    def __init__(self, topics: RecordLog) -> None:
        self.topics = topics
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    async def send(self, record: OutRecord) -> Awaitable[Any]:
        """Store ``record``; the returned future is already resolved."""
        stored = self.topics.append(record)
        ack: asyncio.Future[_Ack] = asyncio.get_running_loop().create_future()
        ack.set_result(_Ack(stored.partition, stored.offset))
        return ack
