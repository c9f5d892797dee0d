"""Commands that serve: ``mesh run`` (one agent), ``mesh dev`` (an app in one process)
and ``mesh broker`` (a broker in the foreground)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mesh.agent import Agent, App
from mesh.cli.common import _settings, err, load
from mesh.config import MeshSettings
from mesh.kafka.apache import ApacheKafka
from mesh.kafka.embedded import EmbeddedBroker
from mesh.runtime.host import Mesh

logger = logging.getLogger("mesh.cli")


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
            loop.add_signal_handler(sig, mesh.request_stop)
        names = ", ".join(a.name for a in agents)
        announce = asyncio.create_task(_announce(mesh, names))
        try:
            await mesh.run()
        finally:
            announce.cancel()
        logger.info("stopped %s cleanly", names)
    finally:
        if broker is not None:
            await broker.__aexit__()


async def _announce(mesh: Mesh, names: str) -> None:
    """Say "running" once the mesh's topics exist and its producer runs."""
    await mesh.started.wait()
    logger.info("running %s (stop with SIGTERM or Ctrl-C)", names)


def run(target: Annotated[str, typer.Argument(help="module:agent (or module:app)")],
        apply: Annotated[bool, typer.Option(help="Create the agent's topics first.")] = False
        ) -> None:
    """Run one agent as its own service (a consumer group member; add replicas to scale)."""
    settings = _settings()
    _exit_on_sigterm()
    asyncio.run(_serve(_agents_of(load(target), target), settings, apply))


def dev(target: Annotated[str, typer.Argument(help="module:app")]) -> None:
    """Run every agent of an app in this process (embedded broker unless configured)."""
    settings = _settings()
    _exit_on_sigterm()
    asyncio.run(_serve(_agents_of(load(target), target), settings, apply=True))


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
