"""Reading topics outside any consumer group: to the end, or following from now.

Used by ``mesh tap``, the dead-letter tools, tests and state rebuilds. The end of a
partition is taken from the high watermark a fetch reports, never from
``end_offsets()``, which the embedded broker answers wrongly (start of the last batch
plus one).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from mesh.config import KafkaSettings
from mesh.errors import TransportError
from mesh.transport import Consumer, Partition, Record

POLL_MS = 200


class TopicReader:
    """Reads every partition of some topics, from the beginning or from now.

    Example:
        >>> async with TopicReader(settings.kafka, ["demo.articles"]) as reader:  # doctest: +SKIP
        ...     records = await reader.read_to_end(timeout=30)
    """

    def __init__(self, settings: KafkaSettings, topics: Sequence[str]) -> None:
        self._consumer = Consumer(settings, group_id=None)
        self._topics = list(topics)
        self.partitions: list[Partition] = []

    async def __aenter__(self) -> TopicReader:
        await self._consumer.start()
        for topic in self._topics:
            parts = await self._consumer.partitions_of(topic)
            if not parts:
                await self._consumer.stop()
                raise TransportError(f"Topic {topic!r} does not exist on the broker. "
                                     "Create it with `mesh topics apply`.")
            self.partitions.extend(parts)
        self._consumer.assign(self.partitions)
        await self._consumer.seek_to_beginning(self.partitions)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def _ends(self, timeout: float) -> dict[Partition, int]:
        """Each partition's high watermark, learned from real fetches (then rewound)."""
        ends: dict[Partition, int] = {}
        deadline = time.monotonic() + timeout
        while len(ends) < len(self.partitions) and time.monotonic() < deadline:
            await self._consumer.getmany(timeout_ms=POLL_MS, max_records=1)
            for part in self.partitions:
                high = self._consumer.highwater(part)
                if high is not None:
                    ends[part] = high
        if len(ends) < len(self.partitions):
            raise TransportError(f"No high watermark for {len(self.partitions) - len(ends)} "
                                 f"partition(s) within {timeout:.0f} s.")
        return ends

    async def seek_to_end(self, timeout: float = 30.0) -> None:
        """Start from now: skip everything already in the topics."""
        for part, end in (await self._ends(timeout)).items():
            self._consumer.seek(part, end)

    async def read_to_end(self, timeout: float = 60.0) -> list[Record]:
        """Every record from the beginning to the end as of this call."""
        deadline = time.monotonic() + timeout
        ends = await self._ends(timeout)
        await self._consumer.seek_to_beginning(self.partitions)
        records: list[Record] = []
        positions = {p: 0 for p in self.partitions}
        while any(positions[p] < ends[p] for p in self.partitions):
            if time.monotonic() > deadline:
                raise TransportError(f"Reading {self._topics} to the end took over "
                                     f"{timeout:.0f} s ({len(records)} records read).")
            batches = await self._consumer.getmany(timeout_ms=POLL_MS, max_records=10_000)
            for part, batch in batches.items():
                records.extend(r for r in batch if r.offset < ends[part])
            for part in self.partitions:
                positions[part] = await self._consumer.position(part)
        return records

    async def follow(self, *, limit: int | None = None,
                     idle_timeout: float | None = None) -> AsyncIterator[Record]:
        """Records as they arrive; stops after ``limit`` records or ``idle_timeout`` s
        without any (both optional: without them it runs until cancelled)."""
        count, last = 0, time.monotonic()
        while limit is None or count < limit:
            batches = await self._consumer.getmany(timeout_ms=POLL_MS, max_records=500)
            if batches:
                last = time.monotonic()
            elif idle_timeout is not None and time.monotonic() - last > idle_timeout:
                return
            for batch in batches.values():
                for record in batch:
                    yield record
                    count += 1
                    if limit is not None and count >= limit:
                        return
