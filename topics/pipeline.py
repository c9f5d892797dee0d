"""Topics of the document pipeline (examples/pipeline.py): documents arrive on
``documents.incoming`` keyed by ``doc_id`` (the workflow id); the pipeline's own topics
(tasks, the compacted checkpoints, stage events, results) come from
:meth:`PipelineTopics.named`; ``mesh topics apply`` and ``mesh schemas export`` find
them in the bundle."""

from __future__ import annotations

from pydantic import BaseModel

from mesh import Topic
from mesh.patterns.pipeline import PipelineTopics


class Document(BaseModel):
    """A document to extract, classify, summarise and index."""

    doc_id: str
    title: str
    text: str
    language: str = "en"


documents = Topic("documents.incoming", Document, key="doc_id", partitions=3)
document_pipeline = PipelineTopics.named("documents", documents)
