"""Fallback agents on the broker: the first level that answers wins, the result says
which one; all failing gives one failure event listing every error and a dead letter."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from mesh import Codec, Envelope, Mesh, Topic, apply_topics
from mesh.kafka.base import OutRecord
from mesh.runtime.dead_letter import DLQ_ERROR, DLQ_ERROR_CLASS
from tests.apps import fallback as app
from tests.apps.fallback import Ask
from tests.conftest import BrokerUnderTest
from tests.support import inject, read_all, wait_for_count

pytestmark = pytest.mark.broker_agnostic


def _record(codec: Codec, topic: Topic[Any], ask: Ask) -> OutRecord:
    env = Envelope(ask, ask.request_id, ask.request_id, source="test",
                   key=topic.key_of(ask))
    value, fingerprint = codec.encode(topic, ask)
    return OutRecord(topic.name, value, env.key,
                     tuple(env.with_payload(ask, schema=fingerprint).headers()))


async def _decoded(settings: Any, codec: Codec, topic: Topic[Any]) -> list[BaseModel]:
    records = await read_all(settings, [topic.name])
    return [await codec.decode(topic, r.value or b"") for r in records]


async def _run(broker: BrokerUnderTest, prefix: str, asks: list[Ask], *, replies: int,
               events: int, dead: int = 0) -> tuple[list[Any], list[Any], list[Any]]:
    """Run the wrapped agent on ``asks``; wait for the counts; return (replies, events,
    dead-letter records)."""
    agent = app.build(prefix)
    source, reply_topic, event_topic = agent.consumes[0], *agent.produces
    settings = broker.settings()
    await apply_topics(settings.kafka, [source, reply_topic, event_topic])
    codec = Codec()
    async with Mesh(settings, [agent]) as mesh:
        await mesh.wait_assigned()
        await inject(settings, [_record(codec, source, a) for a in asks])
        if replies:
            await wait_for_count(settings, [reply_topic.name], replies, timeout=60)
        if events:
            await wait_for_count(settings, [event_topic.name], events, timeout=60)
        if dead:
            await wait_for_count(settings, [source.dlq_name], dead, timeout=60)
        assert mesh.runners[0].holds == 0  # BreakerOpen never escaped to the runtime
    return (await _decoded(settings, codec, reply_topic),
            await _decoded(settings, codec, event_topic),
            await read_all(settings, [source.dlq_name]))


async def test_primary_fails_then_level_1_answers(broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: asks the primary fails (retriable, twice) are answered by level 1 with
    fallback_level=1 and a fallback_used event naming the primary's error; the others
    by the primary with fallback_level=0 and no event; nothing dead-lettered."""
    asks = [Ask(request_id=f"r{i}", question=f"q{i}", fail=[0] if i % 2 else [])
            for i in range(6)]
    replies, events, dead = await _run(broker, prefix, asks, replies=6, events=3)
    by_id = {r.result.request_id: r for r in replies}
    assert len(replies) == 6 and set(by_id) == {a.request_id for a in asks}
    for ask in asks:
        reply = by_id[ask.request_id]
        level = 1 if ask.fail else 0
        assert (reply.fallback_level, reply.used_fallback, reply.success) == \
            (level, level > 0, True)
        assert reply.result.by == ("secondary" if level else "primary")
        assert reply.handler == ("secondary" if level else f"{prefix}-answer")
    assert sorted(e.event_id for e in events) == ["r1", "r3", "r5"]
    for event in events:
        assert (event.kind, event.fallback_level, event.handler) == \
            ("fallback_used", 1, "secondary")
        [failure] = event.attempts
        assert (failure.level, failure.error_class, failure.tries) == (0, "TimeoutError", 2)
        assert event.event_id in failure.error and event.correlation_id == event.event_id
    assert dead == []


