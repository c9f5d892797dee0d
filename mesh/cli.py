"""The ``mesh`` command: run agents, manage topics and schemas, emit and tap events.

Every command reads its settings from the environment (``MESH_`` prefix, see
:mod:`mesh.config`). Without ``MESH_KAFKA__BOOTSTRAP_SERVERS``, ``run`` and ``dev``
start the embedded broker and create the declared topics themselves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from mesh.agent import Agent, App
from mesh.config import MeshSettings
from mesh.envelope import Envelope
from mesh.errors import MeshError
from mesh.kafka.admin import Admin
from mesh.kafka.apache import ApacheKafka
from mesh.kafka.base import Record
from mesh.kafka.embedded import EmbeddedBroker
from mesh.kafka.provision import apply_topics
from mesh.kafka.reader import TopicReader
from mesh.runtime.audit import audit_topic
from mesh.runtime.dead_letter import DLQ_HEADERS, DeadLetter
from mesh.runtime.emitter import Emitter
from mesh.runtime.host import Mesh
from mesh.serde.codec import Codec
from mesh.serde.history import check_schemas, export_schemas
from mesh.topic import DLQ_SUFFIX, Topic, discover_topics
from mesh.views.dlq import parse_where, read_dead_letters, replay

app = typer.Typer(help="Kafka agent mesh: agents as stream processors on typed topics.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
topics_app = typer.Typer(help="Declared topics on the broker.", no_args_is_help=True)
schemas_app = typer.Typer(help="Avro schemas in schemas/.", no_args_is_help=True)
dlq_app = typer.Typer(help="Dead-letter topics: list, show, replay.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
workflows_app = typer.Typer(help="Checkpointed workflows.", no_args_is_help=True)
app.add_typer(workflows_app, name="workflows")
app.add_typer(topics_app, name="topics")
app.add_typer(schemas_app, name="schemas")

err = Console(stderr=True, soft_wrap=True)
logger = logging.getLogger("mesh.cli")

ModulesOpt = Annotated[list[str], typer.Option(
    "--topics", "-t", help="Module(s) declaring topics (searched with submodules).")]
DEFAULT_MODULES = ["topics"]


def main() -> None:
    """Entry point of the ``mesh`` script."""
    try:
        app()
    except MeshError as exc:
        err.print(f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))}")
        sys.exit(1)


def _settings() -> MeshSettings:
    try:
        settings = MeshSettings()
    except ValidationError as exc:  # inputs are hidden: secrets never reach the terminal
        err.print(f"[red]invalid settings:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    for chatty in ("httpx", "httpcore"):  # the registry client logs every call at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)
    return settings


def load(spec: str) -> Any:
    """The object named by ``module:attribute``."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise typer.BadParameter(f"{spec!r}: expected module:attribute, e.g. agents.demo:app")
    sys.path.insert(0, str(Path.cwd()))
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _agents_of(obj: Any, spec: str) -> list[Agent[Any]]:
    if isinstance(obj, Agent):
        return [obj]
    if isinstance(obj, App):
        return list(obj.agents)
    raise typer.BadParameter(f"{spec} is a {type(obj).__name__}, not an Agent or an App.")


async def _serve(agents: list[Agent[Any]], settings: MeshSettings, apply: bool) -> None:
    broker = EmbeddedBroker() if settings.kafka.embedded else None
    try:
        if broker is not None:
            await broker.__aenter__()
            settings = settings.with_bootstrap(broker.bootstrap, embedded=True)
            err.print(f"embedded broker on {broker.bootstrap} (pid {broker.pid})")
            apply = True
        mesh = Mesh(settings, agents, create_topics=apply)
        if settings.metrics.enabled:
            mesh.metrics.serve(settings.metrics.port, host=settings.metrics.host)  # logs where
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, mesh.stop_event.set)
        names = ", ".join(a.name for a in agents)
        logger.info("running %s (stop with SIGTERM or Ctrl-C)", names)
        await mesh.run()
        logger.info("stopped %s cleanly", names)
    finally:
        if broker is not None:
            await broker.__aexit__()


