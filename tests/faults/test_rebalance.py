"""Replicas added and removed mid-stream: Kafka moves partitions, the mesh commits on
revoke, nothing is lost."""

from __future__ import annotations

from pathlib import Path

from mesh import Codec, apply_topics
from mesh.testing.checker import check
from tests.apps.stages import build
from tests.conftest import BrokerUnderTest
from tests.support import AgentProcess, Progress, encode, history, inject, make_items


async def test_replicas_joining_and_leaving_mid_stream_lose_nothing(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: stage2 starts as one replica; a second and a third join at 20 % and 40 %
    of the stream, the first leaves (SIGTERM) at 60 % and the second is killed -9 at
    80 %; the checker finds nothing lost, no sink duplicates and per-key order kept;
    every replica that was stopped with SIGTERM exited 0 (no CommitFailedError or other
    error escaped a rebalance)."""
    app = build(prefix, partitions=6)
    settings = broker.settings()
    await apply_topics(settings.kafka, app.topics.values())
    source, sink = app.agents[0].consumes[0], app.agents[2].produces[0]
    items = [i.model_copy(update={"sleep_ms": 2}) for i in make_items(keys=24, per_key=125)]
    codec = Codec()
    log = (tmp_path / "agents.log").open("wb")

    def replica(name: str) -> AgentProcess:
        return AgentProcess(broker, f"tests.apps.stages:{name}", prefix=prefix, log=log,
                            env={"MESH_TEST_PARTITIONS": "6"})  # as the topics declare

    fixed = [replica("stage1").start(), replica("stage3").start()]
    stage2 = [replica("stage2").start()]
    codes: list[int] = []
    try:
        async with Progress(settings, sink.name) as progress:
            await inject(settings, [encode(codec, source, i) for i in items])
            await progress.reached(len(items) // 5, timeout=180)
            stage2.append(replica("stage2").start())
            await progress.reached(len(items) * 2 // 5, timeout=180)
            stage2.append(replica("stage2").start())
            await progress.reached(len(items) * 3 // 5, timeout=180)
            codes.append(stage2[0].terminate())
            await progress.reached(len(items) * 4 // 5, timeout=180)
            stage2[1].kill9()
            await progress.reached(len(items), timeout=240)
        assert stage2[2].alive() and all(p.alive() for p in fixed)
    finally:
        codes += [p.terminate() for p in (*fixed, stage2[2])]
        for proc in stage2[:2]:
            if proc.alive():
                proc.terminate()
        log.close()
    assert codes == [0, 0, 0, 0], (tmp_path / "agents.log").read_text()[-3000:]
    report = check(await history(settings, codec, items, sink=sink))
    assert report.ok, report.summary()