async def test_primary_and_level_1_fail_then_level_2_answers(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: level 2 answers (fallback_level=2, by tertiary); the event lists the
    primary's and level 1's errors in order."""
    asks = [Ask(request_id=f"r{i}", fail=[0, 1]) for i in range(3)]
    replies, events, dead = await _run(broker, prefix, asks, replies=3, events=3)
    assert sorted((r.result.request_id, r.fallback_level, r.result.by) for r in replies) == \
        [(f"r{i}", 2, "tertiary") for i in range(3)]
    for event in events:
        assert event.fallback_level == 2 and event.handler == "tertiary"
        assert [(a.level, a.error_class) for a in event.attempts] == \
            [(0, "TimeoutError"), (1, "ValueError")]
    assert dead == []


async def test_all_levels_fail_one_failure_event_and_a_dead_letter(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: no reply; exactly one fallback_failed event per input listing level 0, 1
    and 2 with handler, class and message; each input once in the dead-letter topic
    with error class FallbacksExhausted naming every level; a good ask still answers."""
    asks = [Ask(request_id=f"bad{i}", fail=[0, 1, 2]) for i in range(2)]
    asks.append(Ask(request_id="good", question="fine"))
    replies, events, dead = await _run(broker, prefix, asks, replies=1, events=2, dead=2)
    assert [(r.result.request_id, r.fallback_level) for r in replies] == [("good", 0)]
    assert sorted(e.event_id for e in events) == ["bad0", "bad1"]
    for event in events:
        assert event.kind == "fallback_failed" and event.fallback_level is None
        assert [(a.level, a.handler, a.error_class) for a in event.attempts] == [
            (0, f"{prefix}-answer", "TimeoutError"), (1, "secondary", "ValueError"),
            (2, "tertiary", "ValueError")]
        assert all(event.event_id in a.error for a in event.attempts)
    assert sorted(dict(r.headers)["mesh-event-id"].decode() for r in dead) == ["bad0", "bad1"]
    for record in dead:
        headers = {k: v.decode() for k, v in record.headers}
        assert headers[DLQ_ERROR_CLASS] == "FallbacksExhausted"
        assert all(f"level {n}" in headers[DLQ_ERROR] for n in range(3))
        assert headers["mesh-dlq-attempts"] == "1"  # not retriable: no runtime retries


async def test_breaker_open_goes_to_fallback_at_once_and_back_when_closed(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: while the primary's breaker is open its asks are answered by level 1 (the
    primary called once per ask: no retries, no hold); once it closes, the next asks on
    the same running agent are answered by the primary again, with no event."""
    agent = app.build(prefix)
    source, reply_topic, event_topic = agent.consumes[0], *agent.produces
    settings = broker.settings()
    await apply_topics(settings.kafka, [source, reply_topic, event_topic])
    codec = Codec()
    app.BREAKER_OPEN["open"] = True
    app.CALLS.clear()
    try:
        async with Mesh(settings, [agent]) as mesh:
            await mesh.wait_assigned()
            await inject(settings, [_record(codec, source, Ask(request_id=f"r{i}", breaker=True))
                                    for i in range(4)])
            await wait_for_count(settings, [reply_topic.name], 4, timeout=60)
            assert app.CALLS["primary"] == 4  # BreakerOpen is not retried in place
            app.BREAKER_OPEN["open"] = False  # the breaker closed
            await inject(settings, [_record(codec, source, Ask(request_id=f"c{i}", breaker=True))
                                    for i in range(2)])
            await wait_for_count(settings, [reply_topic.name], 6, timeout=60)
            assert mesh.runners[0].holds == 0 and mesh.runners[0].dead_lettered == 0
    finally:
        app.BREAKER_OPEN["open"] = False
    replies = await _decoded(settings, codec, reply_topic)
    levels = {r.result.request_id: (r.fallback_level, r.result.by) for r in replies}
    assert levels == {**{f"r{i}": (1, "secondary") for i in range(4)},
                      **{f"c{i}": (0, "primary") for i in range(2)}}
    events = await _decoded(settings, codec, event_topic)
    assert sorted(e.event_id for e in events) == [f"r{i}" for i in range(4)]
    assert all([(a.error_class, a.tries) for a in e.attempts] == [("BreakerOpen", 1)]
               for e in events)
