"""`Held` (e.g. a breaker open): the input is kept and handled again later, the agent's
partitions are paused meanwhile, and nothing is retried or dead-lettered."""

from __future__ import annotations

import time

from mesh import Agent, Codec, Context, Held, Mesh, apply_topics
from mesh.testing.checker import check
from tests.apps.stages import Item, build
from tests.conftest import BrokerUnderTest
from tests.support import encode, history, inject, make_items, read_all, wait_for_count


async def test_held_inputs_are_handled_again_later_and_never_dead_lettered(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: while the downstream is "down" (1.5 s from the first call) the handler
    raises Held;
    afterwards every item is handled exactly once, in key order, none dead-lettered,
    and the partitions were paused (the runner counted holds)."""
    template = build(prefix).agents[0]
    source, sink = template.consumes[0], template.produces[0]
    down_until = 0.0  # set by the first call: down for 1.5 s from then
    calls_while_down = 0

    async def handle(item: Item, ctx: Context) -> Item:
        nonlocal calls_while_down, down_until
        down_until = down_until or time.time() + 1.5
        if time.time() < down_until:
            calls_while_down += 1
            raise Held("downstream down", until=min(down_until, time.time() + 0.5))
        return item.model_copy(update={"hops": ["held-then-done"]})

    agent = Agent(f"{prefix}-holder", consumes=source, produces=sink, handler=handle)
    settings = broker.settings()
    await apply_topics(settings.kafka, [source, sink])
    codec = Codec()
    items = make_items(keys=4, per_key=10)
    async with Mesh(settings, [agent]) as mesh:
        await mesh.wait_assigned()
        await inject(settings, [encode(codec, source, i) for i in items])
        await wait_for_count(settings, [sink.name], len(items), timeout=60)
    runner = mesh.runners[0]
    assert runner.holds >= 1 and calls_while_down >= 1
    assert calls_while_down <= runner.holds  # each held call was kept, not retried
    assert runner.dead_lettered == 0 and await read_all(settings, [source.dlq_name]) == []
    report = check(await history(settings, codec, items, sink=sink))
    assert report.ok_exactly_once, report.summary()
