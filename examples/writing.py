"""`make demo`: the writing mesh (agents/) writes the seed's blog post, each agent its
own service.

Starts the embedded broker, creates the topics, starts the coordinator and the five
specialists (researcher, analyst, coder, writer, reviewer) as six `mesh run`
processes, submits the seed's request, shows each step live from the workflow's events
and the audit topic (which step, which agent and process, how long, attempts,
re-plans), writes the document to ``out/<workflow>.md``, prints a summary and stops
every service with SIGTERM (each exits 0). On a terminal the steps are a live table;
piped (tests, CI) each change is one line. Offline unless ``MESH_LLM__MODEL`` is set
(then the agents ask that model; see agents/brain.py).

    .venv/bin/python -m examples.writing
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from agents.app import AGENTS, app
from mesh import Codec, EmbeddedBroker, Emitter, MeshSettings, apply_topics
from mesh.kafka.reader import TopicReader
from mesh.patterns.delegation.coordinator import WorkflowEvent, WorkflowOutcome
from mesh.runtime.audit import CONSUMED, RETRY, AuditEvent, audit_topic
from topics.writing import WritingRequest, writing

ROOT = Path(__file__).resolve().parent.parent
SEED = {"task": "Create a technical blog post about MCP servers",
        "requirements": {"word_count": 2000, "include_code": True, "audience": "developers"}}
TIMEOUT_S = 50.0
console = Console()


@dataclass
class Step:
    """One step as the demo saw it."""

    id: str
    agent: str
    dispatched_s: float
    done_s: float | None = None
    status: str = "running"
    attempts: int = 0
    retries: int = 0
    handled_ms: float = 0.0
    replicas: set[str] = field(default_factory=set)


@dataclass
class Progress:
    """The workflow's steps, re-plans and outcome, from the events and the audit."""

    workflow_id: str
    started: float = field(default_factory=time.monotonic)
    steps: dict[str, Step] = field(default_factory=dict)
    replans: int = 0
    outcome: WorkflowOutcome | None = None
    live: bool = False  # a live table shows the steps; say() keeps the last lines for it
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=6))
    # audit records of a step read before its StepDispatched event (another topic)
    early: dict[str, list[AuditEvent]] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def on_event(self, event: WorkflowEvent) -> None:
        now = self.elapsed()
        if event.kind == "StepDispatched" and event.step_id:
            self.steps[event.step_id] = Step(event.step_id, event.specialist or "?", now)
            self.say(f"{event.step_id:<18} -> {event.specialist}")
            for audit in self.early.pop(event.step_id, []):
                self.on_audit(audit)
        elif event.kind in ("StepCompleted", "StepFailed") and event.step_id in self.steps:
            step = self.steps[event.step_id]
            step.done_s, step.status = now, "done" if event.kind == "StepCompleted" else "failed"
            self.say(f"{event.step_id:<18} {step.status} by {step.agent} in "
                     f"{now - step.dispatched_s:.2f} s")
        elif event.kind == "PlanPublished":
            self.replans += (event.plan_version or 1) > 1
            self.say(f"[bold]plan v{event.plan_version}[/bold]: {event.message}")
        elif event.kind == "CheckpointReviewed":
            self.say(f"[magenta]{event.message}[/magenta]")
        elif event.kind in ("WorkflowFailed", "PlanInvalid"):
            self.say(f"[red]{event.message}[/red]")

    def on_audit(self, audit: AuditEvent) -> None:
        """A specialist's handling of a task (attempt, outcome, time, process)."""
        if audit.kind != CONSUMED or not audit.payload or ".tasks." not in (audit.topic or ""):
            return
        task = json.loads(audit.payload)
        if task.get("workflow_id") != self.workflow_id:
            return
        step = self.steps.get(task.get("step_id", ""))
        if step is None:  # its StepDispatched event is not read yet
            self.early.setdefault(task.get("step_id", ""), []).append(audit)
            return
        step.attempts += 1
        step.retries += audit.outcome == RETRY
        step.handled_ms += audit.duration_ms or 0.0
        step.replicas.add(audit.details.get("replica", "?").split(":")[-1])
        if audit.outcome == RETRY:
            self.say(f"[yellow]{step.id:<18} attempt {audit.attempt} failed: "
                     f"{audit.error}[/yellow]")

    def say(self, text: str) -> None:
        line = f"[dim]{self.elapsed():6.2f} s[/dim]  {text}"
        if self.live:
            self.lines.append(line)
        else:
            console.print(line)

    def render(self) -> RenderableType:
        """The live view: every step so far (running ones with their time) and the
        latest events."""
        return Group(steps_table(self, f"workflow {self.workflow_id}: "
                                       f"{self.elapsed():.1f} s, {self.replans} re-plans"),
                     *(Text.from_markup(line) for line in self.lines))


