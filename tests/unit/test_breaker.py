"""The breaker's state machine with a fake clock, no broker."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from mesh.errors import BreakerOpen, ConfigError, HandlerError
from mesh.resilience.breaker import BreakerPolicy, BreakerRecord, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def ok() -> str:
    return "ok"


async def down() -> str:
    raise ConnectionError("503 from downstream")


async def flaky() -> str:
    raise ValueError("an untyped failure of a downstream")


async def bug() -> str:
    raise HandlerError("the request itself is wrong, not an outage", retriable=False)


def make(clock: Clock, **policy: object) -> CircuitBreaker:
    return CircuitBreaker("api", BreakerPolicy(**policy), replica="r1",  # type: ignore[arg-type]
                          clock=clock)


async def fail(breaker: CircuitBreaker, times: int, fn=down) -> None:  # type: ignore[no-untyped-def]
    for _ in range(times):
        with pytest.raises((ConnectionError, ValueError, HandlerError, BreakerOpen)):
            await breaker.call(fn)


async def test_opens_after_consecutive_failures_and_rejects_until_reset_timeout() -> None:
    clock = Clock()
    breaker = make(clock, failure_threshold=3, reset_timeout=10)
    await fail(breaker, 2)
    assert await breaker.call(ok) == "ok"  # a success resets the count
    await fail(breaker, 2)
    assert breaker.state == "closed"
    await fail(breaker, 1)
    assert breaker.state == "open" and breaker.transitions["opened"] == 1
    with pytest.raises(BreakerOpen) as raised:
        await breaker.call(ok)
    assert raised.value.until == 1010.0 and "'api'" in str(raised.value)
    assert breaker.rejected == 1


async def test_half_open_probe_success_closes_and_failure_reopens() -> None:
    clock = Clock()
    breaker = make(clock, failure_threshold=1, reset_timeout=10)
    await fail(breaker, 1)
    clock.now += 10
    await fail(breaker, 1)  # the probe fails: open again, from now
    assert breaker.state == "open" and breaker.record.opened_at == 1010.0
    assert breaker.transitions == {"opened": 2, "half_open": 1}
    clock.now += 10
    assert await breaker.call(ok) == "ok"
    assert breaker.state == "closed" and breaker.transitions["closed"] == 1
    assert breaker.record.version == 5


async def test_probes_beyond_the_budget_are_held() -> None:
    clock = Clock()
    breaker = make(clock, failure_threshold=1, reset_timeout=10, half_open_probes=2)
    await fail(breaker, 1)
    clock.now += 11
    async with breaker.guard(), breaker.guard():  # two probes in flight
        assert breaker.state == "half_open"
        with pytest.raises(BreakerOpen) as raised:
            async with breaker.guard():
                pytest.fail("a third call got through while both probes were in flight")
        assert raised.value.until > clock.now
    assert breaker.state == "closed"


async def test_failure_rate_over_the_window_opens() -> None:
    clock = Clock()
    breaker = make(clock, failure_threshold=100, failure_rate=0.5, window=4, min_calls=4)
    await fail(breaker, 2)
    assert await breaker.call(ok) == "ok"
    assert breaker.state == "closed"  # 2 of 3 failed, but fewer than min_calls calls
    assert await breaker.call(ok) == "ok"  # 2 of 4 = the rate: it opens
    assert breaker.state == "open" and "2 of the last 4" in breaker.record.reason


async def test_the_tripping_failure_is_held_chained_to_its_cause() -> None:
    clock = Clock()
    breaker = make(clock, failure_threshold=2, reset_timeout=5)
    with pytest.raises(ConnectionError):
        await breaker.call(down)
    with pytest.raises(BreakerOpen) as raised:
        await breaker.call(down)
    assert isinstance(raised.value.__cause__, ConnectionError)
    assert raised.value.until == 1005.0
    plain = CircuitBreaker("api", BreakerPolicy(failure_threshold=1), hold_on_trip=False,
                           clock=clock)
    with pytest.raises(ConnectionError):
        await plain.call(down)
    assert plain.state == "open"


async def test_non_retriable_errors_do_not_count_unless_configured() -> None:
    clock = Clock()
    breaker = make(clock, failure_threshold=2)
    await fail(breaker, 3, bug)
    assert breaker.state == "closed"
    untyped = make(clock, failure_threshold=2)  # counted by the retry rule: any exception
    await fail(untyped, 2, flaky)
    assert untyped.state == "open"
    strict = make(clock, failure_threshold=2, is_failure=lambda exc: True)
    await fail(strict, 2, bug)
    assert strict.state == "open"


def test_stale_writes_are_ignored_and_opening_wins_a_tie() -> None:
    breaker = make(Clock())
    assert breaker.observe(BreakerRecord(name="api", state="open", version=3, opened_at=5))
    assert not breaker.observe(BreakerRecord(name="api", state="closed", version=2))
    assert not breaker.observe(BreakerRecord(name="api", state="closed", version=3))
    assert not breaker.observe(BreakerRecord(name="other", state="closed", version=9))
    assert breaker.state == "open"
    assert breaker.observe(BreakerRecord(name="api", state="closed", version=4))
    assert breaker.observe(BreakerRecord(name="api", state="open", version=4, opened_at=9))
    assert breaker.state == "open" and breaker.transitions == {"opened": 2, "closed": 1}


def test_policy_rejects_impossible_settings() -> None:
    with pytest.raises(ConfigError, match="failure_threshold=0"):
        BreakerPolicy(failure_threshold=0)
    with pytest.raises(ConfigError, match="failure_rate=2"):
        BreakerPolicy(failure_rate=2)



async def test_a_lost_probe_gives_way_to_a_new_half_open_period_after_probe_timeout() -> None:
    clock = Clock()
    breaker = make(clock, failure_threshold=1, reset_timeout=10, probe_timeout=30)
    await fail(breaker, 1)
    clock.now += 10
    entered = asyncio.Event()

    async def cancelled_probe() -> None:
        async with breaker.guard():
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(cancelled_probe())
    await entered.wait()
    task.cancel()  # the probe's caller went away: it never reports an outcome
    with contextlib.suppress(asyncio.CancelledError):
        await task
    epoch = breaker.record.version
    clock.now += 29
    with pytest.raises(BreakerOpen, match="probe"):
        await breaker.call(ok)
    clock.now += 1
    assert await breaker.call(ok) == "ok"  # a new half-open period, a fresh probe
    assert breaker.state == "closed" and breaker.record.version == epoch + 2
    assert breaker.transitions == {"opened": 1, "half_open": 2, "closed": 1}


def test_names_with_a_slash_are_refused_they_would_collide_with_probe_claims() -> None:
    with pytest.raises(ConfigError, match="'llm/probe'"):
        CircuitBreaker("llm/probe")
    with pytest.raises(ConfigError, match="probe_timeout=0"):
        BreakerPolicy(probe_timeout=0)
