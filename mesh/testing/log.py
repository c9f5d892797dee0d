"""The kit's broker: :class:`InMemoryTopics`, per partition its records in order, with
Kafka's placement of keyed records (murmur2), retry tiers and dead-letter topics
partitioned as their origin, and each record's place in the order of the whole mesh.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from mesh.envelope import now_ms
from mesh.errors import ConfigError
from mesh.kafka.base import OutRecord, Partition, Record
from mesh.kafka.murmur import partition_for
from mesh.runtime import retry
from mesh.topic import DLQ_SUFFIX, Topic


class InMemoryTopics:
    """The topics of an in-memory mesh: per partition, its records in order; each
    record also has its place in the order of the whole mesh (what was produced first).

    Example:
        >>> topics = InMemoryTopics([orders])  # doctest: +SKIP
        >>> topics.append(OutRecord("shop.orders", b"...", b"o1")).offset  # doctest: +SKIP
        0
    """

    def __init__(self, declared: Iterable[Topic[Any]] = ()) -> None:
        self._partitions: dict[str, int] = {}
        self._logs: dict[Partition, list[Record]] = {}
        self._order: dict[tuple[str, int, int], int] = {}  # record position -> sequence
        self._sequence = itertools.count()
        self._round_robin: dict[str, itertools.count[int]] = {}
        for topic in declared:
            self.declare(topic)

    def declare(self, topic: Topic[Any]) -> None:
        """Know ``topic``'s partition count (and its dead-letter topic's)."""
        self._partitions[topic.name] = topic.partitions
        if topic.dead_letters:
            self._partitions.setdefault(topic.dlq_name, topic.partitions)

    def partitions(self, name: str) -> int:
        """The partition count of topic ``name``: as declared; a retry tier or a
        dead-letter topic as its origin; an undeclared topic has one."""
        found = self._partitions.get(name)
        if found is None:
            origin = retry.origin_of(name.removesuffix(DLQ_SUFFIX))
            found = self._partitions.get(origin, 1)
        return found

    def append(self, out: OutRecord) -> Record:
        """Store ``out`` at the end of its partition, as the broker would."""
        count = self.partitions(out.topic)
        if out.partition is not None:
            if not 0 <= out.partition < count:
                raise ConfigError(f"Record for {out.topic} names partition {out.partition}, "
                                  f"but the topic has {count} partition(s) (0-{count - 1}). "
                                  "Declare the topic with more partitions.")
            number = out.partition
        elif out.key is not None:
            number = partition_for(out.key, count)
        else:  # Kafka spreads keyless records; round-robin keeps a test deterministic
            number = next(self._round_robin.setdefault(out.topic, itertools.count())) % count
        log = self._logs.setdefault(Partition(out.topic, number), [])
        record = Record(out.topic, number, len(log), out.key, out.value, out.headers,
                        now_ms())
        log.append(record)
        self._order[(out.topic, number, record.offset)] = next(self._sequence)
        return record

    def log(self, partition: Partition) -> list[Record]:
        """The records of one partition, by offset (the stored list: do not change it)."""
        return self._logs.get(partition, [])

    def records(self, name: str) -> list[Record]:
        """Every record of topic ``name``, in the order they were produced."""
        found = [r for p, log in self._logs.items() if p.topic == name for r in log]
        return sorted(found, key=self.sequence)

    def sequence(self, record: Record) -> int:
        """The record's place in the order of everything produced to this mesh."""
        return self._order[(record.topic, record.partition, record.offset)]
