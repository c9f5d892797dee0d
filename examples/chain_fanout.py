"""The chain + fan-out example: four agents as four services on the embedded broker.

researcher -> writer -> editor is a sequential chain; the fact checker consumes the
researcher's topic in its own consumer group beside the writer (fan-out by wiring).
Each agent runs as its own `mesh run` process, the way it would be deployed. The demo
emits a few requests, prints what comes out of both branches and the first request's
trace from the audit topic, and stops everything with SIGTERM (each service finishes
its work, commits and exits 0).

The four agents are declared here (names start with ``demo-``: the reference writing
mesh in agents/ has a researcher and a writer of its own). The writer and the fact
checker both consume ``demo.findings``, each in its own consumer group, so each sees
every event. They are rule-based, so the example runs anywhere with no model or
network; an LLM-backed agent has the same shape (an async handler from payload to
payload). One agent as its own service, or all of them in one process::

    mesh run examples.chain_fanout:writer
    mesh dev examples.chain_fanout:app

    .venv/bin/python -m examples.chain_fanout
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mesh import (
    App,
    Codec,
    Context,
    EmbeddedBroker,
    Emitter,
    Envelope,
    MeshSettings,
    agent,
    apply_topics,
)
from mesh.kafka.reader import TopicReader
from mesh.views.trace import read_trace
from mesh.views.trace_tree import render_trace
from topics.demo import (
    Article,
    Draft,
    FactCheck,
    Findings,
    ResearchRequest,
    articles,
    drafts,
    fact_checks,
    findings,
    requests,
)


@agent(consumes=requests, produces=findings, name="demo-researcher")
async def researcher(request: ResearchRequest, ctx: Context) -> Findings:
    """Gathers facts about the subject."""
    words = request.subject.split()
    facts = [f"{request.subject} has {len(words)} key term(s)"]
    facts += [f"'{w}' is relevant to a {request.audience} audience" for w in words]
    ctx.logger.info("researched %r", request.subject)
    return Findings(request_id=request.request_id, subject=request.subject, facts=facts,
                    sources=[f"kb://{w.lower()}" for w in words])


@agent(consumes=findings, produces=drafts, name="demo-writer")
async def writer(found: Findings, ctx: Context) -> Draft:
    """Turns findings into a draft."""
    body = " ".join(f"{fact}." for fact in found.facts)
    return Draft(request_id=found.request_id, title=f"On {found.subject}", body=body)


@agent(consumes=drafts, produces=articles, name="demo-editor")
async def editor(draft: Draft, ctx: Context) -> Article:
    """Polishes the draft into the final article."""
    body = draft.body[0].upper() + draft.body[1:] if draft.body else draft.body
    return Article(request_id=draft.request_id, title=draft.title.title(), body=body,
                   word_count=len(body.split()))


@agent(consumes=findings, produces=fact_checks, name="demo-fact-checker")
async def fact_checker(found: Findings, ctx: Context) -> FactCheck:
    """Checks every finding has a source (fan-out branch, its own consumer group)."""
    flagged = [f for f in found.facts if not found.sources]
    return FactCheck(request_id=found.request_id, checked=len(found.facts), flagged=flagged)


# requests come from outside (mesh emit, an Emitter); articles and fact checks are read
# outside (mesh tap, a UI): declared, so `mesh graph --strict` passes
app = App("demo", agents=[researcher, writer, editor, fact_checker], sources=[requests],
          sinks=[articles, fact_checks])

ROOT = Path(__file__).resolve().parent.parent
SUBJECTS = ["event streaming for agents", "consumer group rebalancing",
            "dead letter queues", "compacted topics as state", "trace context in headers"]
console = Console()


def start_services(bootstrap: str) -> dict[str, subprocess.Popen[bytes]]:
    env = {**os.environ, "MESH_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
           "MESH_KAFKA__PROFILE": "embedded", "MESH_LOG_LEVEL": "WARNING",
           "MESH_METRICS__HOST": "127.0.0.1"}
    # this module's attribute of each agent: its name without the demo- prefix
    return {a.name: subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "run",
         f"examples.chain_fanout:{a.name.removeprefix('demo-').replace('-', '_')}"],
        env=env, cwd=ROOT)
        for a in app.agents}


async def emit(settings: MeshSettings) -> list[Envelope[ResearchRequest]]:
    requests_ = [ResearchRequest(request_id=f"req-{n + 1}", subject=subject)
                 for n, subject in enumerate(SUBJECTS)]
    async with Emitter(settings, source="demo") as emitter:  # as an existing system would
        return await emitter.emit(requests, requests_)


async def collect(settings: MeshSettings, count: int, timeout: float = 120.0) -> dict:
    codec, found = Codec(), {articles.name: {}, fact_checks.name: {}}
    deadline = time.monotonic() + timeout
    async with TopicReader(settings.kafka, [articles.name, fact_checks.name]) as reader:
        async for record in reader.follow(idle_timeout=timeout):
            topic = articles if record.topic == articles.name else fact_checks
            payload = await codec.decode(topic, record.value or b"")
            found[record.topic][payload.request_id] = (payload, dict(record.headers))
            if all(len(v) >= count for v in found.values()) or time.monotonic() > deadline:
                break
    return found


def show(sent: list[Envelope[ResearchRequest]], found: dict) -> None:
    table = Table(title="What came out of the mesh", show_lines=True)
    for column in ("request", "article (researcher -> writer -> editor)",
                   "fact check (fan-out)", "correlation id"):
        table.add_column(column)
    for env in sent:
        rid = env.payload.request_id
        article, headers = found[articles.name].get(rid, (None, {}))
        check, _ = found[fact_checks.name].get(rid, (None, {}))
        table.add_row(
            f"{rid}\n{env.payload.subject}",
            f"[bold]{article.title}[/bold]\n{article.body[:70]}…\n({article.word_count} words)"
            if article else "[red]missing[/red]",
            f"{check.checked} facts, {len(check.flagged)} flagged"
            if check else "[red]missing[/red]",
            headers.get("mesh-correlation", b"").decode()[:13] + "…")
    console.print(table)


async def show_trace(settings: MeshSettings, first: Envelope[ResearchRequest]) -> None:
    """The first request's way through the mesh, from the audit topic every agent
    publishes to (what `mesh trace <correlation id>` prints)."""
    trace = await read_trace(settings.kafka, first.correlation_id)
    console.print(f"\n[bold]mesh trace {first.correlation_id}[/bold] (from mesh.audit):")
    console.print(render_trace(trace))


async def run(bootstrap: str) -> int:
    settings = MeshSettings().with_bootstrap(bootstrap, embedded=True)
    changes = await apply_topics(settings.kafka, app.topics.values())
    console.print(f"topics: {sum(c.action == 'created' for c in changes)} created "
                  f"({', '.join(sorted(app.topics))} and their .dlq)")
    services = start_services(bootstrap)
    console.print("services: " + ", ".join(f"{n} (pid {p.pid})" for n, p in services.items()))
    try:
        sent = await emit(settings)
        console.print(f"emitted {len(sent)} requests to {requests.name}")
        found = await collect(settings, len(sent))
        show(sent, found)
        complete = all(len(v) == len(sent) for v in found.values())
        await show_trace(settings, sent[0])
    finally:
        for proc in services.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {name: proc.wait(timeout=60) for name, proc in services.items()}
    console.print("services stopped: " + ", ".join(f"{n} exit {c}" for n, c in codes.items()))
    return 0 if complete and not any(codes.values()) else 1


def main() -> int:
    with EmbeddedBroker() as broker:
        console.print(f"embedded broker on {broker.bootstrap} (pid {broker.pid})")
        return asyncio.run(run(broker.bootstrap))


if __name__ == "__main__":
    raise SystemExit(main())
