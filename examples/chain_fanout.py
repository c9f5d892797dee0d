"""The chain + fan-out example: four agents as four services on the embedded broker.

researcher -> writer -> editor is a sequential chain; the fact checker consumes the
researcher's topic in its own consumer group beside the writer (fan-out by wiring).
Each agent runs as its own `mesh run` process, the way it would be deployed. The demo
emits a few requests, prints what comes out of both branches and the first request's
trace from the audit topic, and stops everything with SIGTERM (each service finishes
its work, commits and exits 0).
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

from agents.demo import app
from mesh import Codec, EmbeddedBroker, Emitter, Envelope, MeshSettings, apply_topics
from mesh.kafka.reader import TopicReader
from mesh.views.trace import read_trace
from mesh.views.trace_tree import render_trace
from topics.demo import ResearchRequest, articles, fact_checks, requests

ROOT = Path(__file__).resolve().parent.parent
SUBJECTS = ["event streaming for agents", "consumer group rebalancing",
            "dead letter queues", "compacted topics as state", "trace context in headers"]
console = Console()


def start_services(bootstrap: str) -> dict[str, subprocess.Popen[bytes]]:
    env = {**os.environ, "MESH_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
           "MESH_KAFKA__PROFILE": "embedded", "MESH_LOG_LEVEL": "WARNING",
           "MESH_METRICS__HOST": "127.0.0.1"}
    # agents.demo's attribute of each agent: its name without the demo- prefix
    return {a.name: subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "run",
         f"agents.demo:{a.name.removeprefix('demo-').replace('-', '_')}"], env=env, cwd=ROOT)
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
