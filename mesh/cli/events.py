"""Commands on events: produce (``emit``), read (``tap``), dead letters (``dlq``), one
workflow's audit (``trace``), the live dashboard (``top``) and the topology (``graph``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from mesh.cli.common import DEFAULT_MODULES, ModulesOpt, _declared, _require_cluster, _settings, err
from mesh.config import MeshSettings
from mesh.envelope import Envelope
from mesh.errors import MeshError, TopicDrift
from mesh.kafka.admin import Admin
from mesh.kafka.base import Record
from mesh.kafka.reader import TopicReader
from mesh.runtime.audit import audit_topic
from mesh.runtime.dead_letter import DLQ_HEADERS, DeadLetter
from mesh.runtime.emitter import Emitter
from mesh.serde.codec import Codec
from mesh.topic import DLQ_SUFFIX, Topic
from mesh.views.dlq import parse_where, read_dead_letters, replay


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
        async with Admin(settings.kafka) as admin:
            found = (await admin.describe([topic.name])).get(topic.name)
        if found is None:  # a first write would have the broker create it, its way
            raise TopicDrift(f"Topic {topic.name!r} does not exist on the broker. Create it "
                             "with `mesh topics apply` (or start its agents with `mesh run "
                             "--apply`); a first write would have the broker auto-create it "
                             "with its default partition count.")
        async with Emitter(settings, source="emit") as emitter:
            return await emitter.emit(topic, payloads, key=key.encode() if key else None,
                                      correlation_id=correlation_id)

    for env in asyncio.run(produce()):
        print(json.dumps({"topic": topic.name, "event_id": env.event_id,
                          "correlation_id": env.correlation_id}))


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
        try:
            out["payload"] = payload.model_dump(mode="json")
        except ValueError:  # bytes that are not UTF-8 (a foreign header kept in state)
            out["payload"] = payload.model_dump()  # printed as bytes
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


def _letters(topic: str) -> tuple[MeshSettings, list[DeadLetter]]:
    settings = _settings()
    _require_cluster(settings)
    return settings, asyncio.run(read_dead_letters(settings.kafka, topic))


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