@app.command()
def run(target: Annotated[str, typer.Argument(help="module:agent (or module:app)")],
        apply: Annotated[bool, typer.Option(help="Create the agent's topics first.")] = False
        ) -> None:
    """Run one agent as its own service (a consumer group member; add replicas to scale)."""
    settings = _settings()
    _exit_on_sigterm()
    asyncio.run(_serve(_agents_of(load(target), target), settings, apply))


@app.command()
def dev(target: Annotated[str, typer.Argument(help="module:app")]) -> None:
    """Run every agent of an app in this process (embedded broker unless configured)."""
    settings = _settings()
    _exit_on_sigterm()
    asyncio.run(_serve(_agents_of(load(target), target), settings, apply=True))


@app.command()
def broker(port: Annotated[int, typer.Option(help="Port (0: a free one; embedded only).")] = 0,
           kafka: Annotated[bool, typer.Option(
               "--kafka", help="Apache Kafka (KRaft, from MESH_KAFKA_HOME or Maven Central) "
               "instead of the embedded broker.")] = False,
           nodes: Annotated[int, typer.Option(
               min=1, help="Apache Kafka nodes (3: replication factor 3, min.insync.replicas "
               "2).")] = 1,
           data: Annotated[Path | None, typer.Option(
               help="Keep Apache Kafka's data and logs here (default: a temporary folder, "
               "removed at stop).")] = None) -> None:
    """Run a broker in the foreground and print its address: the embedded one, or Apache
    Kafka with --kafka. Stops what it started on Ctrl-C or SIGTERM."""
    _settings()
    if not kafka and (nodes != 1 or data is not None):
        raise typer.BadParameter("--nodes and --data are for Apache Kafka: add --kafka.")
    if kafka and port:
        raise typer.BadParameter("--port is for the embedded broker; Apache Kafka takes free "
                                 "ports and prints them.")
    _exit_on_sigterm()
    embedded: EmbeddedBroker | ApacheKafka = (
        ApacheKafka(nodes, data=data) if kafka else EmbeddedBroker(port or None))
    stopped = asyncio.Event()

    async def wait() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopped.set)
        await stopped.wait()

    try:
        embedded.start()
        if isinstance(embedded, ApacheKafka):
            err.print(f"Apache Kafka {embedded.version}, {nodes} node(s), pids "
                      f"{', '.join(map(str, embedded.node_pids.values()))}, data and logs "
                      f"in {embedded.data}")
        print(f"MESH_KAFKA__BOOTSTRAP_SERVERS={embedded.bootstrap}", flush=True)
        asyncio.run(wait())
    finally:
        embedded.stop()


