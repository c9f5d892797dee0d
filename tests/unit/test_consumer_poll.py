"""The mesh's consumer keeps its poll's timeout while a rebalance does not end: aiokafka's
getmany waits for the rebalance's assignment whatever its timeout, so an agent's poll
loop would not see its stop (a SIGTERM during a rebalance held by a frozen member, or by
a broker that never completes it; the likely cause of a CI failure on the embedded
broker, where two `mesh run` workers did not exit within 60 s of SIGTERM during a
rebalance). The poll is cut; the records come with a later one."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from mesh.config import KafkaSettings
from mesh.kafka import transport
from mesh.kafka.base import Partition
from mesh.kafka.transport import Consumer


class Rebalancing:
    """Stands in for aiokafka's consumer: ``getmany`` first waits for an assignment (as
    aiokafka's fetcher does while a rebalance is in progress, ignoring the timeout), then
    takes what it holds from its buffer without awaiting."""

    def __init__(self) -> None:
        self.assigned = asyncio.Event()
        self.buffer = {TopicPartition("t", 0): [
            SimpleNamespace(topic="t", partition=0, offset=o, key=b"k", value=b"v",
                            headers=[], timestamp=0) for o in range(3)]}
        self.waits_cut = 0

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        try:
            await self.assigned.wait()
        except asyncio.CancelledError:
            self.waits_cut += 1
            raise
        taken, self.buffer = self.buffer, {}
        return taken

    async def committed(self, tp: TopicPartition) -> int | None:
        return None  # no committed offset: the holes check starts at the first delivery


async def stand_in(consumer: Consumer, client: Any) -> None:
    """Put ``client`` in place of the consumer's aiokafka client (never started)."""
    await consumer._client.stop()
    consumer._client = client


@pytest.fixture
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "POLL_GRACE_S", 0.05)


async def test_a_poll_waiting_for_a_rebalance_returns_nothing_after_its_timeout_and_loses_nothing(
        short_grace: None) -> None:
    """Pass: while the stand-in waits for an assignment, each poll returns {} (its wait
    cancelled) instead of waiting on; once assigned, the next poll has all three
    records, in order."""
    consumer = Consumer(KafkaSettings(profile="embedded"), group_id="g")  # as in CI
    client = Rebalancing()
    await stand_in(consumer, client)
    async with asyncio.timeout(10):  # the test's own bound: without the fix it would hang
        assert await consumer.getmany(timeout_ms=20, max_records=10) == {}
        assert await consumer.getmany(timeout_ms=20, max_records=10) == {}
    assert client.waits_cut == 2
    client.assigned.set()
    got = await consumer.getmany(timeout_ms=20, max_records=10)
    assert [r.offset for r in got[Partition("t", 0)]] == [0, 1, 2]


async def test_a_timeout_error_of_the_client_itself_is_not_taken_for_the_poll_bound(
        short_grace: None) -> None:
    """Pass: a TimeoutError raised by the client before the bound expires propagates
    (it is the client's failure, not a poll cut short)."""
    consumer = Consumer(KafkaSettings(), group_id="g")

    class Failing:
        async def getmany(self, **_: Any) -> dict[Any, list[Any]]:
            raise TimeoutError("the client's own")

    await stand_in(consumer, Failing())
    with pytest.raises(TimeoutError, match="the client's own"):
        await consumer.getmany(timeout_ms=20, max_records=10)


async def test_a_committed_offset_that_never_comes_does_not_hold_the_poll(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass: the holes check asks for a group partition's committed offset on its first
    delivery; aiokafka retries that request while the coordinator is unavailable. With
    no answer the poll still returns its records, in order, after COMMITTED_WAIT_S, and
    the partition is checked from that first delivery."""
    monkeypatch.setattr(transport, "COMMITTED_WAIT_S", 0.05)
    consumer = Consumer(KafkaSettings(profile="embedded"), group_id="g")

    class Unanswered(Rebalancing):
        async def committed(self, tp: TopicPartition) -> int | None:
            await asyncio.Event().wait()  # the coordinator never answers
            raise AssertionError("unreachable")

    client = Unanswered()
    client.assigned.set()
    await stand_in(consumer, client)
    async with asyncio.timeout(10):  # the test's own bound: without the fix it would hang
        got = await consumer.getmany(timeout_ms=20, max_records=10)
    assert [r.offset for r in got[Partition("t", 0)]] == [0, 1, 2]
    assert consumer._holes is not None and consumer._holes.known(TopicPartition("t", 0))
