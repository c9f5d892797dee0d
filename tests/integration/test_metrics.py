"""A running agent's /metrics, scraped over HTTP after a known workload."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from mesh import Codec, apply_topics
from mesh.embedded import free_port
from mesh.transport import OutRecord
from tests.apps.chain import build
from tests.conftest import BrokerUnderTest
from tests.support import AgentProcess, encode, inject, make_items, wait_for_count


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


async def test_metrics_count_a_known_workload_and_lag_returns_to_zero(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: after 20 good items, 2 poison items and 1 undecodable record, the agent's
    /metrics says 20 successes and 3 failures (2 ValueError, 1 DecodeError), 3 dead
    letters, 20 events produced, 23 handler durations observed, bytes consumed, and
    consumer lag 0 on every partition once the work is done; no label holds an id."""
    stage1 = build(prefix).agents[0]
    source, sink = stage1.consumes[0], stage1.produces[0]
    settings = broker.settings()
    await apply_topics(settings.kafka, [source, sink])
    port = free_port()
    log = (tmp_path / "agent.log").open("wb")
    proc = AgentProcess(broker, "tests.apps.chain:stage1", prefix=prefix, log=log,
                        env={"MESH_METRICS__PORT": str(port)}).start()
    codec = Codec()
    items = make_items(keys=2, per_key=11, bad=[(0, 3), (1, 7)])
    try:
        garbage = OutRecord(source.name, b"\x17garbage", b"k0", (("mesh-event-id", b"g1"),))
        await inject(settings, [encode(codec, source, i) for i in items] + [garbage])
        await wait_for_count(settings, [sink.name], 20)
        await wait_for_count(settings, [source.dlq_name], 3)
        deadline = time.monotonic() + 60
        while True:  # the lag gauge follows the commits: wait for it to reach 0
            samples = scrape(port)
            lags = [v for (n, _), v in samples.items() if n == "mesh_consumer_lag_events"]
            if (lags and not any(lags) and value(samples, "mesh_handler_invocations_total") == 23):
                break
            assert time.monotonic() < deadline, f"lag {lags} not 0 after 60 s"
            await asyncio.sleep(0.2)  # poll interval of the scrape, bounded by the deadline
    finally:
        assert proc.terminate() == 0
        log.close()
    agent = {"agent": stage1.name}
    assert value(samples, "mesh_handler_invocations_total", outcome="success", **agent) == 20
    assert value(samples, "mesh_handler_invocations_total", outcome="failure", **agent) == 3
    assert value(samples, "mesh_handler_failures_total", error_class="ValueError") == 2
    assert value(samples, "mesh_handler_failures_total", error_class="DecodeError") == 1
    assert value(samples, "mesh_dead_letters_total", **agent) == 3
    assert value(samples, "mesh_produced_events_total", **agent) == 20
    assert value(samples, "mesh_handler_duration_seconds_count", topic=source.name) == 23
    assert value(samples, "mesh_consumed_bytes_total", **agent) > 0
    assert value(samples, "mesh_in_flight_events", **agent) == 0
    ids = {i.source_id for i in items}
    assert not any(v in ids for (_, ls) in samples for _, v in ls)
