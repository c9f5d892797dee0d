"""Creating topics (``apply_topics``) when someone else creates them at the same time,
and an agent that finds its topics missing."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from mesh import Agent, Context, Mesh, Topic, apply_topics
from mesh.errors import TopicDrift
from mesh.kafka.admin import Admin
from mesh.kafka.base import TopicSpec
from tests.conftest import BrokerUnderTest


class Note(BaseModel):
    text: str


async def test_apply_topics_reports_a_topic_created_meanwhile_as_drift_not_a_hang(
        broker: BrokerUnderTest, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass: a topic missing when `apply_topics` looked, then created by someone else
    with 1 partition before its own create (as Apache Kafka auto-creates a topic for a
    first write), is reported as drift naming the partitions, promptly; the other
    topics are created, and the one already there is left as it is."""
    settings = broker.settings()
    name = f"{prefix}.raced"
    async with Admin(settings.kafka) as admin:
        await admin.create_topic(TopicSpec(name, 1))
    describe = Admin.describe
    calls = 0

    async def first_misses(self: Admin, names: Any) -> dict[str, TopicSpec]:
        nonlocal calls
        calls += 1  # the first look misses it: the other creator got in after that
        found = await describe(self, names)
        return {k: v for k, v in found.items() if k != name} if calls == 1 else found

    monkeypatch.setattr(Admin, "describe", first_misses)
    changes = await apply_topics(settings.kafka, [Topic(name, Note, partitions=4)])
    by_name = {c.name: (c.action, c.detail) for c in changes}
    assert by_name[name] == ("drift", "partitions: declared 4, broker 1")
    assert by_name[f"{name}.dlq"][0] == "created"
    async with Admin(settings.kafka) as admin:
        assert (await admin.describe([name]))[name].partitions == 1


async def test_an_agent_whose_output_topic_is_missing_does_not_start_or_create_it(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: an agent's input topic exists, its output topic does not: the mesh does
    not start, with TopicDrift naming the output topic and `mesh topics apply`, and the
    output topic still does not exist (no write let the broker create it). Told to
    create its topics, the same mesh starts and the topic has its declared 3
    partitions."""
    settings = broker.settings()
    inbox = Topic(f"{prefix}.notes-in", Note, partitions=2)
    outbox = Topic(f"{prefix}.notes-out", Note, partitions=3)
    await apply_topics(settings.kafka, [inbox])

    async def copy(note: Note, ctx: Context) -> Note:
        return note

    copier = Agent(f"{prefix}-copier", consumes=inbox, produces=[outbox], handler=copy)
    with pytest.raises(TopicDrift) as failed:
        async with Mesh(settings, [copier]):
            pytest.fail("the mesh started without its output topic")
    assert f"missing: {outbox.name}" in str(failed.value)
    assert inbox.name not in str(failed.value).split("missing:")[1].split(";")[0]
    assert "mesh topics apply" in str(failed.value)
    async with Admin(settings.kafka) as admin:
        assert outbox.name not in await admin.describe([outbox.name])
    async with Mesh(settings, [copier], create_topics=True) as mesh:
        await mesh.wait_assigned()
    async with Admin(settings.kafka) as admin:
        assert (await admin.describe([outbox.name]))[outbox.name].partitions == 3
