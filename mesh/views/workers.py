"""``mesh workers``: every worker's latest status row, read from a supervised pool's
compacted status topic (:mod:`mesh.patterns.supervision`), as a table.

Example:
    >>> rows = await load_workers(settings.kafka, topics.status)  # doctest: +SKIP
    >>> Console().print(render_workers(rows))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table

from mesh import envelope
from mesh.config import KafkaSettings
from mesh.patterns.supervision.worker import WorkerStatus
from mesh.serde.codec import Codec
from mesh.state import CompactedTable
from mesh.topic import Topic

STATUS_STYLE = {"idle": "green", "busy": "cyan", "quarantined": "yellow", "dead": "red"}


def render_workers(rows: Iterable[WorkerStatus], *, now_ms: int | None = None,
                   stale_after_s: float = 10.0) -> Table:
    """The ``mesh workers`` table: one row per worker, heartbeat ages from ``now_ms``;
    a live worker's heartbeat older than ``stale_after_s`` is flagged."""
    now = envelope.now_ms() if now_ms is None else now_ms
    table = Table(title="Workers")
    for column, right in (("worker", False), ("status", False), ("task", False),
                          ("fails", True), ("done", True), ("per s", True),
                          ("partitions", False), ("heartbeat", True)):
        table.add_column(column, justify="right" if right else "left", no_wrap=True)
    for row in sorted(rows, key=lambda r: r.worker_id):
        age = max(0.0, (now - row.heartbeat_ms) / 1000)
        stale = row.status != "dead" and age > stale_after_s
        table.add_row(
            row.worker_id, f"[{STATUS_STYLE.get(row.status, 'white')}]{row.status}[/]",
            row.current_task or "-", str(row.consecutive_failures), str(row.tasks_done),
            f"{row.throughput:.2f}", ",".join(map(str, row.partitions)) or "-",
            f"[red]{age:.1f}s ago, stale[/]" if stale else f"{age:.1f}s ago")
    return table


async def load_workers(settings: KafkaSettings, status: Topic[WorkerStatus], *,
                       codec: Codec | None = None) -> list[WorkerStatus]:
    """Every worker's latest row, read from the compacted status topic."""
    table = CompactedTable(status, settings, codec or Codec())
    await table.restore()
    return [row for _, row in table.items()]
