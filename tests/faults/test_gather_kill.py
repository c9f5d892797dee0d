"""The gather as a real process, killed -9 with requests half collected and mid-merge."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from mesh import Codec, apply_topics
from mesh.config import MeshSettings
from mesh.patterns.gather import GatherState, GatherTopics, Merged
from mesh.state import CompactedTable
from tests.apps.gather import Ask, GatherWatch, request_record, topics_for
from tests.conftest import BrokerUnderTest
from tests.support import AgentProcess, inject, read_all

REQUESTS = 100


async def test_kill_9_of_the_gather_with_100_requests_half_collected_completes_each_once(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: the gather (a `mesh run` process) is killed -9 while alpha's parts are
    coming in (about half collected), restarted, then beta is started and the gather is
    killed -9 again mid-merge and restarted. Every one of the 100 requests ends with
    exactly one merged event (one event id per correlation id; an idempotent sink
    applies each once), carrying both parts, none timed out or failed; every state row
    is a done marker. Every process stops with exit code 0 on SIGTERM."""
    topics = topics_for(prefix)
    settings = broker.settings()
    await apply_topics(settings.kafka, topics.all())
    codec = Codec()
    log = (tmp_path / "agents.log").open("wb")
    slow = {"MESH_TEST_BRANCH_DELAY_MS": "40"}
    procs = {name: AgentProcess(broker, f"tests.apps.gather:{name}", prefix=prefix, log=log,
                                env=slow) for name in ("gather", "alpha", "beta")}
    asks = [Ask(request_id=f"r{n:03d}", question=f"question {n}") for n in range(REQUESTS)]
    cids = {a.request_id for a in asks}
    killed = []
    try:
        async with GatherWatch(settings, topics) as watch:
            def collected(agent: str) -> int:
                return sum(any(e.kind == "part_received" and e.agent == agent
                               for e in watch.events[("gather", c)].values()) for c in cids)

            def merged() -> int:
                return sum(bool(watch.merged.get(("gather", c))) for c in cids)

            procs["gather"].start()
            procs["alpha"].start()
            await inject(settings, [request_record(codec, topics, a) for a in asks])
            await watch.until(lambda: collected("alpha") >= REQUESTS // 2,
                              "half of alpha's parts collected", timeout=180)
            killed.append(procs["gather"].pid)
            procs["gather"].kill9()
            assert merged() == 0
            procs["gather"].start()
            await watch.until(lambda: collected("alpha") == REQUESTS,
                              "all of alpha's parts collected", timeout=180)
            assert merged() == 0
            procs["beta"].start()
            await watch.until(lambda: merged() >= REQUESTS // 4, "a quarter merged", 180)
            killed.append(procs["gather"].pid)
            procs["gather"].kill9()
            procs["gather"].start()
            await watch.until(lambda: merged() == REQUESTS, "every request merged", 240)
        assert all(p.alive() for p in procs.values())
    finally:
        codes = {name: p.terminate() for name, p in procs.items() if p.process is not None}
        log.close()
    assert codes == {"gather": 0, "alpha": 0, "beta": 0}, (tmp_path / "agents.log").read_text()
    assert len(set(killed)) == 2
    ids: dict[str, set[str]] = defaultdict(set)
    sink: dict[str, Merged] = {}  # idempotent by event id
    for record in await read_all(settings, [topics.merged.name]):
        event_id = dict(record.headers)["mesh-event-id"].decode()
        payload = await codec.decode(topics.merged, record.value or b"")
        assert isinstance(payload, Merged)
        ids[payload.correlation_id].add(event_id)
        sink.setdefault(event_id, payload)
    assert set(ids) == cids, f"missing: {sorted(cids - set(ids))}"
    twice = {c: n for c, n in ids.items() if len(n) > 1}
    assert not twice, f"requests merged more than once: {twice}"
    assert len(sink) == REQUESTS
    for merged_event in sink.values():
        assert merged_event.success and merged_event.outcome == "completed"
        assert sorted(merged_event.successes) == ["alpha", "beta"]
        assert not merged_event.failures and not merged_event.timed_out
        question = f"question {int(merged_event.correlation_id[1:])}"
        assert sorted(r["answer"] for r in merged_event.merged_output) == [
            f"alpha on {question}", f"beta on {question}"]
    table = CompactedTable(topics.state, settings.kafka, codec)
    await table.restore()
    statuses = {c: row.status for c, row in table.items()}
    if statuses != dict.fromkeys(cids, "done"):  # every version of the rows that differ
        wrong = {c for c in cids if statuses.get(c) != "done"}
        raise AssertionError(f"rows not done: {sorted(wrong)}\n" + "\n".join(
            await _row_history(settings, codec, topics, wrong)) + "\n"
            + (tmp_path / "agents.log").read_text()[-6000:])


async def _row_history(settings: MeshSettings, codec: Codec, topics: GatherTopics,
                       cids: set[str]) -> list[str]:
    """Each state record of ``cids`` in log order (what a compaction kept of them)."""
    lines = []
    for record in await read_all(settings, [topics.state.name]):
        cid = (record.key or b"").decode()
        if cid not in cids:
            continue
        row = await codec.decode(topics.state, record.value) if record.value else None
        assert row is None or isinstance(row, GatherState)
        lines.append(f"{cid} {record.partition}@{record.offset} t={record.timestamp_ms} " + (
            "tombstone" if row is None else
            f"{row.status} requested={row.requested} received="
            f"{[p.agent for p in row.received]} answered={row.answered} "
            f"applied={len(row.applied)} by={row.completed_by}"))
    return lines
