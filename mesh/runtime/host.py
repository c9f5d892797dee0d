"""Hosting agents in one process: :class:`Mesh` runs a set of agents over one producer
and one codec (``mesh run`` hosts one agent, ``mesh dev`` a whole app).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from mesh.agent import Agent
from mesh.config import MeshSettings
from mesh.errors import TransportError
from mesh.kafka.provision import apply_topics, check_topics
from mesh.kafka.transport import Producer
from mesh.runtime.audit import audit_topic
from mesh.runtime.liveness import BrokerWatch
from mesh.runtime.metrics import MeshMetrics
from mesh.runtime.runner import AgentRunner, Deadline, bounded
from mesh.runtime.transactions import require_transactions, runner_for
from mesh.serde.codec import Codec


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first leaf error of a (nested) exception group."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


class Mesh:
    """Runs a set of agents in this process over one producer and one codec.

    At start every topic the agents consume, produce to or keep state in must exist with
    its declared partitions (else :class:`~mesh.errors.TopicDrift` names them and
    ``mesh topics apply``), unless ``create_topics=True`` creates what is missing. The
    mesh's own derived topics (retry tiers, the audit topic) are always created.

    The host owns the process's :attr:`metrics` (``metrics=``, else a fresh registry;
    ``mesh run`` serves them): with ``MESH_METRICS__ENABLED`` (the default) they count
    every runner's outcomes, and while it runs they are the
    :func:`~mesh.runtime.metrics.host_metrics` of its agents' tasks, so breakers,
    fallback agents and LLM agents created or started there report to them.

    Example:
        >>> async with Mesh(settings, [answerer]) as mesh:  # doctest: +SKIP
        ...     await mesh.wait_assigned()
        ...     await stop.wait()
    """

    def __init__(self, settings: MeshSettings, agents: Sequence[Agent[Any]], *,
                 create_topics: bool = False, metrics: MeshMetrics | None = None) -> None:
        self.settings = settings
        self.create_topics = create_topics
        self.agents = list(agents)
        self.codec = Codec(settings.schema_registry)
        self.producer = Producer(settings.kafka)
        # One bound for the whole shutdown, every runner's steps and the flush included.
        self.deadline = Deadline(settings.runtime.shutdown_timeout_s)
        self.runners: list[AgentRunner] = [
            runner_for(a, settings, producer=self.producer, codec=self.codec,
                       deadline=self.deadline)
            for a in self.agents]
        self.stop_event = asyncio.Event()
        # Set once the topics are checked (or created) and the producer runs: from then
        # on an event sent to an input topic waits there for its agent (`mesh dev` and
        # `mesh run` say "running" then, not before: a first write must not race the
        # creation of its topic, which Apache Kafka would auto-create with 1 partition).
        self.started = asyncio.Event()
        self.watch = BrokerWatch(settings, self.runners)
        self.metrics = metrics if metrics is not None else MeshMetrics(CollectorRegistry())
        if settings.metrics.enabled:
            for runner in self.runners:
                self.metrics.watch(runner)
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Run every agent until :meth:`stop`; any agent's transport failure stops all."""
        with self.metrics.hosting():
            await self._run()

    async def _run(self) -> None:
        await require_transactions(self.settings, self.agents)  # exactly-once agents only
        topics = {t.name: t for a in self.agents for t in a.all_topics}
        await self.codec.prepare([*topics.values(), audit_topic])
        # Retry tiers are derived from the agents, like dead-letter topics from topics:
        # create any missing, with their origin's partition count (co-partitioning);
        # and the audit topic every agent writes to.
        own = [t for a in self.agents for t in a.retry_topics]
        if self.settings.audit.enabled:
            own.append(audit_topic)
        declared = [t for t in topics.values() if t not in own]
        if self.create_topics:
            await apply_topics(self.settings.kafka, [*declared, *own])
        else:  # the declared ones first: no tier of a topic that is missing
            await check_topics(self.settings.kafka, declared)
            if own:
                await apply_topics(self.settings.kafka, own)
        await self.producer.start()
        self.started.set()
        try:
            async with asyncio.TaskGroup() as tasks:
                watch = tasks.create_task(self.watch.run(self.stop_event), name="broker-watch")
                runs = [tasks.create_task(runner.run(self.stop_event), name=runner.agent.name)
                        for runner in self.runners]
                await (asyncio.wait(runs) if runs else self.stop_event.wait())
                # The agents have stopped: a check still waiting for a broker that does
                # not answer must not hold the shutdown past its bound.
                watch.cancel()
        except* TransportError as group:
            raise _first(group) from None
        finally:
            # Undelivered batches wait for a broker that may be gone: bound the flush
            # (their inputs were not committed, so they are redelivered).
            self.deadline.start()
            await bounded(self.producer.stop(), self.deadline.left(), "flushing the producer")

    async def start(self) -> None:
        """Run in the background (for tests and ``mesh dev``)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="mesh")

    async def wait_assigned(self, timeout: float = 60.0) -> None:
        """Wait until every agent has partitions, or fail after ``timeout`` seconds
        (or as soon as the mesh itself fails)."""
        assigned = asyncio.ensure_future(
            asyncio.gather(*(r.assigned.wait() for r in self.runners)))
        watched: list[asyncio.Future[Any]] = [assigned]
        if self._task is not None:
            watched.append(self._task)
        await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        assigned.cancel()
        if self._task is not None and self._task.done():
            self._task.result()  # raises the mesh's failure
        missing = [r.agent.name for r in self.runners if not r.assigned.is_set()]
        if missing:
            raise TransportError(f"Agents {missing} got no partitions within {timeout:.0f} s.")

    def request_stop(self) -> None:
        """Ask the mesh to stop, without waiting (``mesh run``'s SIGTERM and SIGINT): the
        shutdown's bound, ``runtime.shutdown_timeout_s``, counts from now."""
        self.deadline.start()
        self.stop_event.set()

    async def stop(self) -> None:
        """Finish in-flight work, commit, leave the groups (within
        ``runtime.shutdown_timeout_s`` in all)."""
        self.request_stop()
        if self._task is not None:
            task, self._task = self._task, None
            await task

    async def __aenter__(self) -> Mesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
