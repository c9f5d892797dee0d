"""Reading topics outside any consumer group: to the end, from near the end, or following.

Used by ``mesh tap``, ``mesh trace``, ``mesh top``, the dead-letter tools, tests and
state rebuilds. Nothing is committed and no group is joined, so a reader never takes
partitions from an agent and any number of them can read the same topic.

Two traps of the embedded broker shape it (see DESIGN.md):

* the end of a partition is taken from the high watermark a real fetch reports, never
  from ``end_offsets()``, which the embedded broker answers wrongly (start of the last
  batch plus one);
* an empty fetch is held for about ``fetch_max_wait_ms / 2`` and does not wake when data
  arrives, so every wait here is a bounded poll in a loop with a deadline, and reading
  fewer partitions (``partitions=``, :meth:`TopicReader.for_key`) means fewer of them.

Example:
    >>> async with TopicReader(settings.kafka, ["demo.articles"]) as reader:  # doctest: +SKIP
    ...     records = await reader.read_to_end(timeout=30)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Literal, Self

from mesh.config import KafkaSettings
from mesh.errors import TransportError
from mesh.kafka.base import Partition, Record
from mesh.kafka.murmur import partition_for
from mesh.kafka.transport import Consumer

POLL_MS = 200  # longest single fetch wait: how often deadlines and stops are checked
BATCH = 10_000  # records taken per fetch when reading to the end


class TopicReader:
    """Reads partitions of some topics outside any group, from the beginning or from
    near the end.

    What it reads, fixed on entering (``partitions`` then lists it):

    * every partition of ``topics`` (the default);
    * ``partitions=``: exactly these, which must exist;
    * :meth:`for_key`: the one partition of each topic where Kafka's default
      partitioner puts a key (all records a default-partitioned producer keyed so).

    Where it starts: the beginning on entering; :meth:`seek_to_end` (only what comes
    next) or :meth:`seek_to_last` (the last N records of each partition) move it.
    How it reads: :meth:`read_to_end` / :meth:`iter_to_end` (up to the end as of the
    call), :meth:`follow` (as records arrive) or :meth:`poll` (one bounded fetch, for a
    loop that does other work between fetches; :meth:`caught_up` says when it reached
    the ends a seek returned). Records come in offset order per partition; the order
    across partitions is whatever the fetches return.

    What it sees of transactions (exactly-once agents write in them):
    ``isolation_level="read_committed"`` (or ``MESH_KAFKA__ISOLATION_LEVEL``, the
    default) hides open and aborted transactions, and a partition's end is then its last
    stable offset (everything before it decided), not its high watermark.

    Example:
        >>> async with TopicReader(settings.kafka, ["mesh.audit"]) as reader:  # doctest: +SKIP
        ...     ends = await reader.seek_to_last(100)
        ...     while not await reader.caught_up(ends):
        ...         records = await reader.poll(0.2)
    """

    def __init__(self, settings: KafkaSettings, topics: Sequence[str] = (), *,
                 partitions: Sequence[Partition] | None = None,
                 isolation_level: Literal["read_uncommitted", "read_committed"] | None = None,
                 ) -> None:
        if partitions is not None and topics:
            raise ValueError(f"TopicReader got topics={list(topics)!r} and partitions="
                             f"{list(partitions)!r}: pass one of them (topics reads every "
                             "partition of each, partitions exactly those).")
        self._consumer = Consumer(settings, group_id=None, isolation_level=isolation_level)
        self.read_committed = self._consumer.isolation_level == "read_committed"
        self._explicit = None if partitions is None else list(dict.fromkeys(partitions))
        self._topics = (list(dict.fromkeys(p.topic for p in self._explicit))
                        if self._explicit is not None else list(topics))
        self._key: bytes | None = None
        self.partitions: list[Partition] = []

    @classmethod
    def for_key(cls, settings: KafkaSettings, topics: Sequence[str], key: bytes) -> Self:
        """A reader of the partition of each topic that Kafka's default partitioner
        (murmur2, as aiokafka and the Java client use) gives ``key``, learned from the
        broker's partition count on entering. Other keys share that partition: filter
        on ``record.key``. A record of ``key`` produced to an explicit partition, or by
        a client with another partitioner (librdkafka's default is CRC32), is elsewhere.

        Example:
            >>> async with TopicReader.for_key(settings.kafka, ["mesh.audit"],
            ...                                b"order-7") as reader:  # doctest: +SKIP
            ...     mine = [r async for r in reader.iter_to_end() if r.key == b"order-7"]
        """
        reader = cls(settings, topics)
        reader._key = key
        return reader

    async def __aenter__(self) -> Self:
        await self._consumer.start()
        try:
            self.partitions = await self._chosen()
        except BaseException:
            # One turn of the loop first: aiokafka 0.14 cancels a group-less consumer's
            # internal task on stop, and one cancelled before its first step makes
            # stop() raise CancelledError instead of the error being handled here.
            await asyncio.sleep(0)
            await self._consumer.stop()
            raise
        self._consumer.assign(self.partitions)
        if self.partitions:
            await self._consumer.seek_to_beginning(self.partitions)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def _chosen(self) -> list[Partition]:
        """The partitions to read, checked against the broker's metadata."""
        chosen: list[Partition] = []
        for topic in self._topics:
            parts = await self._consumer.partitions_of(topic)
            if not parts:
                raise TransportError(f"Topic {topic!r} does not exist on the broker. "
                                     "Create it with `mesh topics apply`.")
            if self._key is not None:
                chosen.append(Partition(topic, partition_for(self._key, len(parts))))
            elif self._explicit is None:
                chosen.extend(parts)
            else:
                wanted = [p for p in self._explicit if p.topic == topic]
                missing = sorted(p.partition for p in wanted if p not in parts)
                if missing:
                    raise TransportError(
                        f"Topic {topic!r} has no partition {missing}: it has {len(parts)} "
                        f"(0..{len(parts) - 1}). Read one of those.")
                chosen.extend(wanted)
        return chosen

    async def _ends(self, timeout: float) -> dict[Partition, int]:
        """Each partition's high watermark, learned from real fetches, in the order of
        :attr:`partitions` (the order the fetches answer in depends on the broker). The
        fetches move the positions: every caller seeks afterwards."""
        ends: dict[Partition, int] = {}
        deadline = time.monotonic() + timeout
        while len(ends) < len(self.partitions) and time.monotonic() < deadline:
            await self._consumer.getmany(timeout_ms=POLL_MS, max_records=1)
            for part in self.partitions:
                high = (self._consumer.last_stable_offset(part) if self.read_committed
                        else self._consumer.highwater(part))
                if high is not None:
                    ends[part] = high
        if len(ends) < len(self.partitions):
            raise TransportError(f"No high watermark for {len(self.partitions) - len(ends)} "
                                 f"partition(s) within {timeout:.0f} s.")
        return {part: ends[part] for part in self.partitions}

    async def seek_to_end(self, timeout: float = 30.0) -> dict[Partition, int]:
        """Start from now: skip everything already in the partitions; returns their ends
        (in the order of :attr:`partitions`)."""
        ends = await self._ends(timeout)
        for part, end in ends.items():
            self._consumer.seek(part, end)
        return ends

    async def seek_to_last(self, records: int, timeout: float = 30.0) -> dict[Partition, int]:
        """Start ``records`` offsets before each partition's end (``tail -n``; from the
        beginning where there are fewer); returns the ends, for :meth:`caught_up`.

        Example:
            >>> ends = await reader.seek_to_last(1000)  # doctest: +SKIP
        """
        if records < 0:
            raise ValueError(f"seek_to_last({records!r}): the number of records to go "
                             "back must be >= 0 (0 starts at the end).")
        ends = await self._ends(timeout)
        for part, end in ends.items():
            self._consumer.seek(part, max(0, end - records))
        return ends

    async def caught_up(self, ends: Mapping[Partition, int]) -> bool:
        """Whether every partition of ``ends`` has been read up to its end there."""
        return all([await self._consumer.position(p) >= end for p, end in ends.items()])

    async def poll(self, timeout_s: float, *, max_records: int = 5_000) -> list[Record]:
        """What one fetch returns within ``timeout_s`` (empty if nothing arrived)."""
        batches = await self._consumer.getmany(timeout_ms=max(0, int(timeout_s * 1000)),
                                               max_records=max_records)
        return [record for batch in batches.values() for record in batch]

    async def iter_to_end(self, timeout: float = 60.0) -> AsyncIterator[Record]:
        """Every record from the beginning to the end as of this call, one fetch at a
        time (so a caller that keeps only some holds only those); records produced
        after the call are not included.

        Example:
            >>> async for record in reader.iter_to_end(timeout=30):  # doctest: +SKIP
            ...     if record.key == b"order-7": ...
        """
        deadline = time.monotonic() + timeout
        ends = await self._ends(timeout)
        if self.partitions:
            await self._consumer.seek_to_beginning(self.partitions)
        read = 0
        while not await self.caught_up(ends):
            if time.monotonic() > deadline:
                raise TransportError(f"Reading {self._topics} to the end took over "
                                     f"{timeout:.0f} s ({read} records read).")
            batches = await self._consumer.getmany(timeout_ms=POLL_MS, max_records=BATCH)
            for part, batch in batches.items():
                for record in batch:
                    if record.offset < ends[part]:
                        read += 1
                        yield record

    async def read_to_end(self, timeout: float = 60.0) -> list[Record]:
        """Every record from the beginning to the end as of this call, in a list."""
        return [record async for record in self.iter_to_end(timeout)]

    async def follow(self, *, limit: int | None = None,
                     idle_timeout: float | None = None) -> AsyncIterator[Record]:
        """Records as they arrive; stops after ``limit`` records or ``idle_timeout`` s
        without any (both optional: without them it runs until cancelled)."""
        count, last = 0, time.monotonic()
        while limit is None or count < limit:
            batch = await self.poll(POLL_MS / 1000, max_records=500)
            if batch:
                last = time.monotonic()
            elif idle_timeout is not None and time.monotonic() - last > idle_timeout:
                return
            for record in batch:
                yield record
                count += 1
                if limit is not None and count >= limit:
                    return
