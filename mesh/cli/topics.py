"""``mesh topics`` (the declared topics on the broker) and ``mesh schemas`` (their Avro
schemas in the repository)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mesh.cli.common import DEFAULT_MODULES, ModulesOpt, _declared, _require_cluster, _settings, err
from mesh.kafka.admin import Admin
from mesh.kafka.provision import apply_topics
from mesh.serde.history import check_schemas, export_schemas


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
