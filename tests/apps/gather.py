"""A fan-out / fan-in test app: branches ``alpha`` and ``beta`` answer every request, a
gather (rule all) merges them. Topic names come from ``MESH_TEST_PREFIX``, so
``mesh run tests.apps.gather:gather`` in a subprocess uses the test's topics.

``MESH_TEST_BRANCH_DELAY_MS`` slows each branch answer down (so a test can kill the
gather while parts are still coming). Also here: :class:`GatherWatch`, which follows
the merged and events topics of a gather for the tests.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from mesh import App, Codec, Envelope, MeshSettings, Topic
from mesh.kafka.base import OutRecord, Record
from mesh.patterns.gather import Gather, GatherEvent, GatherTopics, Merged, Part, branch
from tests.support import Follower


class Ask(BaseModel):
    """A test request: which branches answer it and its deadline may be overridden."""

    request_id: str
    question: str = ""
    branches: list[str] = Field(default_factory=list)
    deadline_s: float | None = None


def topics_for(prefix: str, partitions: int = 3) -> GatherTopics:
    return GatherTopics.named(prefix, Ask, key="request_id", partitions=partitions)


def answer(name: str) -> Callable[[Ask], Any]:
    delay = int(os.environ.get("MESH_TEST_BRANCH_DELAY_MS", "0")) / 1000

    async def work(ask: Ask) -> dict[str, str]:
        if delay:
            await asyncio.sleep(delay)
        return {"agent": name, "answer": f"{name} on {ask.question}"}

    return work


def build(prefix: str) -> App:
    """alpha, beta and the gather, on ``<prefix>.*`` topics, groups ``<prefix>-*``."""
    topics = topics_for(prefix)
    alpha = branch("alpha", answer("alpha"), topics=topics, group=f"{prefix}-alpha")
    beta = branch("beta", answer("beta"), topics=topics, group=f"{prefix}-beta")
    fan_in = Gather("gather", topics=topics, branches=[alpha, beta], deadline_s=900,
                    check_every_s=0.5, group=f"{prefix}-gather")
    return App(prefix, agents=[alpha, beta, fan_in])


def request_record(codec: Codec, topics: GatherTopics, ask: Ask) -> OutRecord:
    """A request as an outside system emits it; its correlation id is its request id."""
    env = Envelope(ask, str(uuid.uuid4()), ask.request_id, source="test",
                   key=ask.request_id.encode())
    value, fingerprint = codec.encode(topics.requests, ask)
    return OutRecord(topics.requests.name, value, env.key,
                     tuple(env.with_payload(ask, schema=fingerprint).headers()))


def part_record(codec: Codec, topics: GatherTopics, part: Part) -> OutRecord:
    """A part as a branch would produce it (injected directly by tests)."""
    env = Envelope(part, str(uuid.uuid4()), part.correlation_id, source=part.agent,
                   key=part.correlation_id.encode())
    value, fingerprint = codec.encode(topics.parts, part)
    return OutRecord(topics.parts.name, value, env.key,
                     tuple(env.with_payload(part, schema=fingerprint).headers()))


class GatherWatch(Follower):
    """Follows a gather's merged and events topics; tests wait on what arrived."""

    def __init__(self, settings: MeshSettings, topics: GatherTopics) -> None:
        super().__init__(settings, [topics.merged.name, topics.events.name])
        self._topics, self._codec = topics, Codec()
        self.merged: dict[tuple[str, str], dict[str, Merged]] = defaultdict(dict)
        self.events: dict[tuple[str, str], dict[str, GatherEvent]] = defaultdict(dict)

    async def apply(self, record: Record) -> None:
        merged, events = self._topics.merged, self._topics.events
        topic: Topic[Any] = merged if record.topic == merged.name else events
        payload: Any = await self._codec.decode(topic, record.value or b"")
        event_id = dict(record.headers)["mesh-event-id"].decode()
        store = self.merged if topic is merged else self.events
        store[(payload.gather, payload.correlation_id)][event_id] = payload

    def kinds(self, gather: str, cid: str) -> list[str]:
        return [e.kind for e in self.events[(gather, cid)].values()]

    async def merged_of(self, gather: str, cid: str, timeout: float = 60.0) -> Merged:
        """The merged event of ``cid`` from ``gather`` (waiting for it)."""
        await self.until(lambda: bool(self.merged.get((gather, cid))),
                         f"merged event of {gather} for {cid}", timeout)
        return next(iter(self.merged[(gather, cid)].values()))

    async def event(self, gather: str, cid: str, kind: str, *, agent: str | None = None,
                    timeout: float = 60.0) -> GatherEvent:
        """The first ``kind`` event of ``gather`` for ``cid`` (from ``agent``)."""
        def found() -> GatherEvent | None:
            return next((e for e in self.events.get((gather, cid), {}).values()
                         if e.kind == kind and (agent is None or e.agent == agent)), None)
        await self.until(lambda: found() is not None,
                         f"{kind} event of {gather} for {cid} ({agent or 'any agent'})", timeout)
        event = found()
        assert event is not None
        return event


PREFIX = os.environ.get("MESH_TEST_PREFIX", "gather")
app = build(PREFIX)
alpha, beta, gather = app.agents
