"""One test, two meshes: the in-memory kit and the real broker behind one interface.

As faststream runs one test suite on a real broker and on its ``TestKafkaBroker``, a
test written against :class:`MeshUnderTest` runs twice (fixture :func:`mesh_under_test`,
parametrized ``kit`` and ``broker``): the same inputs, the same assertions on the
outputs. The kit is then shown to behave like the broker, and the broker still proves
the mesh.

* :class:`KitMesh`: the agents in a :class:`~mesh.testing.InMemoryMesh` (with
  ``fast_retries``: a retry is handed over at once instead of at its due time);
  waiting is draining to quiescence, then checking.
* :class:`BrokerMesh`: the topics applied, the agents in an in-process
  :class:`~mesh.runtime.host.Mesh` host on the session's broker, events emitted with an
  :class:`~mesh.runtime.emitter.Emitter`; waiting is reading the output topics from
  the beginning until the check holds, or failing after a bounded timeout.

What a test sees is what a user of the topics sees: decoded events, distinct by event
id (delivery is at-least-once; consumers dedup by ``mesh-event-id``), in log order per
partition; the order across partitions (and topics) is not the same on both sides.
Timers run on their period on the broker and only when :meth:`MeshUnderTest.tick` says
so on the kit.

Example:
    >>> async def test_answers(mesh_under_test) -> None:  # doctest: +SKIP
    ...     async with mesh_under_test([answerer]) as mesh:
    ...         await mesh.emit(questions, Question(qid="q1", text="hi"))
    ...         [answer] = await mesh.until(answers, 1, "the answer to q1")
    ...         assert answer.payload.text == "HI"
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import pytest
from pydantic import BaseModel

from mesh import Codec, Envelope, MeshSettings, Topic
from mesh.agent import Agent
from mesh.envelope import read_headers
from mesh.kafka.base import Record
from mesh.kafka.provision import apply_topics
from mesh.kafka.reader import TopicReader
from mesh.runtime.dead_letter import DeadLetter
from mesh.runtime.emitter import Emitter
from mesh.runtime.host import Mesh
from mesh.testing import InMemoryMesh
from tests.conftest import BrokerUnderTest

Check = Callable[[list[Envelope[Any]]], bool] | int
Topics = Topic[Any] | Sequence[Topic[Any]]
MeshFactory = Callable[..., AbstractAsyncContextManager["MeshUnderTest"]]
POLL_S = 0.5  # longest single fetch while waiting on the broker


class MeshUnderTest(Protocol):
    """What a test does with a running mesh, whichever it is."""

    kind: str  # "kit" or "broker"

    async def emit(self, topic: Topic[Any], payload: BaseModel, *,
                   key: bytes | str | None = None,
                   correlation_id: str | None = None) -> Envelope[Any]:
        """Produce ``payload`` as an existing system would; its envelope."""

    async def until(self, topics: Topics, check: Check, what: str,
                    timeout: float = 60.0) -> list[Envelope[Any]]:
        """Every distinct event of ``topics`` so far, once ``check`` holds for them (a
        count: at least that many); fails naming ``what`` when it does not (the kit:
        once drained; the broker: after ``timeout`` seconds)."""

    async def dead_letters(self, topic: Topic[Any], count: int, *,
                           timeout: float = 60.0) -> list[DeadLetter]:
        """The dead letters of ``topic`` once there are at least ``count``."""

    async def tick(self) -> None:
        """Let one timer period pass: the kit runs every timer once; the broker's
        host runs them on their own."""


def _holds(check: Check, events: list[Envelope[Any]]) -> bool:
    return len(events) >= check if isinstance(check, int) else check(events)


def _listed(topics: Topics) -> list[Topic[Any]]:
    return [topics] if isinstance(topics, Topic) else list(topics)


class KitMesh:
    """The agents in an :class:`~mesh.testing.InMemoryMesh`; every wait drains first."""

    kind = "kit"

    def __init__(self, agents: Sequence[Agent[Any]]) -> None:
        self.kit = InMemoryMesh(agents, fast_retries=True)

    async def emit(self, topic: Topic[Any], payload: BaseModel, *,
                   key: bytes | str | None = None,
                   correlation_id: str | None = None) -> Envelope[Any]:
        return await self.kit.emit(topic, payload, key=key, correlation_id=correlation_id)

    async def until(self, topics: Topics, check: Check, what: str,
                    timeout: float = 60.0) -> list[Envelope[Any]]:
        await self.kit.drain()
        seen: dict[str, Envelope[Any]] = {}
        for topic in _listed(topics):
            for event in self.kit.events(topic):
                seen.setdefault(event.event_id, event)
        events = list(seen.values())
        if not _holds(check, events):
            raise AssertionError(f"not so once the kit drained: {what} "
                                 f"({len(events)} events)")
        return events

    async def dead_letters(self, topic: Topic[Any], count: int, *,
                           timeout: float = 60.0) -> list[DeadLetter]:
        await self.kit.drain()
        found = self.kit.dead_letters(topic)
        if len(found) < count:
            raise AssertionError(f"{topic.dlq_name}: {len(found)} dead letters once the kit "
                                 f"drained, expected {count}")
        return found

    async def tick(self) -> None:
        await self.kit.run_timers()

    @classmethod
    @asynccontextmanager
    async def running(cls, agents: Sequence[Agent[Any]],
                      topics: Iterable[Topic[Any]] = ()) -> AsyncIterator[KitMesh]:
        """The kit over ``agents``, started. ``topics`` are for the broker's sake: the
        kit declares its agents' topics itself and reads any other one it is given."""
        mesh = cls(agents)
        async with mesh.kit:
            yield mesh