def _exit_on_sigterm() -> None:
    """Until an event loop takes over the signal, SIGTERM unwinds like Ctrl-C, so a
    broker being started is stopped by the ``finally`` that owns it, and the process
    exits 0: a stop asked for before anything was consumed is a clean stop (a rolling
    restart that reaches a replica still starting must not read as a failure)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def _declared(modules: list[str] | None, app_spec: str | None = None) -> dict[str, Topic[Any]]:
    # the user's modules come from the working directory, as for `mesh run`: first on the
    # path, so no other package named `topics` can stand in for the project's own
    if str(Path.cwd()) not in sys.path[:1]:
        sys.path.insert(0, str(Path.cwd()))
    found = discover_topics(*(modules or DEFAULT_MODULES))
    found.setdefault(audit_topic.name, audit_topic)  # the mesh's own: always declared
    if app_spec:
        found.update(load(app_spec).topics)
    return found


def _require_cluster(settings: MeshSettings) -> None:
    if settings.kafka.embedded:
        raise typer.BadParameter(
            "MESH_KAFKA__BOOTSTRAP_SERVERS is not set. Start a broker with `mesh broker` "
            "and export the address it prints.")


@topics_app.command("apply")
def topics_apply(modules: ModulesOpt = DEFAULT_MODULES,
                 app_spec: Annotated[str | None, typer.Option("--app")] = None) -> None:
    """Create the declared topics (and their .dlq); report drift. Idempotent."""
    settings = _settings()
    _require_cluster(settings)
    changes = asyncio.run(apply_topics(settings.kafka, _declared(modules, app_spec).values()))
    for change in changes:
        print(f"{change.action:9} {change.name}" + (f"  ({change.detail})" if change.detail
                                                     else ""))
    if any(c.action == "drift" for c in changes):
        raise typer.Exit(3)


@topics_app.command("list")
def topics_list(modules: ModulesOpt = DEFAULT_MODULES) -> None:
    """The broker's topics with partitions and the declared payload model."""
    settings = _settings()
    _require_cluster(settings)
    declared = _declared(modules)

    async def describe() -> dict[str, Any]:
        async with Admin(settings.kafka) as admin:
            return await admin.describe(await admin.list_topics())

    columns = ("topic", "partitions", "model", "key", "configs")
    rows = []
    for name, spec in sorted(asyncio.run(describe()).items()):
        topic = declared.get(name)
        configs = ",".join(f"{k}={v}" for k, v in sorted((spec.configs or {}).items()))
        rows.append((name, str(spec.partitions), topic.model.__name__ if topic else "-",
                     (topic.key or "-") if topic else "-", configs or "-"))
    if not sys.stdout.isatty():  # pipes and scripts get whole names, tab-separated
        for row in (columns, *rows):
            print("\t".join(row))
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@app.command()
def emit(topic_name: Annotated[str, typer.Argument(metavar="TOPIC")],
         payload: Annotated[str, typer.Argument(help="JSON, or - for JSON lines on stdin")],
         key: Annotated[str | None, typer.Option(help="Record key (default: key field)")] = None,
         correlation_id: Annotated[str | None, typer.Option()] = None,
         modules: ModulesOpt = DEFAULT_MODULES) -> None:
    """Validate JSON against the topic's model and produce it, as an existing system would."""
    settings = _settings()
    _require_cluster(settings)
    topic = _declared(modules).get(topic_name)
    if topic is None:
        raise typer.BadParameter(f"Topic {topic_name!r} is not declared in {modules}.")
    lines = sys.stdin.read().splitlines() if payload == "-" else [payload]
    try:
        payloads = [topic.model.model_validate_json(line) for line in lines if line.strip()]
    except ValidationError as exc:
        err.print(f"[red]invalid {topic.model.__name__}:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None

    async def produce() -> list[Envelope[Any]]:
        async with Emitter(settings, source="emit") as emitter:
            return await emitter.emit(topic, payloads, key=key.encode() if key else None,
                                      correlation_id=correlation_id)

    for env in asyncio.run(produce()):
        print(json.dumps({"topic": topic.name, "event_id": env.event_id,
                          "correlation_id": env.correlation_id}))


@app.command()
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


@app.command()
def tap(topic_names: Annotated[list[str], typer.Argument(metavar="TOPIC...")],
        from_beginning: Annotated[bool, typer.Option("--from-beginning")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="JSON lines")] = False,
        follow: Annotated[bool, typer.Option(help="Keep waiting for new events")] = True,
        limit: Annotated[int | None, typer.Option(help="Stop after N events")] = None,
        idle_timeout: Annotated[float | None, typer.Option(help="Stop after S idle s")] = None,
        modules: ModulesOpt = DEFAULT_MODULES) -> None:
    """Print decoded events with their headers as they arrive (or from the beginning)."""
    settings = _settings()
    _require_cluster(settings)
    declared = _declared(modules)
    codec = Codec(settings.schema_registry)

    async def show() -> None:
        async with TopicReader(settings.kafka, topic_names) as reader:
            if not follow:
                records = await reader.read_to_end()
                for record in records[:limit]:
                    _print_record(await _describe(record, declared, codec), as_json)
                return
            if not from_beginning:
                await reader.seek_to_end()
            err.print(f"following {', '.join(topic_names)} "
                      f"{'from the beginning' if from_beginning else 'from now'}")
            async for record in reader.follow(limit=limit, idle_timeout=idle_timeout):
                _print_record(await _describe(record, declared, codec), as_json)

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends a follow: not an error
        asyncio.run(show())


