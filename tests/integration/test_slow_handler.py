"""A handler slower than max.poll.interval.ms must not make the agent leave its group."""

from __future__ import annotations

from mesh import Codec, Mesh, apply_topics
from mesh.testing.checker import check
from tests.apps.stages import build
from tests.conftest import BrokerUnderTest
from tests.support import encode, history, inject, make_items, wait_for_count


async def test_handler_slower_than_poll_interval_keeps_its_partitions(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: each handler call takes 2.5 s with max.poll.interval.ms = 1 s, yet the agent
    is never revoked (no rebalance), and every item is handled exactly once."""
    app = build(prefix, partitions=2)
    stage1 = app.agents[0]
    source, sink = stage1.consumes[0], stage1.produces[0]
    base = broker.settings()
    kafka = base.kafka.model_copy(update={"max_poll_interval_ms": 1_000})
    settings = base.model_copy(update={"kafka": kafka})
    await apply_topics(settings.kafka, [source, sink])
    codec = Codec()
    items = [i.model_copy(update={"sleep_ms": 2_500}) for i in make_items(keys=2, per_key=2)]
    async with Mesh(settings, [stage1]) as mesh:
        await mesh.wait_assigned()
        await inject(settings, [encode(codec, source, i) for i in items])
        await wait_for_count(settings, [sink.name], len(items), timeout=60)
    assert mesh.runners[0].revocations == 0
    report = check(await history(settings, codec, items, sink=sink))
    assert report.ok_exactly_once, report.summary()
