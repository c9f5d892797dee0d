"""Breakers sharing one compacted topic: replicas agree, a restart keeps the state."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from mesh import Codec, MeshSettings
from mesh.errors import BreakerOpen
from mesh.resilience.breaker import (
    BreakerPolicy,
    BreakerRecord,
    BreakerTopics,
    BreakerTransition,
    CircuitBreaker,
    breaker_topics,
    is_claim_key,
)
from tests.conftest import BrokerUnderTest
from tests.support import read_all


async def until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not seen within {timeout:.0f} s: {what}"
        await asyncio.sleep(0.05)  # polling a local attribute, not waiting for time


async def down() -> None:
    raise ConnectionError("503")


async def ok() -> str:
    return "ok"


async def test_two_replicas_see_each_others_open_and_close_and_a_restart_keeps_it(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: replica A opens after 2 failures and B (same topic) then refuses calls with
    BreakerOpen; B's successful probe closes it and A sees that; a new instance started
    after A opened again starts open; the events topic holds the transitions in order."""
    settings = broker.settings()
    topics = breaker_topics(prefix)
    # 5 s: b must see the opening (through the broker) before the reset timeout passes,
    # or its first call is already the probe; on a loaded machine that took over 1 s
    policy = BreakerPolicy(failure_threshold=2, reset_timeout=5.0)
    a = CircuitBreaker("api", policy, settings=settings, topics=topics, replica="a")
    b = CircuitBreaker("api", policy, settings=settings, topics=topics, replica="b")
    async with a, b:
        for _ in range(2):
            with contextlib.suppress(ConnectionError, BreakerOpen):  # the tripping call is held
                await a.call(down)
        assert a.state == "open"
        await until(lambda: b.state == "open", "replica b sees the opening")
        held_until = 0.0
        try:
            await b.call(ok)
            raise AssertionError("b let a call through while open")
        except BreakerOpen as exc:
            held_until = exc.until
        assert held_until == (a.record.opened_at or 0) + 5.0
        while time.time() < held_until:  # the reset timeout is the behaviour under test
            await asyncio.sleep(0.05)
        assert await b.call(ok) == "ok"
        assert b.state == "closed"
        await until(lambda: a.state == "closed" and a.record.version == 3,
                    "replica a sees b's probe close it")
        for _ in range(2):
            with contextlib.suppress(ConnectionError, BreakerOpen):  # the tripping call is held
                await a.call(down)
        assert a.state == "open" and a.record.version == 4
    restarted = CircuitBreaker("api", policy, settings=settings, topics=topics, replica="a2")
    async with restarted:
        assert restarted.state == "open" and restarted.record.version == 4
        assert restarted.record.updated_by == "a"
    codec = Codec()
    events = [await codec.decode(topics.events, r.value or b"")
              for r in await read_all(settings, [topics.events.name])]
    assert all(isinstance(e, BreakerTransition) for e in events)
    assert [(e.transition, e.by) for e in events] == [  # type: ignore[attr-defined]
        ("opened", "a"), ("half_open", "b"), ("closed", "b"), ("opened", "a")]


class SharedClock:
    """One fake clock for every replica: the reset timeout passes when the test says."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class ProbeRound:
    """Every replica tries ``per_replica`` calls at once; a call that gets through waits
    in its body until :meth:`release`, so all calls are decided while probes run."""

    def __init__(self, replicas: list[CircuitBreaker], per_replica: int, *,
                 fail: bool) -> None:
        self.ran: list[str] = []  # the replica of each call whose body ran
        self.refused = 0
        self._fail = fail
        self._release = asyncio.Event()
        self._tasks = [asyncio.create_task(self._try(b)) for b in replicas
                       for _ in range(per_replica)]

    async def _try(self, breaker: CircuitBreaker) -> None:
        ran = False
        try:
            async with breaker.guard():
                ran = True
                self.ran.append(breaker.replica)
                await self._release.wait()
                if self._fail:
                    raise ConnectionError("503 on the probe")
        except (BreakerOpen, ConnectionError):  # a failed probe is raised as either
            if not ran:
                self.refused += 1

    async def decided(self) -> None:
        await until(lambda: len(self.ran) + self.refused == len(self._tasks),
                    "every call is let through or refused")

    async def release(self) -> None:
        self._release.set()
        await asyncio.gather(*self._tasks)


async def claims_in_log_order(settings: MeshSettings, topics: BreakerTopics,
                              epoch: int) -> list[BreakerRecord]:
    """The probe claims of ``epoch`` in the breaker topic, in log order."""
    codec = Codec()
    records = sorted(await read_all(settings, [topics.state.name]), key=lambda r: r.offset)
    return [claim for r in records
            if r.value is not None and is_claim_key((r.key or b"").decode())
            and (claim := await codec.decode(topics.state, r.value)).version == epoch]


async def test_three_replicas_share_the_probe_budget_and_a_probe_outcome_holds_for_all(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: three replicas of breaker "api" (each its own Kafka clients) with a budget
    of 2 probes; after the reset timeout each tries 3 calls at once: exactly 2 bodies run
    and the 7 other calls are refused, and the replicas that ran are the writers of the
    epoch's first 2 claims in log order. The probes fail: the breaker is open at every
    replica. Next epoch: again exactly 2 of 9; a replica started mid-epoch is refused
    (it counted the claims on restore); the probes succeed: closed at every replica.
    Finally every claim ever written is tombstoned (the table holds only "api")."""
    settings = broker.settings()
    topics = breaker_topics(prefix)
    policy = BreakerPolicy(failure_threshold=1, reset_timeout=10, half_open_probes=2)
    clock = SharedClock()
    replicas = [CircuitBreaker("api", policy, settings=settings, topics=topics,
                               replica=f"r{i}", clock=clock) for i in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        for replica in replicas:
            await stack.enter_async_context(replica)
        with contextlib.suppress(BreakerOpen):  # the tripping call is held
            await replicas[0].call(down)
        await until(lambda: all(r.state == "open" for r in replicas), "all see the opening")

        clock.now += 10
        failing = ProbeRound(replicas, 3, fail=True)
        await failing.decided()
        assert len(failing.ran) == 2 and failing.refused == 7
        epoch = max(r.record.version for r in replicas)
        first = [c.updated_by for c in await claims_in_log_order(settings, topics, epoch)][:2]
        assert sorted(first) == sorted(failing.ran)
        await failing.release()
        await until(lambda: all(r.state == "open" and r.record.version > epoch
                                for r in replicas), "all see the failed probe reopen it")

        clock.now += 10
        closing = ProbeRound(replicas, 3, fail=False)
        await closing.decided()
        assert len(closing.ran) == 2 and closing.refused == 7
        late = CircuitBreaker("api", policy, settings=settings, topics=topics,
                              replica="late", clock=clock)
        async with late:
            assert late.state == "half_open"
            try:
                await late.call(ok)
                raise AssertionError("a replica started mid-epoch took a third probe")
            except BreakerOpen as exc:
                assert "probe(s) are taken" in str(exc)
        await closing.release()
        await until(lambda: all(r.state == "closed" for r in replicas),
                    "all see the successful probe close it")

    table: dict[str, bytes | None] = {}
    for record in sorted(await read_all(settings, [topics.state.name]), key=lambda r: r.offset):
        table[(record.key or b"").decode()] = record.value
    claims = [k for k in table if is_claim_key(k)]
    assert len(claims) >= 4  # the winners of both epochs at least
    assert {k for k, v in table.items() if v is not None} == {"api"}
