"""The lanes hand fetched records to their workers at once, keep each key's order, and
commit one at a time; the poll loop keeps polling while a commit is in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any, NamedTuple

import pytest
from pydantic import BaseModel

from mesh import Agent, Context, MeshSettings, Topic
from mesh.errors import TransportError
from mesh.kafka.base import Acks, Partition, Record
from mesh.runtime.lanes import Lanes
from mesh.runtime.runner import AgentRunner, Deadline
from mesh.serde.codec import Codec

PART = Partition("orders", 0)


class Order(BaseModel):
    id: int


async def ignore(order: Order, ctx: Context) -> None:
    """The handler: the lanes call ``Harness.handle`` instead."""


ORDERS = Topic("orders", Order, partitions=1)


class Sent(NamedTuple):
    """What an ack resolves to (aiokafka's RecordMetadata, its fields the lanes read)."""

    partition: int
    offset: int


def record(offset: int, key: bytes) -> Record:
    return Record(PART.topic, PART.partition, offset, key, b"", (), 0)


class FakeConsumer:
    """Polls return nothing; commits wait for ``release`` and are recorded."""

    def __init__(self) -> None:
        self.polls = 0
        self.polled = asyncio.Event()
        self.commits: list[dict[Partition, int]] = []
        self.in_commit = 0
        self.most_in_commit = 0
        self.release = asyncio.Event()

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Partition, list[Record]]:
        self.polls += 1
        self.polled.set()
        await asyncio.sleep(0)
        return {}

    def partition_count(self, topic: str) -> int:
        return 1

    def assignment(self) -> set[Partition]:
        return {PART}

    def paused(self) -> set[Partition]:
        return set()

    def pause(self, partitions: Any) -> None:
        """Nothing to pause."""

    def resume(self, partitions: Any) -> None:
        """Nothing to resume."""

    async def commit(self, offsets: Mapping[Partition, int]) -> None:
        self.in_commit += 1
        self.most_in_commit = max(self.most_in_commit, self.in_commit)
        try:
            await self.release.wait()
        finally:
            self.in_commit -= 1
        self.commits.append(dict(offsets))


class Harness:
    """Lanes whose handler records what it handled (and may be made to wait)."""

    def __init__(self, ordering: str = "key", concurrency: int | None = None) -> None:
        self.handled: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.tasks: list[asyncio.Task[None]] = []
        agent = Agent("orders-agent", consumes=ORDERS, ordering=ordering,  # type: ignore[arg-type]
                      handler=ignore, concurrency=concurrency)
        ready = asyncio.Event()
        ready.set()
        self.lanes = Lanes(agent, MeshSettings(), handle=self.handle, spawn=self.spawn,
                           ready=ready, held_until=lambda: 0.0)

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self.tasks.append(task)
        return task

    async def handle(self, rec: Record) -> Acks:
        await self.gate.wait()
        self.handled.append(rec.offset)
        return Acks([])

    async def close(self) -> None:
        await self.lanes.close(self.lanes.partitions())


async def test_fed_records_go_to_their_workers_before_the_lane_task_runs() -> None:
    harness = Harness()
    harness.lanes.feed(PART, [record(0, b"a"), record(1, b"b")])
    lane = harness.lanes[PART]
    # No loop turn has passed: the lane's own task has not run, the records are taken.
    assert not lane.backlog
    assert sorted(lane.pending) == [0, 1]
    assert len(lane.workers) == 2
    await asyncio.wait(set(lane.workers))
    assert sorted(harness.handled) == [0, 1]
    await harness.close()


async def test_one_keys_records_keep_their_order_across_polls() -> None:
    harness = Harness()
    harness.gate.clear()  # the first record's handler waits
    harness.lanes.feed(PART, [record(0, b"a"), record(1, b"b")])
    harness.lanes.feed(PART, [record(2, b"a"), record(3, b"a")])
    lane = harness.lanes[PART]
    assert len(lane.workers) == 2  # one per key: key a's later records queue behind 0
    harness.gate.set()
    await asyncio.wait(set(lane.workers))
    assert [o for o in harness.handled if o in (0, 2, 3)] == [0, 2, 3]
    await harness.close()


