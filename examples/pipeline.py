"""A checkpointed document pipeline: extract -> classify -> summarise -> index.

After every stage the pipeline writes the document's workflow state to the compacted
``documents.checkpoints`` topic (keyed by ``doc_id``); a restarted pipeline rebuilds
from it and resumes at the next stage. The example runs the pipeline agent on the
embedded broker, sends four documents (one has no text and fails at classify), prints
how each ended, then the checkpoint history of one workflow and of the failed one: what
``mesh workflows show ID`` shows.

    .venv/bin/python -m examples.pipeline
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter

from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mesh import (
    Codec,
    Context,
    EmbeddedBroker,
    Emitter,
    HandlerError,
    Mesh,
    MeshSettings,
    apply_topics,
)
from mesh.kafka.reader import TopicReader
from mesh.patterns.pipeline import Pipeline, StageRun, WorkflowResult
from mesh.views.workflows import format_history, workflow_history
from topics.pipeline import Document, document_pipeline, documents

console = Console()
TOPICS = {"streaming": {"kafka", "partition", "consumer", "offset"},
          "agents": {"agent", "llm", "planner", "tool"}}


class Extracted(BaseModel):
    sentences: list[str]
    words: int


class Classified(BaseModel):
    label: str
    confidence: float


async def extract(run: StageRun[Document], ctx: Context) -> Extracted:
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", run.input.text) if s.strip()]
    return Extracted(sentences=sentences, words=len(run.input.text.split()))


async def classify(run: StageRun[Document], ctx: Context) -> Classified:
    found = run.result("extract", Extracted)
    if not found.words:
        raise HandlerError(f"document {run.workflow_id!r} has no text to classify")
    words = Counter(w.lower().strip(".,") for w in run.input.text.split())
    scores = {label: sum(words[t] for t in terms) for label, terms in TOPICS.items()}
    label = max(scores, key=lambda k: scores[k])
    return Classified(label=label, confidence=scores[label] / max(found.words, 1))


async def summarise(run: StageRun[Document], ctx: Context) -> dict[str, str]:
    first = run.result("extract", Extracted).sentences[0]
    return {"summary": f"[{run.result('classify', Classified).label}] {first}"}


async def index(run: StageRun[Document], ctx: Context) -> dict[str, list[str]]:
    terms = sorted({w.lower().strip(".,") for w in run.input.text.split() if len(w) > 6})
    return {"terms": terms[:6]}


pipeline = Pipeline(document_pipeline, [extract, classify, summarise, index],
                    retention_s=7 * 86_400)
agent = pipeline.agent  # `mesh run examples.pipeline:agent` runs it as a service

DOCS = [
    Document(doc_id="doc-1", title="Partitions",
             text="Kafka keeps order per partition. A consumer group splits partitions "
                  "among its members, and each consumer commits its offset."),
    Document(doc_id="doc-2", title="Planners",
             text="An agent asks a planner for steps. Each tool call is an LLM agent step."),
    Document(doc_id="doc-3", title="Empty", text=""),
    Document(doc_id="doc-4", title="Offsets",
             text="Offsets tell a consumer where to resume. Kafka stores them per group."),
]


async def send(settings: MeshSettings) -> None:
    async with Emitter(settings, source="example") as emitter:
        await emitter.emit(documents, DOCS)


async def collect(settings: MeshSettings, timeout: float = 90.0) -> dict[str, WorkflowResult]:
    codec, found = Codec(), {}
    topic = document_pipeline.results
    deadline = time.monotonic() + timeout
    async with TopicReader(settings.kafka, [topic.name]) as reader:
        async for record in reader.follow(idle_timeout=timeout):
            result = await codec.decode(topic, record.value or b"")
            found[result.workflow_id] = result  # type: ignore[attr-defined]
            if len(found) == len(DOCS) or time.monotonic() > deadline:
                break
    return found  # type: ignore[return-value]


def show(results: dict[str, WorkflowResult]) -> None:
    table = Table(title="How each document ended", show_lines=True)
    for column in ("document", "status", "results / error"):
        table.add_column(column)
    for doc in DOCS:
        result = results.get(doc.doc_id)
        if result is None:
            table.add_row(doc.doc_id, "[red]missing[/red]", "")
        elif result.status == "completed":
            table.add_row(doc.doc_id, "completed",
                          escape(f"{result.results['summarise']['summary']}\n"
                                 f"terms: {', '.join(result.results['index']['terms'])}"))
        else:
            table.add_row(doc.doc_id, "[red]failed[/red]",
                          escape(f"at {result.failed_stage_name} (stage {result.failed_stage}): "
                                 f"{result.error}"))
    console.print(table)


async def run(bootstrap: str) -> int:
    settings = MeshSettings().with_bootstrap(bootstrap, embedded=True)
    await apply_topics(settings.kafka, document_pipeline.all())
    async with Mesh(settings, [agent]) as mesh:
        await mesh.wait_assigned()
        await send(settings)
        console.print(f"sent {len(DOCS)} documents to {documents.name}")
        results = await collect(settings)
    show(results)
    for doc_id in ("doc-1", "doc-3"):
        history = await workflow_history(settings.kafka, doc_id, document_pipeline.checkpoints)
        console.print(f"\n[bold]checkpoint history of {doc_id}[/bold] "
                      f"(what `mesh workflows show {doc_id}` prints)")
        print(format_history(history))
    expected = {"doc-1": "completed", "doc-2": "completed", "doc-3": "failed",
                "doc-4": "completed"}
    return 0 if {k: r.status for k, r in results.items()} == expected else 1


def main() -> int:
    logging.basicConfig(level=logging.ERROR)  # the failing document's warnings are expected
    with EmbeddedBroker() as broker:
        console.print(f"embedded broker on {broker.bootstrap} (pid {broker.pid})")
        return asyncio.run(run(broker.bootstrap))


if __name__ == "__main__":
    raise SystemExit(main())
