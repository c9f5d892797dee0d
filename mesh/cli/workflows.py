"""Commands on delegated workflows: ``submit`` a request (and follow it), ``approve`` or
``reject`` a step, ``workflows show`` a checkpoint history, the ``workers`` table."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from mesh.cli.common import DEFAULT_MODULES, ModulesOpt, _declared, _require_cluster, _settings, err
from mesh.config import MeshSettings
from mesh.errors import TransportError
from mesh.kafka.reader import TopicReader
from mesh.runtime.emitter import Emitter
from mesh.serde.codec import Codec
from mesh.topic import Topic


def submit(topic_name: Annotated[str, typer.Argument(metavar="TOPIC")],
           payload: Annotated[str, typer.Argument(help="The request, as JSON")],
           follow: Annotated[bool, typer.Option(
               "--follow", help="Print the workflow's events until its outcome")] = False,
           timeout: Annotated[float, typer.Option(
               help="Seconds --follow waits for the outcome")] = 300.0,
           modules: ModulesOpt = DEFAULT_MODULES) -> None:
    """Send a request to a running delegation mesh (validated like `mesh emit`); with
    --follow, print its workflow's events (stderr) and outcome (JSON, stdout): exit 0
    when it succeeded, 1 when it failed or timed out."""
    settings = _settings()
    _require_cluster(settings)
    declared = _declared(modules)
    topic = declared.get(topic_name)
    if topic is None:
        raise typer.BadParameter(f"Topic {topic_name!r} is not declared in {modules}.")
    try:
        request = topic.model.model_validate_json(payload)
    except ValidationError as exc:
        err.print(f"[red]invalid {topic.model.__name__}:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    prefix = topic_name.removesuffix(".requests")
    events, outcomes = declared.get(f"{prefix}.events"), declared.get(f"{prefix}.outcomes")
    if follow and (events is None or outcomes is None or topic.key is None):
        raise typer.BadParameter(
            f"{topic_name!r} is not the requests topic of a delegation mesh: --follow reads "
            f"{prefix}.events and {prefix}.outcomes, which are not declared in {modules}. "
            "Submit to <mesh>.requests, or drop --follow (or use mesh emit).")
    watched = (events, outcomes) if follow and events and outcomes else None
    outcome = asyncio.run(_submit(settings, topic, request, watched, timeout))
    if not follow:
        return
    if outcome is None:
        err.print(f"[red]no outcome for the workflow within {timeout:.0f} s[/red]")
        raise typer.Exit(1)
    print(outcome.model_dump_json())
    raise typer.Exit(0 if getattr(outcome, "success", False) else 1)


async def _submit(settings: MeshSettings, topic: Topic[Any], request: Any,
                  follow: tuple[Topic[Any], Topic[Any]] | None, timeout: float) -> Any:
    """Emit ``request``; when following, the workflow's outcome (None on timeout)."""
    async def send() -> None:
        async with Emitter(settings, source="submit") as emitter:
            env = (await emitter.emit(topic, [request]))[0]
        print(json.dumps({"topic": topic.name, "workflow_id": str(getattr(request, key)),
                          "event_id": env.event_id, "correlation_id": env.correlation_id}),
              flush=True)

    key = topic.key or "workflow_id"
    if follow is None:
        await send()
        return None
    events, outcomes = follow
    workflow = str(getattr(request, key)).encode()
    codec = Codec(settings.schema_registry)
    async with TopicReader.for_key(settings.kafka, [events.name, outcomes.name],
                                   workflow) as reader:
        await reader.seek_to_end()
        await send()
        clock = asyncio.get_running_loop().time
        deadline, outcome, ended = clock() + timeout, None, False
        view = _FollowView(live=err.is_terminal)
        # The outcome and the events are two topics: after the outcome, print the events
        # still on their way up to the workflow's last one (for a few seconds at most).
        with view.live or contextlib.nullcontext():
            while clock() < deadline and not (ended and outcome is not None):
                for record in await reader.poll(0.5):
                    if record.key != workflow:
                        continue
                    if record.topic == outcomes.name:
                        outcome = await codec.decode(outcomes, record.value or b"")
                        deadline = min(deadline, clock() + 5.0)
                        continue
                    event: Any = await codec.decode(events, record.value or b"")
                    view.show(event)
                    ended = ended or getattr(event, "kind", "") in ("WorkflowCompleted",
                                                                     "WorkflowFailed")
    return outcome


