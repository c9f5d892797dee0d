"""``mesh workflows show``: every version of one pipeline workflow's checkpoint still in
the log, and the plain-text table the command prints.

The pipeline (:mod:`mesh.patterns.pipeline`) writes the checkpoints; this reads them
back. Kafka keeps a key's old versions until the log is compacted (see
``min.compaction.lag.ms``), so a recent workflow shows each stage's version.

Example:
    >>> history = await workflow_history(settings.kafka, "doc-1", cps)  # doctest: +SKIP
    >>> print(format_history(history))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mesh.config import KafkaSettings
from mesh.kafka.reader import TopicReader
from mesh.patterns.pipeline import Checkpoint, StageResult
from mesh.serde.codec import Codec
from mesh.topic import Topic


@dataclass(frozen=True, slots=True)
class WorkflowHistory:
    """Every version of one workflow's checkpoint still in the log, oldest first
    (``None`` is a tombstone: the workflow was deleted after its retention)."""

    workflow_id: str
    topic: str
    versions: tuple[Checkpoint | None, ...]

    @property
    def latest(self) -> Checkpoint | None:
        """The current state (None if never written or deleted)."""
        return self.versions[-1] if self.versions else None

    @property
    def found(self) -> bool:
        """Whether any version (or tombstone) of the workflow is in the log."""
        return bool(self.versions)

    @property
    def deleted(self) -> bool:
        return bool(self.versions) and self.versions[-1] is None


def checkpoint_topics(topics: Iterable[Topic[Any]]) -> list[Topic[Checkpoint]]:
    """The checkpoints topics among ``topics`` (e.g. everything in ``topics/``)."""
    return [t for t in topics if t.model is Checkpoint]


async def workflow_history(settings: KafkaSettings, workflow_id: str,
                           topics: Topic[Checkpoint] | Sequence[Topic[Checkpoint]], *,
                           codec: Codec | None = None, timeout: float = 60.0
                           ) -> WorkflowHistory:
    """Read the checkpoints topic(s) to the end and collect ``workflow_id``'s versions
    (from the first topic that has any; an empty history if none does). The topic is
    keyed by workflow id: only the partition the id hashes to is read.

    Example:
        >>> history = await workflow_history(settings.kafka, "doc-1", cps)  # doctest: +SKIP
    """
    codec = codec or Codec()
    candidates = [topics] if isinstance(topics, Topic) else list(topics)
    key = workflow_id.encode()
    for topic in candidates:
        async with TopicReader.for_key(settings, [topic.name], key) as reader:
            records = [r async for r in reader.iter_to_end(timeout=timeout) if r.key == key]
        versions: list[Any] = [  # a None value is a tombstone
            None if r.value is None else await codec.decode(topic, r.value)
            for r in sorted(records, key=lambda r: (r.partition, r.offset))]
        if versions:
            return WorkflowHistory(workflow_id, topic.name, tuple(versions))
    return WorkflowHistory(workflow_id, candidates[0].name if candidates else "", ())


_COLUMNS = ("version", "status", "updated", "next", "completed stages", "error")
_RESULT_COLUMNS = ("stage", "name", "took", "output")


def _version_row(number: int, cp: Checkpoint | None) -> tuple[str, ...]:
    if cp is None:
        return (str(number), "deleted", "-", "-", "-", "(tombstone: retention expired)")
    failure = f"{cp.failed_stage_name} (stage {cp.failed_stage}): {cp.error_class}: {cp.error}"
    return (str(cp.version), cp.status,
            datetime.fromtimestamp(cp.updated_at_ms / 1000, tz=UTC)
            .strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            "-" if cp.next_stage is None else str(cp.next_stage),
            ", ".join(cp.completed_stages) or "-", failure if cp.status == "failed" else "")


def _result_row(r: StageResult) -> tuple[str, ...]:
    return (str(r.stage), r.name, f"{r.finished_at_ms - r.started_at_ms} ms", _short(r.output))


def format_history(history: WorkflowHistory) -> str:
    """The history as aligned plain text (terminals, pipes, logs): a row per version,
    then a row per result of the latest version.

    Example:
        >>> print(format_history(history))  # doctest: +SKIP
        version  status   updated                  next  completed stages
        1        running  2026-01-05 10:00:01.250  1     extract
    """
    if not history.versions:
        return (f"no checkpoints for workflow {history.workflow_id!r} in "
                f"{history.topic or 'any checkpoints topic'}")
    tables = [[_COLUMNS, *(_version_row(n, cp) for n, cp in enumerate(history.versions, 1))]]
    if history.latest is not None:
        tables.append([_RESULT_COLUMNS, *(_result_row(r) for r in history.latest.completed)])
    lines = [f"workflow {history.workflow_id} ({history.topic})"]
    for rows in tables:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["", *("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                        for row in rows)]
    return "\n".join(lines)


def _short(value: Any, limit: int = 100) -> str:
    text = json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= limit else text[:limit - 1] + "…"