async def test_a_lane_runs_no_more_workers_than_its_concurrency_and_they_take_every_key(
        ) -> None:
    """Pass: concurrency 2 and six keys (key a three times) fed while the handler
    waits: two workers, the other keys wait for one; released, every record is handled,
    key a's in offset order, and the workers are gone. Keys fed afterwards get workers
    again (a worker that found no key waiting gave its place back)."""
    harness = Harness(concurrency=2)
    harness.gate.clear()
    keys = [b"a", b"b", b"a", b"c", b"d", b"a", b"e", b"f"]
    harness.lanes.feed(PART, [record(i, k) for i, k in enumerate(keys)])
    lane = harness.lanes[PART]
    assert len(lane.workers) == 2 and list(lane.unserved) == [b"c", b"d", b"e", b"f"]
    harness.gate.set()
    await asyncio.wait(set(lane.workers))
    assert sorted(harness.handled) == list(range(8))
    assert [o for o in harness.handled if keys[o] == b"a"] == [0, 2, 5]
    assert not lane.workers and not lane.keys and not lane.unserved and lane.serving == 0
    harness.lanes.feed(PART, [record(8, b"g"), record(9, b"h"), record(10, b"i")])
    assert len(lane.workers) == 2 and list(lane.unserved) == [b"i"]
    await asyncio.wait(set(lane.workers))
    assert sorted(harness.handled) == list(range(11))
    await harness.close()


async def test_done_advances_when_the_front_is_acknowledged_whatever_the_order() -> None:
    """Pass: three inputs on three keys, each handled at once, their acks resolving
    in the order 2, 1, 0: ``done`` stays put until the front (0) is acknowledged, then
    passes all three. The lane's task is woken by the front's acks alone, and a later
    front that was acknowledged meanwhile is passed too."""
    loop = asyncio.get_running_loop()
    futures = {i: loop.create_future() for i in range(3)}
    harness = Harness()

    async def handle(rec: Record) -> Acks:
        harness.handled.append(rec.offset)
        return Acks([futures[rec.offset]])

    harness.lanes.handle = handle
    harness.lanes.feed(PART, [record(0, b"a"), record(1, b"b"), record(2, b"c")])
    lane = harness.lanes[PART]
    async with asyncio.timeout(10):
        while len(harness.handled) < 3:
            await asyncio.sleep(0)
        for offset in (2, 1):
            futures[offset].set_result(Sent(0, offset))
            for _ in range(5):  # loop turns for the lane's task, were it woken
                await asyncio.sleep(0)
            assert lane.done is None and list(lane.pending) == [0, 1, 2]
        futures[0].set_result(Sent(0, 0))
        while lane.done != 3:
            await asyncio.sleep(0)
    assert not lane.pending
    await harness.close()


async def test_a_failed_ack_stops_the_lane_loudly_and_done_stays_before_it() -> None:
    """Pass: the front input's output is refused by the broker: the lane's task fails
    with ``TransportError`` naming the client's error, and ``done`` never passes the
    input (it is redelivered, not skipped)."""
    loop = asyncio.get_running_loop()
    refused = loop.create_future()
    harness = Harness()

    async def handle(rec: Record) -> Acks:
        return Acks([refused])

    harness.lanes.handle = handle
    harness.lanes.feed(PART, [record(0, b"a")])
    lane = harness.lanes[PART]
    refused.set_exception(RuntimeError("NotEnoughReplicas"))
    assert lane.task is not None
    with pytest.raises(TransportError, match="RuntimeError: NotEnoughReplicas"):
        async with asyncio.timeout(10):
            await lane.task
    assert lane.done is None and list(lane.pending) == [0]


async def test_records_wait_for_the_state_tables_then_go() -> None:
    harness = Harness()
    harness.lanes.ready.clear()
    harness.lanes.feed(PART, [record(0, b"a")])
    lane = harness.lanes[PART]
    assert list(lane.backlog) == [record(0, b"a")] and not lane.pending
    harness.lanes.ready.set()
    harness.lanes.wake()
    async with asyncio.timeout(10):
        while harness.handled != [0]:
            await asyncio.sleep(0)
    await harness.close()


async def test_commits_run_one_at_a_time_each_with_the_latest_offsets() -> None:
    harness = Harness()
    consumer = FakeConsumer()
    harness.lanes.consumer = consumer  # type: ignore[assignment]
    lane = harness.lanes.open(PART)
    lane.done = 1  # as if inputs 0 were handled and acknowledged
    first = asyncio.create_task(harness.lanes.commit())
    async with asyncio.timeout(10):
        while consumer.in_commit == 0:
            await asyncio.sleep(0)
    lane.done = 5
    second = asyncio.create_task(harness.lanes.commit())
    await asyncio.sleep(0)
    assert consumer.in_commit == 1  # the second waits for the first
    consumer.release.set()
    await asyncio.gather(first, second)
    assert consumer.commits == [{PART: 1}, {PART: 5}]
    assert consumer.most_in_commit == 1
    lane.done = lane.committed  # nothing left for the close's commit
    await harness.close()


