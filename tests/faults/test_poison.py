"""A poison message among good ones, against a real `mesh run` process."""

from __future__ import annotations

from pathlib import Path

from mesh import Codec, apply_topics
from mesh.runtime.dead_letter import DLQ_ATTEMPTS, DLQ_ERROR_CLASS
from mesh.runtime.retry import LAST_FAILURE, RETRY_DUE
from mesh.testing.checker import check
from tests.apps.retry import build
from tests.conftest import BrokerUnderTest
from tests.support import (
    AgentProcess,
    encode,
    event_id,
    history,
    inject,
    make_items,
    read_all,
    wait_for_count,
)


async def test_poison_message_takes_3_attempts_through_retry_topics_then_the_dlq(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: an item whose handler always raises (a retriable TimeoutError) is tried 3
    times, through `in.retry.1` and `in.retry.2` with growing delays, then lands in
    `in.dlq` with attempts=3; the other items, of its key and of others, reach the sink
    once each while it is being retried (the partition is not blocked); the dead-letter
    topic holds exactly the poison item; the agent keeps its pid and stops with 0."""
    agent = build(prefix)
    source, sink = agent.consumes[0], agent.produces[0]
    settings = broker.settings()
    await apply_topics(settings.kafka, agent.all_topics)
    codec = Codec()
    items = make_items(keys=4, per_key=10)
    poison = items[3]
    items[3] = poison = poison.model_copy(update={"text": "down"})
    log = (tmp_path / "agent.log").open("wb")
    proc = AgentProcess(broker, "tests.apps.retry:agent", prefix=prefix, log=log,
                        env={"MESH_TEST_RETRY_BASE_MS": "1500"}).start()
    try:
        first_pid = proc.pid
        await inject(settings, [encode(codec, source, i) for i in items])
        outputs = await wait_for_count(settings, [sink.name], len(items) - 1)
        # every good item was out before the poison's first retry was due (1.5 s)
        [first_retry] = [r for r in await read_all(settings, [agent.retry_topics[0].name])
                         if event_id(r) == poison.source_id]
        assert max(r.timestamp_ms for r in outputs) < int(dict(first_retry.headers)[RETRY_DUE])
        [dead] = await wait_for_count(settings, [source.dlq_name], 1)
        assert proc.alive() and proc.pid == first_pid
    finally:
        code = proc.terminate()
        log.close()
    assert code == 0, (tmp_path / "agent.log").read_text()[-3000:]
    headers = {k: v.decode() for k, v in dead.headers}
    assert headers["mesh-event-id"] == poison.source_id
    assert (headers[DLQ_ATTEMPTS], headers[DLQ_ERROR_CLASS]) == ("3", "TimeoutError")
    [second_retry] = [r for r in await read_all(settings, [agent.retry_topics[1].name])
                      if event_id(r) == poison.source_id]
    # exponential: 1.5 s, then 3 s, each after the failure that scheduled it (the
    # record's own timestamp can trail that failure under load)
    waits = [int(dict(r.headers)[RETRY_DUE]) - int(dict(r.headers)[LAST_FAILURE])
             for r in (first_retry, second_retry)]
    assert waits == [1500, 3000]
    report = check(await history(settings, codec, items, sink=sink, dlq=[source],
                                 bad_ids={poison.source_id}))
    assert not (report.lost or report.sink_duplicates or report.unexpected_dead_letters
                or report.missing_dead_letters or report.applied_bad), report.summary()