async def _describe(record: Record, declared: dict[str, Topic[Any]],
                    codec: Codec) -> dict[str, Any]:
    base = record.topic.removesuffix(DLQ_SUFFIX)
    topic = declared.get(base)
    out: dict[str, Any] = {
        "topic": record.topic, "partition": record.partition, "offset": record.offset,
        "key": record.key.decode(errors="replace") if record.key is not None else None,
        "headers": {k: v.decode(errors="replace") for k, v in record.headers},
        "size": len(record.value or b""),
    }
    if topic is None:
        out["error"] = f"no declaration for {base!r}: payload not decoded"
        return out
    try:
        payload = await codec.decode(topic, record.value or b"")
        out["payload"] = payload.model_dump(mode="json")
    except MeshError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def _print_record(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, default=str), flush=True)
        return
    headers = info["headers"]
    line = (f"{info['topic']}[{info['partition']}]@{info['offset']} key={info['key']} "
            f"event={headers.get('mesh-event-id', '-')} "
            f"correlation={headers.get('mesh-correlation', '-')} "
            f"source={headers.get('mesh-source', '-')}")
    dlq = {k: v for k, v in headers.items() if k in DLQ_HEADERS}
    if dlq:
        line += " " + " ".join(f"{k.removeprefix('mesh-dlq-')}={v!r}" for k, v in dlq.items())
    body = json.dumps(info["payload"]) if "payload" in info else f"<{info['error']}>"
    print(f"{line}\n    {body}", flush=True)


@schemas_app.command("export")
def schemas_export(out: Annotated[Path, typer.Option(help="Directory")] = Path("schemas"),
                   modules: ModulesOpt = DEFAULT_MODULES) -> None:
    """Write <topic>.avsc for every declared topic's value schema, and keep every schema
    written or replaced in <out>/history/<fingerprint>.avsc (append-only: commit it, and
    deploy it with the agents, so they decode records of earlier versions)."""
    done = export_schemas(_declared(modules).values(), out)
    for path in done.schemas:
        print(f"wrote {path}")
    for path in done.history:  # stderr: stdout lists the topic schemas alone
        err.print(f"kept {escape(str(path))} in the history", highlight=False)


@schemas_app.command("check")
def schemas_check(out: Annotated[Path, typer.Option(help="Directory")] = Path("schemas"),
                  modules: ModulesOpt = DEFAULT_MODULES) -> None:
    """Fail (exit 1) when the committed .avsc files differ from the payload models, or
    when the history in <out>/history lacks a current schema."""
    problems = check_schemas(_declared(modules).values(), out)
    for problem in problems:
        err.print(f"[red]drift:[/red] {escape(problem)}")
    if problems:
        err.print("Run `mesh schemas export` and commit the result.")
        raise typer.Exit(1)
    print(f"schemas in {out} match the models")



def _letters(topic: str) -> tuple[MeshSettings, list[DeadLetter]]:
    settings = _settings()
    _require_cluster(settings)
    return settings, asyncio.run(read_dead_letters(settings.kafka, topic))


@dlq_app.command("list")
def dlq_list(topic: Annotated[str, typer.Argument(help="TOPIC or TOPIC.dlq")],
             where: Annotated[list[str] | None, typer.Option(help="field<op>value")] = None,
             as_json: Annotated[bool, typer.Option("--json")] = False,
             modules: Annotated[list[str] | None, typer.Option(
                 "--topics", "-t", help="Module(s) declaring topics: --json then carries "
                 "each payload decoded (or why not)")] = None) -> None:
    """One line per dead letter: position, origin, error, attempts, agent."""
    _, letters = _letters(topic)
    keep = parse_where(where or [])
    declared = _declared(modules) if modules else None
    codec = Codec()
    for letter in filter(keep, letters):
        f = letter.fields()
        if as_json:
            if declared is not None:
                info = asyncio.run(_describe(letter.record, declared, codec))
                f = {**f, **{k: info[k] for k in ("payload", "error") if k in info}}
            print(json.dumps(f, default=str), flush=True)
        else:
            print(f"{f['partition']}@{f['offset']}  {f['origin_topic']}[{f['origin_partition']}]"
                  f"@{f['origin_offset']}  {f['error_class']}  attempts={f['attempts']}  "
                  f"agent={f['agent']}  key={f['key']}  {f['error'][:120]}")


