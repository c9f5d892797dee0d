"""A test kit for users' agents: the mesh in memory, with no Kafka and no broker.

:class:`InMemoryMesh` hosts agents over in-memory topics, so a unit test of an agent
runs in milliseconds. It is a fake of the *transport* only (the in-memory side of
:class:`mesh.kafka.base.BaseProducer`): every input goes through the real runner with
the real :class:`~mesh.serde.codec.Codec` (Avro bytes on the in-memory topics, as on
Kafka), so decoding, handler calls, derived event ids, headers, trace context,
outputs, state writes, retry records, dead letters with their headers, audit events
and ``on_failure`` behave as in production.

What it keeps from Kafka, and what it simplifies:

* **Topics** are per-partition logs of :class:`~mesh.kafka.base.Record`. A keyed record
  goes to the partition Kafka's default partitioner gives its key (murmur2), a keyless
  one round-robin, a record with an explicit partition (a retry) to that partition.
* **Consumer groups**: every agent is its own group with one replica that owns every
  partition (``ctx.owns(...)`` is always true). Each agent consuming a topic sees every
  record of it (fan-out); a retry record goes only to the group it names.
* **Order**: :meth:`InMemoryMesh.drain` hands records over one at a time, the oldest
  (first produced) deliverable record first, so each group reads each partition in
  order and a flow runs breadth-first, deterministically.
* **Retries** wait in ``<topic>.retry.<n>`` until their due time (``drain`` waits for
  it), or at once with ``fast_retries=True``.
* **Holds** (``Held``, ``BreakerOpen``): the input stays pending and the agent is paused
  until the hold ends, as in production; ``drain`` does not wait for a hold, it returns
  with the input pending and :attr:`InMemoryMesh.held` names it
  (:meth:`InMemoryMesh.release_holds` ends the holds early).
* **Quarantine** (``AgentRunner.quarantine``, as a supervised worker does to itself):
  the one replica leaves its group, so it holds no partition and its inputs wait, until
  ``release()``; there is no other replica to take them over.
* **State** tables start empty, which is what restoring from the (empty) in-memory
  topics would give; ``ctx.put``/``ctx.get`` work as in production, and the writes are
  records of the state topic too. :meth:`InMemoryMesh.seed` writes a row before a test.
* **Timers** (``Agent.every``) do not run by themselves: :meth:`InMemoryMesh.run_timers`
  runs each once, when the test says so.

Not here: replicas sharing a group, rebalances, commits and redelivery after a crash,
tables followed from other processes (``CompactedTable.follow``) and
breakers that keep their state in Kafka (``BreakerRegistry``): test those on the
broker (the integration tests), or give the agent a local ``CircuitBreaker``.

Example:
    >>> async def test_writer_drafts_from_findings() -> None:  # doctest: +SKIP
    ...     async with InMemoryMesh(app, fast_retries=True) as mesh:
    ...         sent = await mesh.emit(requests, ResearchRequest(request_id="r1",
    ...                                                          subject="kafka"))
    ...         await mesh.drain()
    ...         [article] = mesh.payloads(articles)
    ...         assert mesh.events(articles)[0].correlation_id == sent.correlation_id
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from typing import Any, Self, TypeVar, overload

from pydantic import BaseModel

from mesh.agent import Agent, App
from mesh.config import MeshSettings
from mesh.envelope import Envelope, now_ms, read_headers
from mesh.errors import ConfigError, Held, MeshError
from mesh.kafka.base import BaseProducer, OutRecord, Partition, Record
from mesh.kafka.memory import InMemoryProducer
from mesh.runtime import retry
from mesh.runtime.audit import audit_topic
from mesh.runtime.dead_letter import DeadLetter
from mesh.runtime.emitter import Emitter
from mesh.runtime.runner import AgentRunner
from mesh.serde.codec import Codec
from mesh.state import CompactedTable
from mesh.testing.log import InMemoryTopics
from mesh.topic import DLQ_SUFFIX, Topic, collect_topics

__all__ = ["DrainLimitReached", "InMemoryMesh"]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class DrainLimitReached(MeshError):
    """``drain`` handed over ``max_steps`` records and more are still pending: most
    likely agents that feed each other in a loop."""


class _InMemoryRunner(AgentRunner):
    """The real runner of one agent, as the one replica of its group: it owns every
    partition of what it consumes, and none while quarantined (it left its group)."""

    def __init__(self, agent: Agent[Any], settings: MeshSettings, *, producer: BaseProducer,
                 codec: Codec, topics: InMemoryTopics) -> None:
        super().__init__(agent, settings, producer=producer, codec=codec)
        subscribed = [t.name for t in agent.consumes + agent.retry_topics]
        self.partitions = [Partition(name, n) for name in subscribed
                           for n in range(topics.partitions(name))]
        self._owned = frozenset(self.partitions)

    def assignment(self) -> frozenset[tuple[str, int]]:
        return frozenset() if self.quarantined else self._owned

    async def quarantine(self) -> None:
        """Leave the group: no partition, no input until :meth:`release`. With no other
        replica the records wait, as they would in Kafka."""
        if not self.quarantined:
            self.quarantined = True
            logger.warning("agent %s quarantined: left group %s", self.agent.name,
                           self.agent.group)

    def release(self) -> None:
        """Rejoin the group: every partition again, from where it was left."""
        self.quarantined = False


class InMemoryMesh:
    """Agents over in-memory topics: emit, drain, look at what came out.

    Args:
        agents: an :class:`~mesh.agent.App`, an agent, or agents.
        settings: the settings the agents get (default: ``MeshSettings()`` from the
            environment); the schema registry is never used (single-object framing).
        fast_retries: hand retry records over at once instead of at their due time.
        source: ``mesh-source`` of what :meth:`emit` injects.

    Kafka semantics: see the module docstring (one replica per group owning every
    partition; per-partition order; oldest record first; no commits or redelivery).

    Example:
        >>> async with InMemoryMesh([answerer]) as mesh:  # doctest: +SKIP
        ...     await mesh.emit(questions, Question(qid="q1", text="hi"))
        ...     await mesh.drain()
        ...     mesh.payloads(answers)
        [Answer(qid='q1', text='HI')]
    """

    def __init__(self, agents: App | Agent[Any] | Iterable[Agent[Any]],
                 settings: MeshSettings | None = None, *, fast_retries: bool = False,
                 source: str = "emit") -> None:
        declared: list[Topic[Any]] = []
        if isinstance(agents, App):
            declared += agents.topics.values()
            agents = agents.agents
        self.agents = [agents] if isinstance(agents, Agent) else list(agents)
        _check_groups(self.agents)
        settings = settings or MeshSettings()
        no_registry = settings.schema_registry.model_copy(
            update={"url": None, "username": None, "password": None})
        self.settings = settings.model_copy(update={"schema_registry": no_registry})
        self.fast_retries = fast_retries
        declared += [t for a in self.agents for t in a.all_topics] + [audit_topic]
        self.declared: dict[str, Topic[Any]] = collect_topics(declared)
        self.topics = InMemoryTopics(self.declared.values())
        self.codec = Codec(self.settings.schema_registry)
        self.producer = InMemoryProducer(self.topics)
        self.runners: dict[str, AgentRunner] = {}
        self._runners: list[_InMemoryRunner] = []
        for item in self.agents:
            runner = _InMemoryRunner(item, self.settings, producer=self.producer,
                                     codec=self.codec, topics=self.topics)
            self.runners[item.name] = runner
            self._runners.append(runner)
        # the real Emitter over the in-memory producer (its own Kafka setup is in
        # __aenter__, which is not used here)
        self._emitter = Emitter(self.settings, codec=self.codec, producer=self.producer,
                                source=source)
        self._cursors: dict[tuple[str, Partition], int] = {}  # (agent, partition) -> next
        self._holds: dict[str, Held] = {}
        self._started = False

    async def start(self) -> None:
        """Call each agent's ``on_start`` (once), as a runner does before any input."""
        if self._started:
            return
        self._started = True
        await self.codec.prepare(list(self.declared.values()))
        await self.producer.start()
        for item in self.agents:
            await item.on_start(self.settings)

    async def stop(self) -> None:
        await self.producer.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- in --------------------------------------------------------------------------

    async def emit(self, topic: Topic[M], payload: M, *, key: bytes | str | None = None,
                   correlation_id: str | None = None) -> Envelope[M]:
        """Produce ``payload`` to ``topic`` as :class:`~mesh.runtime.emitter.Emitter` does (a new
        event id, the correlation id or the event id, a new trace, the ``produced``
        audit event); returns its envelope. Nothing is handled before :meth:`drain`."""
        if not isinstance(payload, topic.model):
            raise ConfigError(f"Topic {topic.name!r} carries {topic.model.__name__}, but "
                              f"{type(payload).__name__} was emitted to it.")
        if topic.name not in self.declared:
            self.declared[topic.name] = topic
            self.topics.declare(topic)
        raw = key.encode() if isinstance(key, str) else key
        [event] = await self._emitter.emit(topic, [payload], key=raw,
                                           correlation_id=correlation_id)
        return event

    async def send(self, *records: OutRecord) -> list[Record]:
        """Produce raw records, as any Kafka client could (bytes that are not a mesh
        event, missing or malformed headers, another schema): for bad-input tests."""
        return [self.topics.append(r) for r in records]

    async def seed(self, topic: Topic[M], key: str, value: M | None) -> None:
        """Write ``key`` = ``value`` (None: a tombstone) to the state topic ``topic``
        before a test, as if an earlier run had: stored in the topic, and in the table
        of every agent keeping state there (as restoring it would)."""
        tables = [r.tables[topic.name] for r in self._runners if topic.name in r.tables]
        table = tables[0] if tables else CompactedTable(topic, self.settings.kafka,
                                                        self.codec)
        self.topics.declare(topic)
        self.topics.append(table.record_of(key, value))
        for each in tables:
            each.apply(key, value)

    # -- handling --------------------------------------------------------------------

    async def drain(self, max_steps: int = 10_000) -> int:
        """Hand records to the agents until none is pending; returns how many were
        handed over.

        The oldest deliverable record goes first. A retry record waits until it is due
        (unless ``fast_retries``). Inputs of a held agent stay pending: ``drain``
        returns without them (see :attr:`held`). Raises :class:`DrainLimitReached`
        after ``max_steps`` hand-overs with records still pending (a loop).
        """
        steps = 0
        recent: deque[tuple[str, str]] = deque(maxlen=200)
        while True:
            found = self._next()
            if found is None:
                due = self._next_due_ms()
                if due is None:
                    return steps
                # A retry is due later: waiting for a time, not for a condition.
                await asyncio.sleep(max(0, due - now_ms()) / 1000)
                continue
            if steps >= max_steps:
                raise DrainLimitReached(_loop_message(max_steps, recent))
            runner, record = found
            await self._deliver(runner, record)
            recent.append((runner.agent.name, record.topic))
            steps += 1

    async def run_timers(self, agent: str | Agent[Any] | None = None) -> int:
        """Run every timer (``Agent.every``) of ``agent`` (default: of every agent) once,
        producing what they emit and write; returns how many ran. Follow with
        :meth:`drain` to have the agents handle what the timers emitted.

        Unlike the runtime, which logs a failing timer run and runs it again at the
        next period, a timer's error is raised here, so a test sees it.
        """
        runners = [self._runner(agent)] if agent is not None else self._runners
        ran = 0
        for runner in runners:
            for _interval, timer in runner.agent.timers:
                await runner.run_timer(timer)
                ran += 1
        return ran

    @property
    def held(self) -> dict[str, Held]:
        """The agents holding an input now (their partitions paused), with the
        ``Held`` (or ``BreakerOpen``) their handler raised: why and until when."""
        return {r.agent.name: self._holds[r.agent.name] for r in self._runners
                if r.held and r.agent.name in self._holds}

    def release_holds(self, agent: str | Agent[Any] | None = None) -> None:
        """End the holds of ``agent`` (default: all) now, as if their time had passed:
        the next :meth:`drain` hands the held input to the handler again."""
        for runner in [self._runner(agent)] if agent is not None else self._runners:
            runner.end_hold()

    def pending(self, agent: str | Agent[Any] | None = None) -> list[Record]:
        """Records the agent (default: any agent) has not handled yet, oldest first."""
        found: list[Record] = []
        for runner in [self._runner(agent)] if agent is not None else self._runners:
            for partition in runner.partitions:
                start = self._cursors.get((runner.agent.name, partition), 0)
                found += [r for r in self.topics.log(partition)[start:]
                          if retry.is_for(r, runner.agent.group)]
        return sorted(found, key=self.topics.sequence)

    # -- out -------------------------------------------------------------------------

    def records(self, topic: Topic[Any] | str) -> list[Record]:
        """The raw records of ``topic`` (any topic: retry tiers, ``.dlq``,
        ``mesh.audit``), in the order they were produced."""
        return self.topics.records(_name(topic))

    @overload
    def events(self, topic: Topic[M]) -> list[Envelope[M]]: ...
    @overload
    def events(self, topic: str) -> list[Envelope[Any]]: ...

    def events(self, topic: Topic[Any] | str) -> list[Envelope[Any]]:
        """The events of ``topic``, decoded, with their metadata (ids, correlation,
        causation, trace, source, attempt, partition, offset), in produced order."""
        declared = self._topic(topic)
        return [read_headers(r.headers, topic=r.topic, partition=r.partition,
                             offset=r.offset, key=r.key)
                .with_payload(self._decode(declared, r))
                for r in self.records(declared.name)]

    @overload
    def payloads(self, topic: Topic[M]) -> list[M]: ...
    @overload
    def payloads(self, topic: str) -> list[Any]: ...

    def payloads(self, topic: Topic[Any] | str) -> list[Any]:
        """The payloads of ``topic``, decoded, in produced order."""
        declared = self._topic(topic)
        return [self._decode(declared, r) for r in self.records(declared.name)]

    def dead_letters(self, topic: Topic[Any] | str) -> list[DeadLetter]:
        """The dead letters of ``topic`` (the topic or its ``.dlq`` name), each with the
        original record and the failure headers (origin, error, attempts, agent)."""
        name = _name(topic)
        name = name if name.endswith(DLQ_SUFFIX) else name + DLQ_SUFFIX
        return [DeadLetter.of(r) for r in self.topics.records(name)]

    def table(self, topic: Topic[M], agent: str | Agent[Any] | None = None
              ) -> CompactedTable[M]:
        """The state table ``agent`` keeps in ``topic`` (the one ``ctx.get`` reads);
        ``agent`` may be left out when one agent keeps state there."""
        owners = [r for r in self._runners if topic.name in r.tables
                  and (agent is None or r is self._runner(agent))]
        if len(owners) != 1:
            who = ", ".join(r.agent.name for r in owners) or "no agent"
            raise ConfigError(f"State topic {topic.name!r} is kept by {who}: name one agent "
                              "that declares it in state= (table(topic, agent=...)).")
        table: CompactedTable[M] = owners[0].tables[topic.name]
        return table

    # -- internals -------------------------------------------------------------------

    def _runner(self, agent: str | Agent[Any]) -> _InMemoryRunner:
        name = agent.name if isinstance(agent, Agent) else agent
        for runner in self._runners:
            if runner.agent.name == name:
                return runner
        known = ", ".join(r.agent.name for r in self._runners)
        raise ConfigError(f"No agent {name!r} in this mesh (agents: {known}).")

    def _topic(self, topic: Topic[Any] | str) -> Topic[Any]:
        if isinstance(topic, Topic):
            return topic
        found = self.declared.get(topic)
        if found is None:
            raise ConfigError(f"Topic {topic!r} is not declared by the agents of this mesh; "
                              "pass the Topic (or read raw records with records()).")
        return found

    def _decode(self, topic: Topic[Any], record: Record) -> Any:
        if record.value is None:
            return None  # a tombstone
        serde = self.codec.serde(topic.model)
        return serde.decode(record.value)

    def _head(self, runner: _InMemoryRunner, partition: Partition) -> Record | None:
        """The next record of ``partition`` for the runner's group; another group's
        retry records are passed over, as a lane commits them unhandled."""
        log = self.topics.log(partition)
        cursor = (runner.agent.name, partition)
        offset = self._cursors.get(cursor, 0)
        while offset < len(log) and not retry.is_for(log[offset], runner.agent.group):
            offset += 1
        self._cursors[cursor] = offset
        return log[offset] if offset < len(log) else None

    def _waiting(self, record: Record) -> bool:
        return (not self.fast_retries and retry.is_retry_topic(record.topic)
                and retry.due_ms(record) > now_ms())

    def _next(self) -> tuple[_InMemoryRunner, Record] | None:
        """The oldest record an agent may handle now."""
        best: tuple[int, _InMemoryRunner, Record] | None = None
        for runner in self._runners:
            if runner.held or runner.quarantined:
                continue
            for partition in runner.partitions:
                record = self._head(runner, partition)
                if record is None or self._waiting(record):
                    continue
                sequence = self.topics.sequence(record)
                if best is None or sequence < best[0]:
                    best = (sequence, runner, record)
        return None if best is None else (best[1], best[2])

    def _next_due_ms(self) -> int | None:
        """When the first retry record of an agent that is not held (or quarantined)
        becomes due."""
        dues = [retry.due_ms(record) for runner in self._runners
                if not runner.held and not runner.quarantined
                for partition in runner.partitions
                if (record := self._head(runner, partition)) is not None
                and self._waiting(record)]
        return min(dues, default=None)

    async def _deliver(self, runner: _InMemoryRunner, record: Record) -> None:
        """Hand ``record`` to the runner, as its partition's lane does."""
        try:
            acks = await runner.process(record)
        except Held as held:  # keep the input; the agent is paused until the hold ends
            runner.hold(held.until)
            runner.holds += 1
            self._holds[runner.agent.name] = held
            logger.info("agent %s holding %s[%d]@%d until %.1f: %s", runner.agent.name,
                        record.topic, record.partition, record.offset, held.until, held)
            return
        await acks.wait()
        self._cursors[(runner.agent.name, record.position)] = record.offset + 1


def _name(topic: Topic[Any] | str) -> str:
    return topic.name if isinstance(topic, Topic) else topic


def _check_groups(agents: Sequence[Agent[Any]]) -> None:
    groups = Counter(a.group for a in agents)
    shared = sorted(g for g, n in groups.items() if n > 1)
    if shared:
        raise ConfigError(f"Agents share consumer group(s) {', '.join(shared)}: "
                          "InMemoryMesh runs one replica per group. Test replicas on the "
                          "broker, or give each agent its own group.")


def _loop_message(max_steps: int, recent: Iterable[tuple[str, str]]) -> str:
    counts = Counter(recent)
    window = sum(counts.values())
    hops = ", ".join(f"{agent} <- {topic} ({n})" for (agent, topic), n in counts.most_common(6))
    return (f"drain handed over {max_steps} records (max_steps) and records are still "
            f"pending; the last {window} went to: {hops}. Agents that feed each other "
            "(directly or through others) loop forever: break the cycle, or raise "
            "max_steps if the flow is only long.")