_STEP_STATUS = {"StepDispatched": "running", "StepCompleted": "done", "StepFailed": "failed",
                "ApprovalRequested": "waiting for approval", "StepApproved": "approved",
                "StepRejected": "rejected"}


class _FollowView:
    """What `mesh submit --follow` shows of a workflow's events: on a terminal a live
    table of its steps (specialist, status, seconds since dispatch) above the latest
    events; otherwise one line per event, which scripts and tests read."""

    def __init__(self, *, live: bool) -> None:
        self.steps: dict[str, tuple[str, str, float, float | None]] = {}
        self.lines: collections.deque[str] = collections.deque(maxlen=6)
        self.live = Live(get_renderable=self.render, console=err,
                         refresh_per_second=4) if live else None

    def show(self, event: Any) -> None:
        kind, step_id = str(getattr(event, "kind", "event")), getattr(event, "step_id", None)
        step = f" {step_id}" if step_id else ""
        line = f"{kind}{step}: {escape(str(getattr(event, 'message', '')))}"
        if self.live is None:
            err.print(line)
            return
        self.lines.append(line)
        status = _STEP_STATUS.get(kind)
        if step_id and status:
            agent, _, since, _ = self.steps.get(step_id, ("", "", time.monotonic(), None))
            done = time.monotonic() if status in ("done", "failed", "rejected") else None
            self.steps[step_id] = (getattr(event, "specialist", None) or agent, status, since,
                                   done)

    def render(self) -> Group:
        table, now = Table("step", "specialist", "status", "s"), time.monotonic()
        for step_id, (agent, status, since, done) in self.steps.items():
            table.add_row(step_id, agent or "-", status, f"{(done or now) - since:.1f}")
        return Group(table, *(Text.from_markup(line) for line in self.lines))


DecisionTopicOpt = Annotated[str | None, typer.Option(
    "--topic", help="The decisions topic (or the mesh's prefix); without it, the one "
    "mesh whose workflows table holds the workflow")]
ByOpt = Annotated[str | None, typer.Option("--by", help="Who decides (default: $USER)")]


def _decide(workflow_id: str, step_id: str, *, approved: bool, by: str | None, reason: str,
            modules: list[str], topic_name: str | None) -> None:
    """Send a decision on a step waiting for approval (signed when the plan key is set)."""
    import getpass

    from mesh.patterns.delegation.approval import Decision, decision_topic, send_decision

    settings = _settings()
    _require_cluster(settings)
    declared = list(_declared(modules).values())
    deciding = [t for t in declared if t.model is Decision]
    if topic_name is None and len(deciding) > 1:  # several meshes: the one with the workflow
        topic_name = asyncio.run(_mesh_of(settings, declared, deciding, workflow_id))
    topic = decision_topic(declared, topic_name)
    try:
        by = by or getpass.getuser()
    except (KeyError, OSError):  # no user name in this environment (a bare container)
        by = "unknown"
    decision = Decision(workflow_id=workflow_id, step_id=step_id, approved=approved, by=by,
                        reason=reason)
    env = asyncio.run(send_decision(settings, topic, decision))
    print(json.dumps({"topic": topic.name, "workflow_id": workflow_id, "step_id": step_id,
                      "approved": approved, "by": decision.by, "event_id": env.event_id,
                      "signed": settings.security.plan_key is not None}))


