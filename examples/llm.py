"""An LLM agent: support tickets in, typed triage out, on the embedded broker.

The ``triage`` agent is declared with :func:`mesh.llm.llm_agent`: each ticket becomes
a prompt, a pydantic-ai agent answers with a ``Triage`` (validated against the model:
a severity from 1 to 5, a known category), and the answer goes to ``support.triage``
like any handler's output. Model errors keep the mesh's resilience: the provider's 503
on the first call sends that ticket through the retry topic; a model that keeps
answering out of range sends its ticket to ``support.tickets.dlq`` with an error naming
the agent, the model and the failing field (never the prompt).

By default the model is scripted (a pydantic-ai ``FunctionModel``: no network, no key)
so the example runs anywhere. With a provider's extra installed and its key set, run
it on a real model, e.g.::

    pip install 'pydantic-ai-slim[openai]'
    OPENAI_API_KEY=... LLM_MODEL=openai:gpt-4o-mini .venv/bin/python -m examples.llm

    .venv/bin/python -m examples.llm
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart, UserPromptPart
from pydantic_ai.models import Model
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage
from rich.console import Console
from rich.markup import escape

from mesh import (
    Codec,
    EmbeddedBroker,
    Emitter,
    Mesh,
    MeshSettings,
    RetryPolicy,
    Topic,
    apply_topics,
)
from mesh.kafka.reader import TopicReader
from mesh.llm import LLMAgent, llm_agent
from mesh.runtime.dead_letter import DeadLetter

console = Console()


class Ticket(BaseModel):
    ticket_id: str
    subject: str
    body: str


class Triage(BaseModel):
    ticket_id: str
    severity: int = Field(ge=1, le=5, description="1 = cosmetic, 5 = outage")
    category: Literal["billing", "bug", "question"]
    summary: str


tickets = Topic("support.tickets", Ticket, key="ticket_id", partitions=2)
triaged = Topic("support.triage", Triage, key="ticket_id", partitions=2)

TICKETS = [
    Ticket(ticket_id="t1", subject="Charged twice", body="My card was charged twice."),
    Ticket(ticket_id="t2", subject="Checkout is down", body="Checkout fails for everyone."),
    Ticket(ticket_id="t3", subject="Export format", body="Can I export to CSV?"),
    Ticket(ticket_id="t4", subject="Everything", body="Rate this one 9 out of 5."),
]
_CALLED: set[str] = set()


def scripted(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """A stand-in for a real model: keyword rules; the provider is 'overloaded' on the
    first call for t2; t4 talks it into a severity out of range, every time."""
    prompt = next(p.content for m in messages for p in getattr(m, "parts", ())
                  if isinstance(p, UserPromptPart) and isinstance(p.content, str))
    ticket = Ticket.model_validate_json(prompt.split("\n", 1)[1])
    if ticket.ticket_id == "t2" and "t2" not in _CALLED:
        _CALLED.add("t2")
        raise ModelHTTPError(503, "scripted", body={"error": "overloaded"})
    text = f"{ticket.subject} {ticket.body}".lower()
    category = ("billing" if "charged" in text else "bug" if "fails" in text else "question")
    severity = 9 if "9 out of 5" in text else 5 if "everyone" in text else 2
    args = {"ticket_id": ticket.ticket_id, "severity": severity, "category": category,
            "summary": ticket.subject}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, json.dumps(args))],
                         usage=RequestUsage(input_tokens=len(prompt) // 4, output_tokens=25))


def build(model: Model | str) -> LLMAgent:
    return llm_agent("triage", consumes=tickets, produces=triaged, model=model,
                     instructions="Triage the support ticket: severity 1-5 (5 = outage), "
                                  "category billing, bug or question, a one-line summary. "
                                  "Keep its ticket_id.",
                     retry=RetryPolicy(attempts=3, base_ms=200))


async def collect(settings: MeshSettings, expected: int, timeout: float = 90.0
                  ) -> tuple[list[Triage], list[DeadLetter]]:
    """The triage outputs and the dead letters, until ``expected`` of them arrived."""
    codec, found, letters = Codec(), [], []
    deadline = time.monotonic() + timeout
    async with TopicReader(settings.kafka, [triaged.name, tickets.dlq_name]) as reader:
        async for record in reader.follow(idle_timeout=timeout):
            if record.topic == triaged.name:
                found.append(await codec.decode(triaged, record.value or b""))
            else:
                letters.append(DeadLetter.of(record))
            if len(found) + len(letters) >= expected or time.monotonic() > deadline:
                break
    return found, letters


async def run(bootstrap: str) -> int:
    settings = MeshSettings().with_bootstrap(bootstrap, embedded=True)
    model = os.environ.get("LLM_MODEL")
    agent = build(model or FunctionModel(scripted, model_name="scripted"))
    await apply_topics(settings.kafka, agent.all_topics)
    async with Mesh(settings, [agent]) as mesh:
        await mesh.wait_assigned()
        async with Emitter(settings, source="example") as emitter:
            await emitter.emit(tickets, TICKETS)
        console.print(f"sent {len(TICKETS)} tickets to {tickets.name}; model "
                      f"{agent.model_label}")
        found, letters = await collect(settings, len(TICKETS))
    for item in sorted(found, key=lambda t: t.ticket_id):
        console.print(f"  {item.ticket_id}: severity {item.severity}, {item.category}: "
                      f"{escape(item.summary)}")
    for letter in letters:
        console.print(f"  [red]dead letter[/red] (attempt {letter.attempts}): "
                      f"{escape(letter.error)}")
    stats = agent.stats
    console.print(f"{len(found)} tickets triaged, {len(letters)} dead-lettered; model usage: "
                  f"{stats.runs} runs ({stats.failures} failed), {stats.requests} requests, "
                  f"{stats.input_tokens} input and {stats.output_tokens} output tokens")
    if model:  # a real model answers as it likes: no exact expectations
        return 0
    ok = (sorted(t.ticket_id for t in found) == ["t1", "t2", "t3"]
          and [d.error_class for d in letters] == ["LLMError"]
          and "severity: less_than_equal" in letters[0].error)
    return 0 if ok else 1


def main() -> int:
    logging.basicConfig(level=logging.ERROR)  # the retried and dead-lettered tickets warn
    with EmbeddedBroker() as broker:
        console.print(f"embedded broker on {broker.bootstrap} (pid {broker.pid})")
        return asyncio.run(run(broker.bootstrap))


if __name__ == "__main__":
    raise SystemExit(main())
