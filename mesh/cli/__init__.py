"""The ``mesh`` command: run agents, manage topics and schemas, emit and tap events.

Every command reads its settings from the environment (``MESH_`` prefix, see
:mod:`mesh.config`). Without ``MESH_KAFKA__BOOTSTRAP_SERVERS``, ``run`` and ``dev``
start the embedded broker and create the declared topics themselves.

The commands live in submodules by concern (:mod:`~mesh.cli.run`,
:mod:`~mesh.cli.topics`, :mod:`~mesh.cli.events`, :mod:`~mesh.cli.workflows`); they are
registered here, in the order ``mesh --help`` lists them.
"""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from mesh.cli import events, run, topics, workflows
from mesh.cli.common import err
from mesh.errors import MeshError

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

for command in (run.run, run.dev, run.broker, events.emit, workflows.submit, events.tap,
                events.graph, workflows.workers, events.top, workflows.approve,
                workflows.reject, events.trace):
    app.command()(command)
topics_app.command("apply")(topics.topics_apply)
topics_app.command("list")(topics.topics_list)
schemas_app.command("export")(topics.schemas_export)
schemas_app.command("check")(topics.schemas_check)
dlq_app.command("list")(events.dlq_list)
dlq_app.command("show")(events.dlq_show)
dlq_app.command("replay")(events.dlq_replay)
workflows_app.command("show")(workflows.workflows_show)


def main() -> None:
    """Entry point of the ``mesh`` script."""
    try:
        app()
    except MeshError as exc:
        err.print(f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))}")
        sys.exit(1)