async def _mesh_of(settings: MeshSettings, declared: list[Topic[Any]],
                   deciding: list[Topic[Any]], workflow_id: str) -> str | None:
    """The decisions topic of the one mesh whose workflows table holds ``workflow_id``
    (``<prefix>.workflows`` beside ``<prefix>.decisions``); None when not exactly one
    does (then ``decision_topic`` asks for --topic)."""
    from mesh.patterns.delegation.workflow import WorkflowState

    tables = {t.name: t for t in declared if t.model is WorkflowState}
    key = workflow_id.encode()
    holding = []
    for topic in deciding:
        table = tables.get(topic.name.removesuffix(".decisions") + ".workflows")
        if table is None:
            continue
        try:
            async with TopicReader.for_key(settings.kafka, [table.name], key) as reader:
                if any([r.key == key async for r in reader.iter_to_end(timeout=30)]):
                    holding.append(topic.name)
        except TransportError:  # a mesh whose topics were never created here
            continue
    return holding[0] if len(holding) == 1 else None


def approve(workflow_id: Annotated[str, typer.Argument(metavar="WORKFLOW")],
            step_id: Annotated[str, typer.Argument(metavar="STEP")], by: ByOpt = None,
            reason: Annotated[str, typer.Option(help="Why (optional)")] = "",
            modules: ModulesOpt = DEFAULT_MODULES, topic: DecisionTopicOpt = None) -> None:
    """Approve a delegated step waiting for approval: the coordinator dispatches it."""
    _decide(workflow_id, step_id, approved=True, by=by, reason=reason, modules=modules,
            topic_name=topic)


def reject(workflow_id: Annotated[str, typer.Argument(metavar="WORKFLOW")],
           step_id: Annotated[str, typer.Argument(metavar="STEP")],
           reason: Annotated[str, typer.Option(help="Why (in the failed outcome)")],
           by: ByOpt = None, modules: ModulesOpt = DEFAULT_MODULES,
           topic: DecisionTopicOpt = None) -> None:
    """Reject a delegated step waiting for approval: its workflow fails with the reason."""
    _decide(workflow_id, step_id, approved=False, by=by, reason=reason, modules=modules,
            topic_name=topic)


def workflows_show(workflow_id: str, modules: ModulesOpt = DEFAULT_MODULES) -> None:
    """A workflow's checkpoint history (every version) and its current state."""
    from mesh.views.workflows import checkpoint_topics, format_history, workflow_history

    settings = _settings()
    _require_cluster(settings)
    topics = checkpoint_topics(_declared(modules).values())
    if not topics:
        raise typer.BadParameter(f"No checkpoint topic declared in {modules}.")
    history = asyncio.run(workflow_history(settings.kafka, workflow_id, topics))
    if not history.found:
        err.print(f"no checkpoints for workflow {workflow_id!r} in "
                  f"{', '.join(t.name for t in topics)}")
        raise typer.Exit(1)
    print(format_history(history))


def workers(topic: Annotated[str | None, typer.Option(
                help="Worker status topic (default: every declared one)")] = None,
            stale_after: Annotated[float, typer.Option(help="Flag heartbeats older (s)")] = 10.0,
            modules: ModulesOpt = DEFAULT_MODULES) -> None:
    """The workers table: status, current task, failures, tasks done, throughput."""
    from mesh.patterns.supervision.worker import WorkerStatus
    from mesh.views.workers import load_workers, render_workers

    settings = _settings()
    _require_cluster(settings)
    declared = _declared(modules)
    topics = [t for name, t in sorted(declared.items())
              if (topic is None or name == topic) and t.model is WorkerStatus]
    if not topics:
        raise typer.BadParameter(f"No worker status topic {topic or ''} declared in {modules}.")
    for status in topics:
        rows = asyncio.run(load_workers(settings.kafka, status))
        Console(width=max(120, Console().width)).print(
            render_workers(rows, stale_after_s=stale_after))
