"""Many inputs in flight per replica, on a real broker: inputs of one key in order and
never overlapping, other keys concurrently (within a partition too), offsets committed
only over finished inputs, a rate limit kept."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest

from mesh import Agent, Codec, Context, Mesh, Topic, apply_topics
from mesh.kafka.base import Partition
from mesh.kafka.transport import Consumer
from mesh.testing.checker import check
from tests.apps.stages import Item
from tests.conftest import BrokerUnderTest
from tests.support import encode, history, inject, make_items, wait_for_count


class Probe:
    """What the handlers saw: how many ran at once, per key and in all, and in which
    order each key's items were handled."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.per_key: dict[str, int] = defaultdict(int)
        self.key_peak = 0
        self.order: dict[str, list[int]] = defaultdict(list)
        self.started: list[float] = []

    async def handle(self, item: Item, delay_s: float) -> None:
        self.running += 1
        self.per_key[item.key] += 1
        self.peak = max(self.peak, self.running)
        self.key_peak = max(self.key_peak, self.per_key[item.key])
        self.order[item.key].append(item.seq)
        self.started.append(time.monotonic())
        try:
            await asyncio.sleep(delay_s)  # an LLM call's shape: waiting, not computing
        finally:
            self.running -= 1
            self.per_key[item.key] -= 1


def _agent(prefix: str, probe: Probe, *, delay_s: float, partitions: int = 2,
           **options: object) -> Agent[Item]:
    inbox = Topic(f"{prefix}.in", Item, key="key", partitions=partitions)
    out = Topic(f"{prefix}.out", Item, key="key", partitions=partitions)

    async def handle(item: Item, ctx: Context) -> Item:
        await probe.handle(item, delay_s)
        return item

    return Agent(f"{prefix}-slow", consumes=inbox, produces=out, handler=handle,
                 **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(("ordering", "concurrency", "peak"), [
    ("key", 16, (9, 16)),       # 16 keys over 2 partitions: up to 16 at once
    ("partition", 16, (1, 2)),  # one per partition: today's order
    ("none", 8, (5, 8)),        # bounded by the concurrency only
])
async def test_inputs_overlap_as_the_ordering_allows_and_each_key_stays_in_order(
        broker: BrokerUnderTest, prefix: str, ordering: str, concurrency: int,
        peak: tuple[int, int]) -> None:
    """Pass: 64 items (16 keys x 4) through a handler that waits 0.2 s: with ordering
    key, many run at once but never two of one key, and each key's items are handled
    in sequence; partition: at most one per partition; none: up to the concurrency.
    Every output arrives once (checker), and the committed offsets reach the ends."""
    probe = Probe()
    agent = _agent(prefix, probe, delay_s=0.2, concurrency=concurrency, ordering=ordering)
    source, sink = agent.consumes[0], agent.produces[0]
    settings = broker.settings()
    await apply_topics(settings.kafka, agent.all_topics)
    codec = Codec()
    items = make_items(keys=16, per_key=4)
    async with Mesh(settings, [agent]) as mesh:
        await mesh.wait_assigned()
        positions = await inject(settings, [encode(codec, source, i) for i in items])
        await wait_for_count(settings, [sink.name], len(items))
        runner = mesh.runners[0]
        ends = {Partition(source.name, p): o + 1 for p, o in positions}
        for partition, end in ends.items():  # positions hold the last offset per partition
            ends[partition] = max(o + 1 for p, o in positions if p == partition.partition)
        deadline = time.monotonic() + 30
        while {p: runner.lanes[p].committed for p in ends} != ends:
            assert time.monotonic() < deadline, "commits did not reach the ends"
            await asyncio.sleep(0.05)  # the commit interval is 200 ms; bounded above
    low, high = peak
    assert low <= probe.peak <= high, probe.peak
    if ordering != "none":
        assert probe.key_peak == 1
        assert all(seqs == sorted(seqs) for seqs in probe.order.values()), probe.order
    report = check(await history(settings, codec, items, sink=sink))
    assert not (report.lost or report.sink_duplicates), report.summary()
    async with Consumer(settings.kafka, group_id=agent.group) as consumer:
        committed = {p: await consumer.committed(p) for p in ends}
    assert committed == ends


async def test_a_rate_limit_spaces_the_calls(broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: with rate_limit=10 calls/s and concurrency 16, 30 quick inputs start no
    faster than the limit allows (a burst of one second's calls, then 10/s)."""
    probe = Probe()
    agent = _agent(prefix, probe, delay_s=0.0, partitions=1, concurrency=16,
                   rate_limit=10.0)
    source, sink = agent.consumes[0], agent.produces[0]
    settings = broker.settings()
    await apply_topics(settings.kafka, agent.all_topics)
    codec = Codec()
    items = make_items(keys=8, per_key=4)[:30]
    async with Mesh(settings, [agent]) as mesh:
        await mesh.wait_assigned()
        await inject(settings, [encode(codec, source, i) for i in items])
        await wait_for_count(settings, [sink.name], len(items))
    starts = sorted(probe.started)
    # 30 calls at 10/s with a 10-call burst: the last starts >= 2 s after the first
    assert starts[-1] - starts[0] >= 1.9, starts[-1] - starts[0]
    for i in range(len(starts)):  # a token bucket: n starts need (n - burst) / rate s
        for j in range(i + 11, len(starts)):
            assert starts[j] - starts[i] >= (j - i - 10) / 10.0 - 0.05, (i, j)
