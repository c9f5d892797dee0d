"""A running agent's /metrics, scraped over HTTP after a known workload (``scrape`` and
``value`` are used by the fault tests too)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from mesh import Codec, Envelope, Topic, apply_topics
from mesh.kafka.base import OutRecord
from mesh.kafka.embedded import free_port
from tests.apps import fallback as app
from tests.apps.fallback import Ask
from tests.apps.stages import build
from tests.conftest import BrokerUnderTest
from tests.support import AgentProcess, encode, inject, make_items, wait_for_count


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def ask_record(codec: Codec, topic: Topic[Any], ask: Ask) -> OutRecord:
    """The record a client would produce for ``ask`` (event id = request id)."""
    env = Envelope(ask, ask.request_id, ask.request_id, source="test", key=topic.key_of(ask))
    data, fingerprint = codec.encode(topic, ask)
    return OutRecord(topic.name, data, env.key,
                     tuple(env.with_payload(ask, schema=fingerprint).headers()))


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


async def test_metrics_count_a_known_workload_and_lag_returns_to_zero(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: after 20 good items, 2 poison items and 1 undecodable record, the agent's
    /metrics says, in the audit's words, 20 ok, 4 retry (each poison item is tried 3
    times: a plain exception is retried) and 3 dead_letter; 6 ValueError and 1
    DecodeError failures, 3 dead letters, 20 events produced, 27 handler durations
    observed, bytes consumed, and
    consumer lag 0 on every partition once the work is done; no label holds an id."""
    stage1 = build(prefix).agents[0]
    source, sink = stage1.consumes[0], stage1.produces[0]
    settings = broker.settings()
    await apply_topics(settings.kafka, [source, sink])
    port = free_port()
    log = (tmp_path / "agent.log").open("wb")
    proc = AgentProcess(broker, "tests.apps.stages:stage1", prefix=prefix, log=log,
                        env={"MESH_METRICS__PORT": str(port)}).start()
    codec = Codec()
    items = make_items(keys=2, per_key=11, bad=[(0, 3), (1, 7)])
    try:
        garbage = OutRecord(source.name, b"\x17garbage", b"k0", (("mesh-event-id", b"g1"),))
        injected = [encode(codec, source, i) for i in items] + [garbage]
        await inject(settings, injected)
        outputs = await wait_for_count(settings, [sink.name], 20)
        await wait_for_count(settings, [source.dlq_name], 3)
        deadline = time.monotonic() + 60
        while True:  # the lag gauge follows the commits: wait for it to reach 0
            samples = scrape(port)
            lags = [v for (n, _), v in samples.items() if n == "mesh_consumer_lag_events"]
            if (lags and not any(lags) and value(samples, "mesh_handler_invocations_total") == 27):
                break
            assert time.monotonic() < deadline, f"lag {lags} not 0 after 60 s"
            await asyncio.sleep(0.2)  # poll interval of the scrape, bounded by the deadline
    finally:
        assert proc.terminate() == 0
        log.close()
    assert (tmp_path / "agent.log").read_text().count("metrics on http") == 1  # said once
    agent = {"agent": stage1.name}
    assert value(samples, "mesh_handler_invocations_total", outcome="ok", **agent) == 20
    assert value(samples, "mesh_handler_invocations_total", outcome="retry", **agent) == 4
    assert value(samples, "mesh_handler_invocations_total", outcome="dead_letter",
                 **agent) == 3
    assert value(samples, "mesh_handler_failures_total", error_class="ValueError") == 6
    assert value(samples, "mesh_handler_failures_total", error_class="DecodeError") == 1
    assert value(samples, "mesh_dead_letters_total", **agent) == 3
    assert value(samples, "mesh_produced_events_total", **agent) == 20
    assert value(samples, "mesh_handler_duration_seconds_count", topic=source.name) == 23
    assert value(samples, "mesh_handler_duration_seconds_count", **agent) == 27  # + tiers
    poison = [encode(codec, source, i) for i in items if i.text == "poison"]
    assert value(samples, "mesh_consumed_bytes_total", **agent) == sum(  # + 2 retries each
        len(r.value or b"") for r in injected) + 2 * sum(len(r.value or b"") for r in poison)
    assert value(samples, "mesh_produced_bytes_total", **agent) == sum(
        len(r.value or b"") for r in outputs)
    assert value(samples, "mesh_in_flight_events", **agent) == 0
    ids = {i.source_id for i in items}
    assert not any(v in ids for (_, ls) in samples for _, v in ls)


