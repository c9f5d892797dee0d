"""Hierarchical delegation, the reference mesh of agents/ in one process.

The coordinator (agents/coordinator.py) plans the request, delegates each step to a
specialist (researcher, analyst, coder, writer, reviewer), reviews the draft at a
checkpoint (re-planning from the reviewer's feedback) and synthesises the document.
Here every agent runs in this process (one ``Mesh``, as ``mesh dev agents.app:app``
runs them while you work on them) on the embedded broker; ``examples/writing.py``
(``make demo``) runs the same agents as one ``mesh run`` service each. The example
submits one request, prints the plan and each step from the workflow's events, and the
outcome: the document's words against the requested count, its sections and code
blocks; it writes the document to ``OUT_DIR/<workflow>.md`` (default ``out/``). Offline
unless ``MESH_LLM__MODEL`` is set (see agents/brain.py).

    .venv/bin/python -m examples.delegation [OUT_DIR]
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

from rich.console import Console

from agents.app import app
from agents.document import code_blocks, count_words, sections
from mesh import Codec, EmbeddedBroker, Emitter, Mesh, MeshSettings, apply_topics
from mesh.kafka.reader import TopicReader
from mesh.patterns.delegation.coordinator import WorkflowEvent, WorkflowOutcome
from topics.writing import Requirements, WritingRequest, writing

ROOT = Path(__file__).resolve().parent.parent
REQUEST = WritingRequest(task="Write a short guide about MCP servers for developers",
                         requirements=Requirements(word_count=800, include_code=True,
                                                   audience="developers"))
TIMEOUT_S = 60.0
console = Console(highlight=False)


async def submit(settings: MeshSettings, request: WritingRequest) -> WorkflowOutcome | None:
    """Send ``request``, print its events as they come, return its outcome."""
    codec, started = Codec(), time.monotonic()
    async with TopicReader(settings.kafka, [writing.events.name, writing.outcomes.name]
                           ) as reader:
        ends = await reader.seek_to_end()
        async with Emitter(settings, source="example") as emitter:
            await emitter.emit(writing.requests, [request])
        await reader.caught_up(ends)
        while time.monotonic() - started < TIMEOUT_S:
            for record in await reader.poll(0.2):
                topic = writing.events if record.topic == writing.events.name \
                    else writing.outcomes
                payload = await codec.decode(topic, record.value or b"")
                if getattr(payload, "workflow_id", None) != request.workflow_id:
                    continue
                if isinstance(payload, WorkflowOutcome):
                    return payload
                if isinstance(payload, WorkflowEvent):
                    show(payload, time.monotonic() - started)
    return None


def show(event: WorkflowEvent, elapsed: float) -> None:
    if event.kind == "StepDispatched":
        text = f"{event.step_id} -> {event.specialist}"
    elif event.kind in ("PlanPublished", "CheckpointReviewed", "WorkflowFailed"):
        text = f"{event.kind}: {event.message}"
    else:
        return
    console.print(f"{elapsed:6.2f} s  {text}", markup=False)


def report(request: WritingRequest, outcome: WorkflowOutcome | None, out_dir: Path) -> bool:
    """Print what a reader checks first; True if the workflow succeeded."""
    if outcome is None:
        console.print(f"[red]no outcome within {TIMEOUT_S:.0f} s[/red]")
        return False
    if not outcome.success:
        console.print(f"[red]workflow failed at {outcome.failed_step}: {outcome.error}[/red]")
        return False
    final = outcome.final_output
    doc, asked = final["markdown"], request.requirements.word_count
    path = out_dir / f"{request.workflow_id}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    console.print(f"workflow succeeded: {final['title']!r}, {count_words(doc)} words "
                  f"(asked {asked} +-10 %), review approved after "
                  f"{final['review_rounds']} round(s), {len(outcome.step_results)} steps",
                  markup=False)
    console.print(f"sections: {', '.join(sections(doc))}", markup=False)
    console.print(f"code blocks: {', '.join(b.language or '?' for b in code_blocks(doc))}")
    console.print(f"document written to {path}", markup=False)
    return True


async def run(bootstrap: str, out_dir: Path) -> int:
    settings = MeshSettings().with_bootstrap(bootstrap, embedded=True)
    await apply_topics(settings.kafka, app.topics.values())
    async with Mesh(settings, app.agents) as mesh:
        await mesh.wait_assigned()
        console.print(f"in this process: {', '.join(a.name for a in app.agents)}")
        req = REQUEST.requirements
        console.print(f"submitted {REQUEST.workflow_id}: {REQUEST.task!r} ({req.word_count} "
                      f"words, code: {req.include_code}, for {req.audience})", markup=False)
        outcome = await submit(settings, REQUEST)
    return 0 if report(REQUEST, outcome, out_dir) else 1


def main() -> int:
    # one process, no plan key: the "runs UNSIGNED" warnings of each agent are expected
    logging.getLogger("mesh.patterns.delegation.signing").setLevel(logging.ERROR)
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "out"
    with EmbeddedBroker() as broker:
        console.print(f"embedded broker on {broker.bootstrap}")
        return asyncio.run(run(broker.bootstrap, out_dir))


if __name__ == "__main__":
    raise SystemExit(main())
