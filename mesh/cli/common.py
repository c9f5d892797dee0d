"""What every ``mesh`` command shares: the error console, settings from the environment,
the user's objects and declared topics, and the check that a broker is configured."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from mesh.config import MeshSettings
from mesh.runtime.audit import audit_topic
from mesh.topic import Topic, discover_topics

err = Console(stderr=True, soft_wrap=True)

ModulesOpt = Annotated[list[str], typer.Option(
    "--topics", "-t", help="Module(s) declaring topics (searched with submodules).")]
DEFAULT_MODULES = ["topics"]


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
        raise typer.BadParameter(f"{spec!r}: expected module:attribute, e.g. agents.app:app")
    sys.path.insert(0, str(Path.cwd()))
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


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
