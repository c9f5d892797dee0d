"""Records the embedded broker's fetches skip, found and read again.

The embedded broker (Tansu 0.6, memory storage) gives a produced batch its offsets when
it takes the request and makes the batch readable when it has stored it. When two
producers write to one partition at once, a fetch can come in between: it returns the
later batch, whose offsets are past the reader's position, while the earlier one is not
stored yet, and the reader's position moves past the earlier batch: its records are never
read. A group consumer would commit past them (inputs lost); a follower of a compacted
topic would miss a state change or a breaker's probe claim. With three producers writing
batches of 1-3 records to one partition and three followers, most runs of 2,000 batches
per producer leave a follower missing 1-8 records, with aiokafka and librdkafka alike
(``tests/integration/test_read_holes.py``).

On that broker a partition's offsets have no gaps (it never compacts and has no
transactions, so no removed record or control batch leaves one), so a delivery whose
offsets jump is such a skip. :class:`Holes` checks every delivery of the embedded
profile's consumers: the records before the hole are delivered, the partition is sought
back to the hole and read again (the missing batch is stored a moment later). A hole
still there after :data:`HOLE_WAIT` seconds is taken as real: logged as an error naming
the offsets, and read past, so a consumer never stalls on it.

Apache Kafka has no such race (a fetch reads up to the high watermark, below which
every batch is stored), and its offsets do have gaps (compaction, transaction markers):
the kafka profile does not check.

Example:
    >>> from collections import namedtuple
    >>> At = namedtuple("At", "offset")
    >>> holes = Holes()
    >>> holes.expect("p0", 10)
    >>> holes.cut("p0", [At(10), At(11), At(14)])  # 12 and 13 not read: deliver two
    2
    >>> holes.resume_at("p0")  # seek here and read again
    12
    >>> holes.cut("p0", [At(12), At(13), At(14)]) is None
    True
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence
from typing import Protocol

logger = logging.getLogger(__name__)

HOLE_WAIT = 10.0  # seconds a hole is read again before it is taken as real


class _Offset(Protocol):
    @property
    def offset(self) -> int: ...


class Holes:
    """Where each partition's next delivery must start, and the holes being read again;
    see the module docstring. Keyed by whatever names a partition for the caller."""

    def __init__(self) -> None:
        self._next: dict[Hashable, int] = {}  # the first offset of the next delivery
        self._open: dict[Hashable, tuple[int, float]] = {}  # hole -> when first seen

    def expect(self, partition: Hashable, offset: int) -> None:
        """The partition's position is ``offset`` (a seek, or a known start)."""
        self._next[partition] = offset
        self._open.pop(partition, None)

    def known(self, partition: Hashable) -> bool:
        """Whether the partition's next delivery has a known start."""
        return partition in self._next

    def forget(self, partitions: Sequence[Hashable]) -> None:
        """Positions no longer known (a rebalance assigned or revoked them)."""
        for partition in partitions:
            self._next.pop(partition, None)
            self._open.pop(partition, None)

    def resume_at(self, partition: Hashable) -> int:
        """The offset to seek the partition to after :meth:`cut` found a hole."""
        return self._next[partition]

    def cut(self, partition: Hashable, records: Sequence[_Offset]) -> int | None:
        """How many of ``records`` (one delivery of ``partition``, in offset order, not
        empty) come before a hole, or None when there is none to read again."""
        first, last = records[0].offset, records[-1].offset
        expected = min(first, self._next.get(partition, first))  # lower: sought back
        if first == expected and last - first == len(records) - 1:  # dense: no hole
            self._next[partition] = last + 1
            if self._open:
                self._open.pop(partition, None)
            return None
        index = 0 if first != expected else next(
            i for i in range(1, len(records)) if records[i].offset != records[i - 1].offset + 1)
        hole = expected if index == 0 else records[index - 1].offset + 1
        now = time.monotonic()
        seen = self._open.get(partition)
        if seen is not None and seen[0] == hole and now - seen[1] > HOLE_WAIT:
            logger.error("partition %s: offsets %d..%d were still not readable after %.0f s "
                         "of reading again; read past them (records there, if any, are "
                         "not delivered)", partition, hole, records[index].offset - 1,
                         HOLE_WAIT)
            self._next[partition] = last + 1
            del self._open[partition]
            return None
        if seen is None or seen[0] != hole:
            self._open[partition] = (hole, now)
            logger.debug("partition %s: offsets %d..%d skipped by a fetch: read again",
                         partition, hole, records[index].offset - 1)
        self._next[partition] = hole
        return index
