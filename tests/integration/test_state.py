"""State tables on compacted topics, timers and failure handlers, on a real broker."""

from __future__ import annotations

from pydantic import BaseModel

from mesh import Agent, Codec, Context, Mesh, Topic, apply_topics
from mesh.state import CompactedTable
from tests.apps.stages import Item
from tests.conftest import BrokerUnderTest
from tests.support import encode, inject, make_items, read_all, wait_for_count


class Count(BaseModel):
    key: str
    seen: int
    last_seq: int


def counting_agent(prefix: str) -> tuple[Agent[Item], Topic[Item], Topic[Count], Topic[Item]]:
    inbox = Topic(f"{prefix}.in", Item, key="key", partitions=2)
    counts = Topic(f"{prefix}.counts", Count, key="key", partitions=2, compacted=True)
    out = Topic(f"{prefix}.out", Item, key="key", partitions=2)

    async def count(item: Item, ctx: Context) -> Item:
        current = ctx.get(counts, item.key)
        seen = (current.seen if current else 0) + 1
        ctx.put(counts, item.key, Count(key=item.key, seen=seen, last_seq=item.seq))
        if item.text == "poison":
            raise ValueError("poison")
        return item.model_copy(update={"hops": [f"seen={seen}"]})

    async def failed(item: Item, ctx: Context, error: BaseException) -> None:
        ctx.emit(out, item.model_copy(update={"hops": [f"failed: {error}"]}))

    agent = Agent(f"{prefix}-counter", consumes=inbox, produces=out, handler=count,
                  state=[counts], on_failure=failed)
    return agent, inbox, counts, out


async def test_state_table_survives_a_restart_and_counts_on(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: after a restart the table is rebuilt from the compacted topic, so counts
    continue from where they were (3 + 2 = 5 per key); the poison item's write is
    dropped with its failed attempt (k2 stays at 4, in memory and on the topic), and
    the failure handler's event is produced for it."""
    agent, inbox, counts, out = counting_agent(prefix)
    settings = broker.settings()
    await apply_topics(settings.kafka, [inbox, counts, out])
    codec = Codec()
    first = make_items(keys=3, per_key=3)
    async with Mesh(settings, [agent]) as mesh:
        await mesh.wait_assigned()
        await inject(settings, [encode(codec, inbox, i) for i in first])
        await wait_for_count(settings, [out.name], len(first))
    second = [i.model_copy(update={"seq": i.seq + 3}) for i in make_items(keys=3, per_key=2)]
    second[-1] = second[-1].model_copy(update={"text": "poison"})
    async with Mesh(settings, [agent]) as mesh:
        await mesh.wait_assigned()
        assert {k: v.seen for k, v in mesh.runners[0].tables[counts.name].items()} == {
            "k0": 3, "k1": 3, "k2": 3}
        await inject(settings, [encode(codec, inbox, i) for i in second])
        await wait_for_count(settings, [out.name], len(first) + len(second))
        local = {k: v.seen for k, v in mesh.runners[0].tables[counts.name].items()}
    table = CompactedTable(counts, settings.kafka, codec)
    await table.restore()
    assert {k: v.seen for k, v in table.items()} == local == {"k0": 5, "k1": 5, "k2": 4}
    outputs = [await codec.decode(out, r.value or b"") for r in await read_all(settings, [out.name])]
    failed = [o for o in outputs if o.hops[0].startswith("failed")]  # type: ignore[attr-defined]
    assert len(failed) == 1 and failed[0].source_id == second[-1].source_id  # type: ignore[attr-defined]
    assert len(await read_all(settings, [inbox.dlq_name])) == 1


async def test_timer_runs_and_its_emits_are_produced(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: a timer every 0.1 s emits ticks with its own correlation id; they arrive."""
    agent, inbox, counts, out = counting_agent(prefix)
    settings = broker.settings()
    await apply_topics(settings.kafka, [inbox, counts, out])
    ticks = 0

    @agent.every(0.1)
    async def tick(ctx: Context) -> None:
        nonlocal ticks
        ticks += 1
        if ticks <= 3:
            ctx.emit(out, Item(key="tick", seq=ticks, source_id=f"tick-{ticks}"),
                     correlation_id=f"tick-{ticks}")

    async with Mesh(settings, [agent]) as mesh:
        await mesh.wait_assigned()
        records = await wait_for_count(settings, [out.name], 3, timeout=30)
    correlations = sorted(dict(r.headers)["mesh-correlation"].decode() for r in records)
    assert correlations == ["tick-1", "tick-2", "tick-3"]