@dlq_app.command("show")
def dlq_show(topic: Annotated[str, typer.Argument(help="TOPIC or TOPIC.dlq")],
             offset: int, partition: Annotated[int | None, typer.Option()] = None,
             modules: ModulesOpt = DEFAULT_MODULES) -> None:
    """One dead letter whole: headers, failure, and the payload decoded if it can be."""
    _, letters = _letters(topic)
    found = [d for d in letters if d.record.offset == offset
             and (partition is None or d.record.partition == partition)]
    if len(found) != 1:
        what = "no dead letter" if not found else f"{len(found)} dead letters"
        raise typer.BadParameter(f"{what} at offset {offset}; pass --partition to choose.")
    info = asyncio.run(_describe(found[0].record, _declared(modules), Codec()))
    print(json.dumps({"dead_letter": found[0].fields(), **info}, indent=2, default=str))


@dlq_app.command("replay")
def dlq_replay(topic: Annotated[str, typer.Argument(help="TOPIC or TOPIC.dlq")],
               where: Annotated[list[str] | None, typer.Option(help="field<op>value")] = None,
               to: Annotated[str | None, typer.Option(help="Target (default: origin)")] = None,
               modules: Annotated[list[str] | None, typer.Option(
                   "--topics", "-t", help="Module(s) declaring topics: the target must be "
                   "one of them")] = None) -> None:
    """Re-publish dead letters (same event ids) to their origin topic or --to; each
    replay is recorded on mesh.audit."""
    if modules and to is not None and to not in (declared := _declared(modules)):
        raise typer.BadParameter(f"--to {to!r} is not declared in {', '.join(modules)} "
                                 f"(declared: {', '.join(sorted(declared)) or 'none'}).")
    settings, letters = _letters(topic)
    report = asyncio.run(replay(settings.kafka, letters, where=parse_where(where or []), to=to,
                                codec=Codec(settings.schema_registry)))
    print(f"replayed {report.replayed} of {report.considered} dead letters to {report.target}"
          + (f" (dlq offsets {', '.join(map(str, report.offsets))})" if report.offsets else ""))



@app.command()
def graph(target: Annotated[str | None, typer.Argument(
              help="module:app, module:agent or a module (default: the agents package)")] = None,
          fmt: Annotated[str, typer.Option("--format", "-f", help="mermaid, dot, svg, png")
                         ] = "mermaid",
          out: Annotated[Path | None, typer.Option("--out", "-o", help="Write to FILE")] = None,
          source: Annotated[list[str] | None, typer.Option(help="Topic fed from outside")] = None,
          sink: Annotated[list[str] | None, typer.Option(help="Topic read outside")] = None,
          retries: Annotated[bool, typer.Option(help="Draw retry tiers")] = False,
          dead_letters: Annotated[bool, typer.Option(help="Draw .dlq topics")] = False,
          audit: Annotated[bool, typer.Option(help="Draw mesh.audit")] = False,
          strict: Annotated[bool, typer.Option(help="Exit 1 on any warning")] = False,
          modules: Annotated[list[str] | None, typer.Option("--topics", "-t", help=(
              "Also draw every topic declared in these modules (unused ones are flagged)"))
                             ] = None) -> None:
    """The mesh's topology from its declarations: agents, topics, consumer groups; warns
    about topics nobody consumes and agents consuming topics nobody produces."""
    from mesh.views.graph import draw

    if out is None and fmt == "png" and sys.stdout.isatty():
        raise typer.BadParameter("PNG is binary: pass --out FILE.")
    data, flags = draw(target, fmt=fmt, topic_modules=modules or (), sources=source or (),
                       sinks=sink or (), retries=retries, dead_letters=dead_letters,
                       audit=audit)
    if out is not None:
        out.write_bytes(data)
        err.print(f"wrote {out}")
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    for flag in flags:
        err.print(f"[yellow]warning:[/yellow] {escape(flag.message)}")
    if strict and flags:
        raise typer.Exit(1)


@app.command()
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


