"""A sequential chain: research -> analysis -> synthesis -> review, one agent per step.

Each step is its own agent, wired to the next through a per-step topic; the history
(every step's output) travels with the event. A step function that takes a third
argument (the review) gets it as a ``ChainHistory``; an agent used as a step (the
synthesis), whose handler takes ``(payload, ctx)``, reads it with
``ChainHistory.of(ctx)``. The example sends three briefing
requests on the embedded broker. Two complete and carry all four outputs; one asks
about perpetual motion, which the analysis step refuses, so the chain reports one
``ChainFailed`` naming step 1 (analysis), its agent, the error, and the research it had
already done (the partial results); nothing reaches the completed topic for it.

    .venv/bin/python -m examples.chain
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

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
    Topic,
    agent,
    apply_topics,
)
from mesh.kafka.reader import TopicReader
from mesh.patterns.chain import Chain, ChainCompleted, ChainFailed, ChainHistory

console = Console()


class Question(BaseModel):
    request_id: str
    topic: str


class Findings(BaseModel):
    topic: str
    facts: list[str]


class Analysis(BaseModel):
    topic: str
    claims: list[str]
    confidence: float


class Synthesis(BaseModel):
    topic: str
    summary: str


class Review(BaseModel):
    approved: bool
    notes: str


async def research(question: Question, ctx: Context) -> Findings:
    words = question.topic.split()
    return Findings(topic=question.topic,
                    facts=[f"{question.topic} is discussed in {len(words) * 3} recent papers",
                           f"'{words[-1]}' is the most cited term"])


async def analysis(found: Findings, ctx: Context) -> Analysis:
    if "perpetual motion" in found.topic:
        raise HandlerError(f"findings on {found.topic!r} contradict thermodynamics: "
                           "no sound analysis possible")
    return Analysis(topic=found.topic, claims=[f"{f} (checked)" for f in found.facts],
                    confidence=0.8)


# The synthesis is an agent (it could also run on its own, on these topics); in the
# chain its handler runs on the chain's hop topics, these only type its input and output.
analysed_topic = Topic("briefing.analysed", Analysis, key="topic")
synthesised_topic = Topic("briefing.synthesised", Synthesis, key="topic")


@agent(consumes=analysed_topic, produces=synthesised_topic)
async def synthesis(analysed: Analysis, ctx: Context) -> Synthesis:
    """An agent's handler takes (payload, ctx): it asks its context for the history."""
    findings = ChainHistory.of(ctx).output("research")  # a Findings, two steps back
    return Synthesis(topic=analysed.topic,
                     summary=f"{analysed.topic}: {len(analysed.claims)} checked claims of "
                             f"{len(findings.facts)} facts, confidence "
                             f"{analysed.confidence:.0%}")


async def review(draft: Synthesis, ctx: Context, history: ChainHistory) -> Review:
    """A third argument gets the chain's history: the research, three steps back."""
    findings = history.output("research")
    return Review(approved=len(draft.summary) < 200,
                  notes=f"{'concise' if draft.summary else 'empty'}; checked against "
                        f"{len(findings.facts)} researched facts")


chain = Chain("briefing", [research, analysis, synthesis, review], key="request_id")
app = chain.app  # `mesh dev examples.chain:app` runs every step in one process

QUESTIONS = [Question(request_id="q1", topic="AI agent orchestration"),
             Question(request_id="q2", topic="perpetual motion machines"),
             Question(request_id="q3", topic="event streaming with Kafka")]


async def send(settings: MeshSettings) -> None:
    async with Emitter(settings, source="example") as emitter:
        await emitter.emit(chain.source, QUESTIONS)


async def collect(settings: MeshSettings, timeout: float = 90.0) -> dict[str, Any]:
    """The final event (ChainCompleted or ChainFailed) of each request, by key."""
    codec, found = Codec(), {}
    by_name = {chain.completed.name: chain.completed, chain.failed.name: chain.failed}
    deadline = time.monotonic() + timeout
    async with TopicReader(settings.kafka, list(by_name)) as reader:
        async for record in reader.follow(idle_timeout=timeout):
            event = await codec.decode(by_name[record.topic], record.value or b"")
            found[event.key] = event  # type: ignore[attr-defined]
            if len(found) == len(QUESTIONS) or time.monotonic() > deadline:
                break
    return found


def show(found: dict[str, Any]) -> None:
    for question in QUESTIONS:
        event = found.get(question.request_id)
        if isinstance(event, ChainCompleted):
            table = Table(title=f"{question.request_id}: completed - {question.topic}")
            for column in ("step", "agent", "output"):
                table.add_column(column)
            for out in event.outputs:
                table.add_row(f"{out.index} {out.step}", out.agent, escape(json.dumps(out.output)))
            console.print(table)
        elif isinstance(event, ChainFailed):
            console.print(f"[red]{question.request_id}: ChainFailed[/red] at step "
                          f"{event.failed_step} ({event.failed_step_name}, agent "
                          f"{event.failed_agent}): {escape(event.error_class)}: "
                          f"{escape(event.error)}")
            for out in event.partial_results:
                console.print(f"  partial result of step {out.index} ({out.step}): "
                              f"{escape(json.dumps(out.output))}")
        else:
            console.print(f"[red]{question.request_id}: nothing arrived[/red]")


async def run(bootstrap: str) -> int:
    settings = MeshSettings().with_bootstrap(bootstrap, embedded=True)
    await apply_topics(settings.kafka, chain.topics)
    async with Mesh(settings, chain.agents) as mesh:
        await mesh.wait_assigned()
        await send(settings)
        console.print(f"sent {len(QUESTIONS)} requests to {chain.source.name}; steps: "
                      + " -> ".join(a.name for a in chain.agents))
        found = await collect(settings)
    show(found)
    failed = found.get("q2")
    ok = (all(isinstance(found.get(q), ChainCompleted) for q in ("q1", "q3"))
          and isinstance(failed, ChainFailed) and failed.failed_step == 1
          and [o.index for o in failed.partial_results] == [0])
    return 0 if ok else 1


def main() -> int:
    logging.basicConfig(level=logging.ERROR)  # the refused request's warnings are expected
    with EmbeddedBroker() as broker:
        console.print(f"embedded broker on {broker.bootstrap} (pid {broker.pid})")
        return asyncio.run(run(broker.bootstrap))


if __name__ == "__main__":
    raise SystemExit(main())
