"""kill -9 of the retry consumer while retries are pending."""

from __future__ import annotations

from pathlib import Path

from mesh import Codec, apply_topics
from mesh.testing.checker import check
from mesh.runtime.retry import RETRY_DUE
from tests.apps.retry import build
from tests.conftest import BrokerUnderTest
from tests.support import (
    AgentProcess,
    Progress,
    encode,
    event_id,
    history,
    inject,
    make_items,
    read_all,
    wait_for_count,
)


async def test_kill_9_with_retries_pending_loses_none_and_redelivers_none_early(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: every item fails once and is scheduled on `in.retry.1` 4 s ahead; the agent
    process is killed -9 once all retries are pending, and restarted: every item is
    handled exactly once (checker ok, no sink duplicates), none before its due time,
    and none is dead-lettered."""
    agent = build(prefix)
    source, sink = agent.consumes[0], agent.produces[0]
    settings = broker.settings()
    await apply_topics(settings.kafka, agent.all_topics)
    codec = Codec()
    items = [i.model_copy(update={"text": "flaky"}) for i in make_items(keys=4, per_key=5)]
    log = (tmp_path / "agent.log").open("wb")
    proc = AgentProcess(broker, "tests.apps.retry:agent", prefix=prefix, log=log,
                        env={"MESH_TEST_RETRY_BASE_MS": "4000"}).start()
    try:
        async with Progress(settings, agent.retry_topics[0].name) as pending:
            await inject(settings, [encode(codec, source, i) for i in items])
            await pending.reached(len(items), timeout=120)
        first_pid = proc.pid
        proc.kill9()
        proc.start()
        outputs = await wait_for_count(settings, [sink.name], len(items), timeout=180)
        assert proc.alive() and proc.pid != first_pid
    finally:
        code = proc.terminate()
        log.close()
    assert code == 0, (tmp_path / "agent.log").read_text()[-3000:]
    # An input re-read after the kill (its offset was not committed yet) is scheduled
    # again: an item may have several retry records; none may run before the first due.
    due: dict[str, int] = {}
    for r in await read_all(settings, [agent.retry_topics[0].name]):
        due[event_id(r)] = min(due.get(event_id(r), 2**63), int(dict(r.headers)[RETRY_DUE]))
    for record in outputs:
        item = await codec.decode(sink, record.value or b"")
        produced = int(dict(record.headers)["mesh-produced-at"])
        assert produced >= due[item.source_id], "handled before its retry was due"  # type: ignore[attr-defined]
        assert item.hops == ["attempt=2"]  # type: ignore[attr-defined]
    assert await read_all(settings, [source.dlq_name]) == []
    report = check(await history(settings, codec, items, sink=sink))
    assert not (report.lost or report.sink_duplicates), report.summary()
