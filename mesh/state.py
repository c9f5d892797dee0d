"""A compacted topic as a table: key -> latest value; a tombstone (null value) deletes.

Every stateful part of the mesh (gather, coordinator plans, checkpoints, workers,
breakers) keeps its state here. The table is rebuilt by reading the topic from the
beginning to its end, keeping the last value per key, so it works whether or not the
broker compacts (the embedded broker stores compaction settings but never compacts).

Two ways to use it:

* **owned** (``restore()``): a service that writes the state rebuilds it when it starts
  and whenever its partitions are (re)assigned; between rebuilds its own writes are
  applied locally as they are made (read-your-writes) and sent with the handler's
  outputs, so they are acknowledged before the input's offset is committed.
* **followed** (``follow()``): a reader of someone else's state (a supervisor reading
  worker heartbeats, ``mesh workers``) applies every record as it arrives.

Example:
    >>> table = CompactedTable(checkpoints, settings.kafka, codec)  # doctest: +SKIP
    >>> await table.restore()  # doctest: +SKIP
    >>> table.get("wf-1")  # doctest: +SKIP
    Checkpoint(workflow_id='wf-1', ...)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, ItemsView
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from mesh.config import KafkaSettings
from mesh.errors import ConfigError, InputError
from mesh.kafka.base import OutRecord, Record
from mesh.kafka.reader import TopicReader
from mesh.serde.codec import Codec
from mesh.topic import Topic

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class CompactedTable(Generic[M]):
    """The latest value per key of a compacted topic, kept in memory."""

    def __init__(self, topic: Topic[M], settings: KafkaSettings, codec: Codec) -> None:
        if not topic.compacted:
            raise ConfigError(f"Topic {topic.name!r} holds state but is not compacted: "
                              "declare it with compacted=True.")
        self.topic = topic
        self._settings = settings
        self._codec = codec
        self._rows: dict[str, M] = {}
        self.changed = asyncio.Event()
        self.skipped = 0  # records that did not decode (logged, never applied)
        self._listeners: list[Callable[[str, M | None], None]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def get(self, key: str) -> M | None:
        """The latest value for ``key``, or None if absent or deleted."""
        return self._rows.get(key)

    def items(self) -> ItemsView[str, M]:
        return self._rows.items()

    def on_change(self, listener: Callable[[str, M | None], None]) -> None:
        """Call ``listener(key, value_or_None)`` for every change applied."""
        self._listeners.append(listener)

    def record_of(self, key: str, value: M | None) -> OutRecord:
        """The record that persists ``value`` for ``key`` (a tombstone for None),
        without applying it: callers apply once the write is sure to be sent."""
        if value is None:
            return OutRecord(self.topic.name, None, key.encode())
        data, fingerprint = self._codec.encode(self.topic, value)
        return OutRecord(self.topic.name, data, key.encode(),
                         (("mesh-schema", fingerprint.encode()),))

    def put(self, key: str, value: M) -> OutRecord:
        """Apply ``value`` locally and return the record that persists it."""
        record = self.record_of(key, value)
        self.apply(key, value)
        return record

    def delete(self, key: str) -> OutRecord:
        """Remove ``key`` locally and return its tombstone."""
        self.apply(key, None)
        return self.record_of(key, None)

    async def restore(self, timeout: float = 120.0) -> int:
        """Rebuild from the beginning of the topic to its end; returns the row count."""
        async with TopicReader(self._settings, [self.topic.name]) as reader:
            records = await reader.read_to_end(timeout=timeout)
        self._rows.clear()
        for record in sorted(records, key=lambda r: (r.partition, r.offset)):
            await self._apply_record(record)
        logger.info("table %s restored: %d rows from %d records", self.topic.name,
                    len(self._rows), len(records))
        return len(self._rows)

    async def follow(self, *, from_beginning: bool = True) -> None:
        """Apply records as they arrive, until cancelled."""
        async with TopicReader(self._settings, [self.topic.name]) as reader:
            if not from_beginning:
                await reader.seek_to_end()
            async for record in reader.follow():
                await self._apply_record(record)

    async def _apply_record(self, record: Record) -> None:
        if record.key is None:
            self.skipped += 1
            return
        key = record.key.decode(errors="replace")
        if record.value is None:
            self.apply(key, None)
            return
        try:
            value = await self._codec.decode(self.topic, record.value)
        except InputError as exc:
            self.skipped += 1
            logger.warning("table %s: record %d@%d skipped: %s", self.topic.name,
                           record.partition, record.offset, exc)
            return
        self.apply(key, value)  # type: ignore[arg-type]

    def apply(self, key: str, value: M | None) -> None:
        """Set (or with None, delete) ``key`` locally and tell the listeners."""
        if value is None:
            self._rows.pop(key, None)
        else:
            self._rows[key] = value
        for listener in self._listeners:
            listener(key, value)
        self.changed.set()


def tables_for(topics: list[Topic[Any]], settings: KafkaSettings,
               codec: Codec) -> dict[str, CompactedTable[Any]]:
    """One table per state topic, by topic name."""
    return {t.name: CompactedTable(t, settings, codec) for t in topics}
