"""The runtime on a real broker: agents wired by topics alone (a chain and a fan-out
with no pattern module) move every event once, in key order."""

from __future__ import annotations

from collections import Counter

from mesh import Codec, Mesh, apply_topics
from mesh.testing.checker import check
from tests.apps.stages import build
from tests.conftest import BrokerUnderTest
from tests.support import encode, history, inject, make_items, wait_for_count


async def test_three_agent_chain_moves_2000_events_once_each_in_key_order(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: every input reaches the sink exactly once (no loss, no log duplicates),
    each output went through all three stages, and per-key order holds."""
    app = build(prefix)
    chain = app.agents[:3]
    topics = {t.name: t for a in chain for t in a.consumes + a.produces}
    settings = broker.settings()
    await apply_topics(settings.kafka, topics.values())
    source, sink = chain[0].consumes[0], chain[2].produces[0]
    items = make_items(keys=20, per_key=100)
    codec = Codec()
    async with Mesh(settings, chain) as mesh:
        await mesh.wait_assigned()
        await inject(settings, [encode(codec, source, i) for i in items])
        await wait_for_count(settings, [sink.name], len(items))
    report = check(await history(settings, codec, items, sink=sink))
    assert report.ok_exactly_once, report.summary()
    outputs = await wait_for_count(settings, [sink.name], len(items))
    per_source = Counter()
    for record in outputs:
        item = await codec.decode(sink, record.value or b"")
        assert item.hops == [f"stage{n}" for n in (1, 2, 3)]  # type: ignore[attr-defined]
        per_source[item.source_id] += 1  # type: ignore[attr-defined]
    assert set(per_source.values()) == {1}
    assert [r.handled for r in mesh.runners] == [len(items)] * 3


async def test_two_agents_on_one_topic_in_different_groups_each_see_every_event(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: fan1 and fan2 both consume topic `a` (own groups) and each emits one
    output per input, so each of their sinks holds every input."""
    app = build(prefix)
    stage1, fan1, fan2 = app.agents[0], app.agents[3], app.agents[4]
    settings = broker.settings()
    await apply_topics(settings.kafka, app.topics.values())
    items = make_items(keys=5, per_key=20)
    codec = Codec()
    async with Mesh(settings, [stage1, fan1, fan2]) as mesh:
        await mesh.wait_assigned()
        await inject(settings, [encode(codec, stage1.consumes[0], i) for i in items])
        for branch in (fan1, fan2):
            await wait_for_count(settings, [branch.produces[0].name], len(items))
    assert fan1.group != fan2.group
    for branch in (fan1, fan2):
        report = check(await history(settings, codec, items, sink=branch.produces[0]))
        assert report.ok, report.summary()