def runner_with(consumer: FakeConsumer) -> AgentRunner:
    agent = Agent("orders-agent", consumes=ORDERS, handler=ignore)
    settings = MeshSettings()
    runner = AgentRunner(agent, settings, producer=None,  # type: ignore[arg-type]
                         codec=Codec(settings.schema_registry))
    runner.lanes.consumer = consumer  # type: ignore[assignment]
    return runner


async def test_the_poll_loop_keeps_polling_while_a_commit_is_in_flight() -> None:
    consumer = FakeConsumer()
    runner = runner_with(consumer)
    started = asyncio.Event()

    async def slow_commit(lanes: Any = None) -> None:
        started.set()
        await consumer.release.wait()

    runner.lanes.commit = slow_commit  # type: ignore[method-assign]
    stop = asyncio.Event()
    polling = asyncio.create_task(runner._poll(consumer, stop))  # type: ignore[arg-type]
    async with asyncio.timeout(10):
        await started.wait()
        polls = consumer.polls
        while consumer.polls < polls + 3:  # inline, the commit would hold the loop here
            await asyncio.sleep(0)
    stop.set()
    await asyncio.sleep(0)
    assert not polling.done()  # the loop waits for the commit in flight before it ends
    consumer.release.set()
    async with asyncio.timeout(10):
        await polling


async def test_a_failed_commit_stops_the_poll_loop_with_its_error() -> None:
    consumer = FakeConsumer()
    runner = runner_with(consumer)

    async def failing_commit(lanes: Any = None) -> None:
        raise TransportError("Committing offsets failed: the broker is gone")

    runner.lanes.commit = failing_commit  # type: ignore[method-assign]
    with pytest.raises(TransportError, match="broker is gone"):
        async with asyncio.timeout(10):
            await runner._poll(consumer, asyncio.Event())  # type: ignore[arg-type]


async def test_a_runner_that_stops_while_its_tables_restore_takes_no_partition() -> None:
    """CI on Apache Kafka: an assignment whose state restore outlived the runner's task
    group raised AssertionError in aiokafka's listener (and left a coroutine never
    awaited). Now the assignment ends quietly with no lane opened."""
    runner = runner_with(FakeConsumer())
    restoring, finish = asyncio.Event(), asyncio.Event()

    class SlowTable:
        async def restore(self) -> int:
            restoring.set()
            await finish.wait()
            return 0

    runner.tables = {"orders-state": SlowTable()}  # type: ignore[dict-item]
    async with asyncio.TaskGroup() as tasks:
        runner._tasks = tasks
        assigning = asyncio.create_task(runner._on_assigned([PART]))
        async with asyncio.timeout(10):
            await restoring.wait()
    runner._tasks = None  # the runner left its task group, as run() does on stop
    finish.set()
    async with asyncio.timeout(10):
        await assigning  # raises the AssertionError on the old code
    assert runner.assignment() == frozenset()
    assert runner._fatal is None and not runner.assigned.is_set()


async def test_at_shutdown_a_close_gives_inputs_in_flight_half_of_what_is_left() -> None:
    """Pass: the shutdown's bound (2 s) started, an input whose handler never returns:
    closing its lane waits about half the bound for it (not the 25 s a rebalance's close
    may wait), then cancels it uncommitted, leaving the rest to the commit and to
    leaving the group; the lane is gone."""
    harness = Harness()
    entered, never = asyncio.Event(), asyncio.Event()

    async def handle(rec: Record) -> Acks:
        entered.set()
        await never.wait()
        raise AssertionError("the handler returned")

    harness.lanes.handle = handle
    deadline = Deadline(2.0)
    harness.lanes.deadline = deadline
    harness.lanes.feed(PART, [record(0, b"a")])
    async with asyncio.timeout(10):
        await entered.wait()
    loop = asyncio.get_running_loop()
    deadline.start()
    began = loop.time()
    async with asyncio.timeout(10):
        await harness.close()
    took = loop.time() - began
    assert 0.9 <= took < 1.6, took
    assert harness.lanes.partitions() == []
    assert 0.0 < deadline.left() <= 1.1