@app.command()
def top(metrics: Annotated[list[str] | None, typer.Option(
            "--metrics", "-m", help="A /metrics URL or host:port to scrape (repeatable)")] = None,
        agent: Annotated[list[str] | None, typer.Option(
            "--agent", "-a", help="Only agents matching this glob (repeatable)")] = None,
        interval: Annotated[float, typer.Option(help="Seconds between refreshes")] = 1.0,
        window: Annotated[float, typer.Option(help="Seconds of audit aggregated")] = 60.0,
        since: Annotated[float | None, typer.Option(
            help="Read the audit from this many s back, 0: from now (default: --window)")
        ] = None,
        once: Annotated[bool, typer.Option("--once", help="Print one frame and exit")] = False,
        iterations: Annotated[int | None, typer.Option(help="Print N frames and exit")] = None,
        backlog: Annotated[int, typer.Option(
            help="Audit records per partition read at most on start")] = 20_000) -> None:
    """Live dashboard: agents, rates, success, p50/p99, lag, breakers, failures (Ctrl-C)."""
    from mesh.views.top import TopOptions
    from mesh.views.top import run as run_top

    settings = _settings()
    _require_cluster(settings)
    try:
        options = TopOptions(tuple(metrics or ()), tuple(agent or ()), interval, window, since,
                             1 if once else iterations, backlog)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    printed = options.frames is not None
    run_top(settings, options, Console(width=max(160, Console().width)) if printed else Console())



@workflows_app.command("show")
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


DecisionTopicOpt = Annotated[str | None, typer.Option(
    "--topic", help="The decisions topic (or the mesh's prefix), when several are declared")]
ByOpt = Annotated[str | None, typer.Option("--by", help="Who decides (default: $USER)")]


def _decide(workflow_id: str, step_id: str, *, approved: bool, by: str | None, reason: str,
            modules: list[str], topic_name: str | None) -> None:
    """Send a decision on a step waiting for approval (signed when the plan key is set)."""
    import getpass

    from mesh.patterns.delegation.approval import Decision, decision_topic, send_decision

    settings = _settings()
    _require_cluster(settings)
    topic = decision_topic(_declared(modules).values(), topic_name)
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


@app.command()
def approve(workflow_id: Annotated[str, typer.Argument(metavar="WORKFLOW")],
            step_id: Annotated[str, typer.Argument(metavar="STEP")], by: ByOpt = None,
            reason: Annotated[str, typer.Option(help="Why (optional)")] = "",
            modules: ModulesOpt = DEFAULT_MODULES, topic: DecisionTopicOpt = None) -> None:
    """Approve a delegated step waiting for approval: the coordinator dispatches it."""
    _decide(workflow_id, step_id, approved=True, by=by, reason=reason, modules=modules,
            topic_name=topic)


@app.command()
def reject(workflow_id: Annotated[str, typer.Argument(metavar="WORKFLOW")],
           step_id: Annotated[str, typer.Argument(metavar="STEP")],
           reason: Annotated[str, typer.Option(help="Why (in the failed outcome)")],
           by: ByOpt = None, modules: ModulesOpt = DEFAULT_MODULES,
           topic: DecisionTopicOpt = None) -> None:
    """Reject a delegated step waiting for approval: its workflow fails with the reason."""
    _decide(workflow_id, step_id, approved=False, by=by, reason=reason, modules=modules,
            topic_name=topic)


@app.command()
def trace(correlation_id: str,
          as_json: Annotated[bool, typer.Option("--json", help="The tree as JSON")] = False,
          all_partitions: Annotated[bool, typer.Option(
              "--all-partitions", help="Decode every audit partition, not only the id's "
              "(also finds outputs emitted under another correlation id; slower)")] = False,
          modules: Annotated[list[str] | None, typer.Option(
              "--topics", "-t", help="Module(s) declaring topics: each topic is labelled "
              "with its payload model")] = None) -> None:
    """One workflow from mesh.audit as a tree: each event, the agents that handled it,
    their outcomes and timings (exit 1 when the audit has none of it)."""
    from mesh.views.trace import read_trace
    from mesh.views.trace_tree import render_trace

    settings = _settings()
    _require_cluster(settings)
    found = asyncio.run(read_trace(settings.kafka, correlation_id,
                                   codec=Codec(settings.schema_registry),
                                   all_partitions=all_partitions))
    if not found.found:
        err.print(f"no audit events for correlation id {escape(repr(correlation_id))} in "
                  f"{audit_topic.name} (is MESH_AUDIT__ENABLED off, or the id mistyped?)")
        raise typer.Exit(1)
    if as_json:
        print(json.dumps(found.to_dict(), indent=2))
    else:
        wide = None if sys.stdout.isatty() else 100_000  # pipes get whole lines
        models = ({name: topic.model.__name__ for name, topic in _declared(modules).items()}
                  if modules else None)
        Console(width=wide).print(render_trace(found, models))


if __name__ == "__main__":
    main()