async def test_breaker_and_fallback_metrics_after_a_known_workload(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: the guarded agent (a real breaker, threshold 2, fallbacks secondary and
    tertiary, one partition) gets 2 asks its model fails (the breaker opens on the
    second), 3 good asks, 1 that level 1 fails too and 1 that every level fails. Its
    /metrics then says: breaker primary-model open (1) and not closed or half-open (0),
    one transition to open and none to half_open or closed, 5 calls rejected (the asks
    after the opening); 5 answers by level 1 (secondary), 1 by level 2 (tertiary), 1
    input exhausted; 6 successes and 1 failure; lag 0."""
    agent = app.build_guarded(prefix)
    source, replies, events = agent.consumes[0], *agent.produces
    settings = broker.settings()
    await apply_topics(settings.kafka, [source, replies, events])
    asks = ([Ask(request_id=f"m{i}", fail=[0]) for i in range(2)]
            + [Ask(request_id=f"g{i}") for i in range(3)]
            + [Ask(request_id="d0", fail=[0, 1]), Ask(request_id="x0", fail=[0, 1, 2])])
    codec = Codec()
    port = free_port()
    log = (tmp_path / "agent.log").open("wb")
    proc = AgentProcess(broker, "tests.apps.fallback:guarded", prefix=prefix, log=log,
                        env={"MESH_METRICS__PORT": str(port)}).start()
    try:
        await inject(settings, [ask_record(codec, source, a) for a in asks])
        await wait_for_count(settings, [replies.name], 6)
        await wait_for_count(settings, [source.dlq_name], 1)
        deadline = time.monotonic() + 60
        while True:  # the counters follow the handler; the lag gauge follows the commits
            samples = scrape(port)
            lags = [v for (n, _), v in samples.items() if n == "mesh_consumer_lag_events"]
            if lags and not any(lags) and value(samples, "mesh_handler_invocations_total") == 7:
                break
            assert time.monotonic() < deadline, f"lag {lags} not 0 after 60 s"
            await asyncio.sleep(0.2)  # poll interval of the scrape, bounded by the deadline
    finally:
        assert proc.terminate() == 0, (tmp_path / "agent.log").read_text()
        log.close()
    breaker = {"breaker": "primary-model"}
    assert [value(samples, "mesh_breaker_state", state=s, **breaker)
            for s in ("closed", "half_open", "open")] == [0, 0, 1]
    assert [value(samples, "mesh_breaker_transitions_total", to=s, **breaker)
            for s in ("closed", "half_open", "open")] == [0, 0, 1]
    assert value(samples, "mesh_breaker_rejections_total", **breaker) == 5
    named = {"agent": agent.name}
    assert value(samples, "mesh_fallbacks_total", level="1", handler="secondary", **named) == 5
    assert value(samples, "mesh_fallbacks_total", level="2", handler="tertiary", **named) == 1
    assert value(samples, "mesh_fallbacks_total", **named) == 6
    assert value(samples, "mesh_fallbacks_exhausted_total", **named) == 1
    assert value(samples, "mesh_handler_invocations_total", outcome="ok", **named) == 6
    assert value(samples, "mesh_handler_invocations_total", outcome="dead_letter", **named) == 1
    assert value(samples, "mesh_holds_total", **named) == 0  # BreakerOpen went to level 1