class BrokerMesh:
    """The agents in an in-process host on a real broker; waits read the topics."""

    kind = "broker"

    def __init__(self, settings: MeshSettings, emitter: Emitter) -> None:
        self.settings, self._emitter, self._codec = settings, emitter, Codec()

    async def emit(self, topic: Topic[Any], payload: BaseModel, *,
                   key: bytes | str | None = None,
                   correlation_id: str | None = None) -> Envelope[Any]:
        raw = key.encode() if isinstance(key, str) else key
        [event] = await self._emitter.emit(topic, [payload], key=raw,
                                           correlation_id=correlation_id)
        return event

    async def until(self, topics: Topics, check: Check, what: str,
                    timeout: float = 60.0) -> list[Envelope[Any]]:
        by_name = {t.name: t for t in _listed(topics)}
        seen: dict[str, Envelope[Any]] = {}

        async def take(record: Record) -> None:
            event = await self._decode(by_name[record.topic], record)
            seen.setdefault(event.event_id, event)

        async with TopicReader(self.settings.kafka, list(by_name)) as reader:
            await _read_until(reader, lambda: _holds(check, list(seen.values())), take,
                              timeout, lambda: f"{what} ({len(seen)} events)")
            for record in await reader.read_to_end(timeout):  # and what else is there
                await take(record)
        return list(seen.values())

    async def dead_letters(self, topic: Topic[Any], count: int, *,
                           timeout: float = 60.0) -> list[DeadLetter]:
        found: list[Record] = []

        async def take(record: Record) -> None:
            found.append(record)

        async with TopicReader(self.settings.kafka, [topic.dlq_name]) as reader:
            await _read_until(reader, lambda: len(found) >= count, take, timeout,
                              lambda: f"{topic.dlq_name}: {len(found)} dead letters, "
                                      f"expected {count}")
            everything = await reader.read_to_end(timeout)  # with any more already there
        return [DeadLetter.of(r) for r in sorted(everything,
                                                 key=lambda r: (r.partition, r.offset))]

    async def tick(self) -> None:
        """Nothing to do: the host runs every timer on its period."""

    async def _decode(self, topic: Topic[Any], record: Record) -> Envelope[Any]:
        payload: Any = (None if record.value is None  # a tombstone
                        else await self._codec.decode(topic, record.value))
        return read_headers(record.headers, topic=record.topic, partition=record.partition,
                            offset=record.offset, key=record.key).with_payload(payload)

    @classmethod
    @asynccontextmanager
    async def running(cls, settings: MeshSettings, agents: Sequence[Agent[Any]],
                      topics: Iterable[Topic[Any]] = ()) -> AsyncIterator[BrokerMesh]:
        """Apply every topic of ``agents`` and ``topics``, start the host and wait until
        each agent has its partitions."""
        declared = {t.name: t for t in [*topics, *(t for a in agents for t in a.all_topics)]}
        await apply_topics(settings.kafka, declared.values())
        async with Mesh(settings, agents) as host, Emitter(settings) as emitter:
            await host.wait_assigned()
            yield cls(settings, emitter)


async def _read_until(reader: TopicReader, done: Callable[[], bool],
                      take: Callable[[Record], Awaitable[None]], timeout: float,
                      what: Callable[[], str]) -> None:
    """Hand what ``reader`` fetches to ``take`` until ``done()``; fail after ``timeout``
    seconds, describing the wait with ``what()``."""
    deadline = time.monotonic() + timeout
    while not done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"not so within {timeout:.0f} s on the broker: {what()}")
        for record in await reader.poll(min(remaining, POLL_S)):
            await take(record)


@pytest.fixture(params=["kit", "broker"])
def mesh_under_test(request: pytest.FixtureRequest, broker: BrokerUnderTest) -> MeshFactory:
    """Starts a mesh of the given agents, once on the kit and once on the broker:
    ``async with mesh_under_test(agents, topics=[...]) as mesh``.

    Both sides ask for the session broker, so a ``--broker-tests-only`` session (the
    second broker of ``make test``) keeps the broker side; the kit ignores it.
    """
    if request.param == "kit":
        return KitMesh.running
    settings = broker.settings()

    def on_broker(agents: Sequence[Agent[Any]],
                  topics: Iterable[Topic[Any]] = ()) -> AbstractAsyncContextManager[BrokerMesh]:
        return BrokerMesh.running(settings, agents, topics)

    return on_broker