def start_services(bootstrap: str) -> dict[str, subprocess.Popen[bytes]]:
    """Each agent as its own `mesh run agents.<name>:agent` process."""
    env = {**os.environ, "MESH_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
           "MESH_KAFKA__PROFILE": "embedded", "MESH_LOG_LEVEL": "WARNING",
           "MESH_METRICS__ENABLED": "false", "MESH_AUDIT__PAYLOADS": "true",
           "PYTHONPATH": str(ROOT)}
    return {name: subprocess.Popen(
                [sys.executable, "-m", "mesh.cli", "run", f"{module.__name__}:agent"],
                env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
            for name, module in AGENTS.items()}


async def follow(settings: MeshSettings, progress: Progress, request: WritingRequest) -> None:
    """Submit ``request`` and apply the workflow's events and audit until its outcome."""
    codec = Codec()
    names = [writing.events.name, writing.outcomes.name, audit_topic.name]
    async with TopicReader(settings.kafka, names) as reader:
        ends = await reader.seek_to_end()
        async with Emitter(settings, source="demo") as emitter:
            await emitter.emit(writing.requests, [request])
        progress.say(f"submitted {request.workflow_id} to {writing.requests.name}: "
                     f"{request.task!r}")
        deadline = time.monotonic() + TIMEOUT_S
        await reader.caught_up(ends)
        while progress.outcome is None and time.monotonic() < deadline:
            for record in await reader.poll(0.2):
                await apply(codec, progress, record)


async def apply(codec: Codec, progress: Progress, record: Any) -> None:
    if record.topic == audit_topic.name:
        progress.on_audit(await codec.decode(audit_topic, record.value or b""))
        return
    topic = writing.events if record.topic == writing.events.name else writing.outcomes
    payload = await codec.decode(topic, record.value or b"")
    if payload.workflow_id != progress.workflow_id:
        return
    if isinstance(payload, WorkflowOutcome):
        progress.outcome = payload
    else:
        progress.on_event(payload)


def steps_table(progress: Progress, title: str) -> Table:
    """One row per step: agent, status, time taken (so far, while running), attempts,
    the pids that handled it."""
    table = Table(title=title)
    for column in ("step", "agent", "status", "took", "attempts", "pid"):
        table.add_column(column, justify="right" if column in ("took", "attempts") else "left")
    now = progress.elapsed()
    for step in progress.steps.values():
        took = (step.done_s if step.done_s is not None else now) - step.dispatched_s
        table.add_row(step.id, step.agent, step.status, f"{took:.2f} s", str(step.attempts),
                      ",".join(sorted(step.replicas)) or "-")
    return table


def totals(progress: Progress) -> str:
    out = progress.outcome
    final = out.final_output if out and isinstance(out.final_output, dict) else {}
    usage = final.get("usage", {})
    agents = {s.agent for s in progress.steps.values()}
    return (f"{len(progress.steps)} steps, {len(agents)} agents, "
            f"{sum(s.retries for s in progress.steps.values())} retries, "
            f"{progress.replans} re-plans, {usage.get('fallbacks', 0)} fallbacks, "
            f"{usage.get('tokens', 0)} tokens{cost_text(out)} "
            f"({', '.join(usage.get('brains', [])) or '-'}), {progress.elapsed():.1f} s")


def cost_text(out: WorkflowOutcome | None) -> str:
    """``", $0.0123"``: what the workflow's model calls cost (the usage its steps
    reported, priced by pydantic-ai); nothing offline or for a model without a price.

    Example:
        >>> from mesh.patterns.delegation.budget import Usage
        >>> out = WorkflowOutcome(workflow_id="w", success=True, usage=Usage(cost=0.0123))
        >>> cost_text(out), cost_text(None)
        (', $0.0123', '')
    """
    cost = out.usage.cost if out is not None and out.usage is not None else 0.0
    return f", ${cost:.4f}" if cost >= 0.00005 else (f", ${cost:.2g}" if cost else "")


def write_document(progress: Progress, out_dir: Path) -> Path | None:
    """The document (or, for a failed workflow, its last draft) in ``out_dir``."""
    out = progress.outcome
    drafts = [r for r in (out.step_results.values() if out else [])
              if isinstance(r, dict) and "markdown" in r]
    document = out.final_output if out and isinstance(out.final_output, dict) else (
        drafts[-1] if drafts else None)
    if document is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{progress.workflow_id}.md"
    path.write_text(document.get("markdown", ""), encoding="utf-8")
    return path


def stop(services: dict[str, subprocess.Popen[bytes]]) -> dict[str, int]:
    for proc in services.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    return {name: proc.wait(timeout=60) for name, proc in services.items()}


async def run(bootstrap: str) -> int:
    settings = MeshSettings().with_bootstrap(bootstrap, embedded=True)
    await apply_topics(settings.kafka, [*app.topics.values(), audit_topic])
    model = os.environ.get("MESH_LLM__MODEL")
    console.print(f"topics created; brain: {f'model {model}' if model else 'offline'}")
    services = start_services(bootstrap)
    console.print("services: " + ", ".join(f"{n} (pid {p.pid})" for n, p in services.items()))
    request = WritingRequest.model_validate(SEED)
    progress = Progress(request.workflow_id, live=console.is_terminal)
    live = Live(get_renderable=progress.render, console=console, refresh_per_second=8,
                transient=True)
    try:
        with live if progress.live else nullcontext():
            await follow(settings, progress, request)
    finally:
        codes = stop(services)
    console.print(steps_table(progress, f"workflow {progress.workflow_id}"))
    path = write_document(progress, ROOT / "out")
    out = progress.outcome
    final = out.final_output if out and isinstance(out.final_output, dict) else {}
    if out is None:
        console.print(f"[red]no outcome within {TIMEOUT_S:.0f} s[/red]")
    elif not out.success:
        console.print(f"[red]workflow failed at {out.failed_step}: {out.error}[/red]")
        console.print(f"last draft written to {path}" if path else "no draft written")
    else:
        console.print(f"[bold]{final.get('title')}[/bold]: {final.get('words')} words, "
                      f"review: approved after {final.get('review_rounds')} round(s)")
        console.print(f"document written to {path}")
    console.print("summary: " + totals(progress))
    console.print("services stopped: " + ", ".join(f"{n} exit {c}" for n, c in codes.items()))
    ok = out is not None and out.success and not any(codes.values())
    return 0 if ok else 1


def main() -> int:
    with EmbeddedBroker() as broker:
        console.print(f"embedded broker on {broker.bootstrap} (pid {broker.pid})")
        return asyncio.run(run(broker.bootstrap))


if __name__ == "__main__":
    raise SystemExit(main())
