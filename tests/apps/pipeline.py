"""A four-stage checkpointed pipeline (extract -> classify -> summarise -> index) for the
pipeline tests; `mesh run tests.apps.pipeline:agent` runs it with the topics of the
test named by ``MESH_TEST_PREFIX``.

Every stage sleeps the document's ``sleep_ms``, raises ``ValueError`` when the
document's ``fail_at`` names it, and returns the list of stages run so far (read from
the previous stage's result, so the accumulated results are what a stage sees).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from pydantic import BaseModel

from mesh import Context, Topic
from mesh.patterns.pipeline import Pipeline, PipelineTopics, Stage, StageRun

STAGES = ("extract", "classify", "summarise", "index")


class Doc(BaseModel):
    """One document to process; ``doc_id`` is the workflow id."""

    doc_id: str
    text: str
    sleep_ms: int = 0
    fail_at: str = ""


def _stage(name: str, index: int) -> Stage:
    async def run(run: StageRun[Doc], ctx: Context) -> dict[str, Any]:
        doc = run.input
        if doc.sleep_ms:
            await asyncio.sleep(doc.sleep_ms / 1000)
        if doc.fail_at == name:
            raise ValueError(f"stage {name} cannot handle document {doc.doc_id}")
        before = run.result(STAGES[index - 1])["stages"] if index else []
        return {"doc": doc.doc_id, "stages": [*before, name], "words": len(doc.text.split())}

    return Stage(run, name)


def build(prefix: str, *, retention_s: float | None = None,
          sweep_every_s: float | None = None, partitions: int = 3) -> Pipeline:
    """The pipeline with topics named ``<prefix>.*``."""
    source = Topic(f"{prefix}.docs", Doc, key="doc_id", partitions=partitions)
    topics = PipelineTopics.named(f"{prefix}.pipe", source)
    return Pipeline(topics, [_stage(n, i) for i, n in enumerate(STAGES)],
                    retention_s=retention_s, sweep_every_s=sweep_every_s)


PREFIX = os.environ.get("MESH_TEST_PREFIX", "pipeline")
pipeline = build(PREFIX)
agent = pipeline.agent
topics = pipeline.topics  # module level: `mesh workflows show` finds its checkpoints
