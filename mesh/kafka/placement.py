"""Noticing keyed records in another partition than Kafka's default partitioner gives
their key.

The mesh places a keyed record by murmur2 of its key (Kafka-Java's default partitioner,
and aiokafka's), so all events of a key meet in one partition: one replica owns the
key's state, and topics keyed alike are co-partitioned. librdkafka's default
(``consistent_random``: CRC32 of the key) places most keys elsewhere, so a foreign
producer on confluent-kafka, kcat, or librdkafka's Go, .NET or Node bindings splits a
key's events across replicas without any error. Records of a key that an agent consumes
are checked where they arrive: each misplaced one is counted
(``mesh_misplaced_records_total{agent,topic}``) and the first of each topic is warned
about with the fix.

Retry topics are not checked: a retry record keeps its input's partition on purpose.
Keyless records are not checked (any partition is right for them).

Example:
    >>> from mesh.kafka.base import Record
    >>> check = PlacementCheck("writer", ["demo.requests"])
    >>> check.check([Record("demo.requests", 0, 7, b"r1", b"", (), 0)], partitions=3)
    >>> check.misplaced
    {'demo.requests': 1}
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from mesh.kafka.base import Record
from mesh.kafka.murmur import partition_for

logger = logging.getLogger(__name__)



class PlacementCheck:
    """Counts consumed records whose key hashes (murmur2) to another partition.

    Args:
        agent: the consuming agent's name, for the warning.
        topics: the topics to check (the agent's inputs; not its retry topics).
    """

    def __init__(self, agent: str, topics: Iterable[str]) -> None:
        self.agent = agent
        self.topics = frozenset(topics)
        self.misplaced: dict[str, int] = {}

    def check(self, records: Sequence[Record], *, partitions: int | None) -> None:
        """Check ``records`` (of one partition) of a topic with ``partitions`` partitions
        (None or 1: nothing to check)."""
        if not records or not partitions or partitions < 2 or records[0].topic not in self.topics:
            return
        wrong: list[tuple[Record, int]] = []
        for record in records:
            if record.key is None:
                continue
            expected = partition_for(record.key, partitions)  # remembered per key
            if expected != record.partition:
                wrong.append((record, expected))
        if wrong:
            self._count(wrong, partitions)

    def _count(self, wrong: list[tuple[Record, int]], partitions: int) -> None:
        record, expected = wrong[0]
        topic = record.topic
        first = topic not in self.misplaced
        self.misplaced[topic] = self.misplaced.get(topic, 0) + len(wrong)
        if first:
            logger.warning(
                "agent %s: %s[%d]@%d has key %r, which Kafka's default partitioner (murmur2) "
                "puts in partition %d of %d: the producer places keys another way, most "
                "likely librdkafka's default partitioner (consistent_random, CRC32: "
                "confluent-kafka, kcat, the Go/.NET/Node clients), or the topic got more "
                "partitions after it was written. Events of one key then reach different "
                "replicas, and their state and co-partitioned topics split. Fix: set "
                "partitioner=murmur2_random in librdkafka-based producers (Java's default "
                "is already murmur2). Counted in mesh_misplaced_records_total; warned once "
                "per topic.", self.agent, topic, record.partition, record.offset,
                record.key[:64] if record.key else record.key, expected, partitions)
