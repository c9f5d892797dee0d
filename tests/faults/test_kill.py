"""Agents as real processes, killed by pid mid-stream and restarted."""

from __future__ import annotations

from pathlib import Path

from mesh import Codec, apply_topics
from mesh.testing.checker import check
from tests.apps.stages import Item, build
from tests.conftest import BrokerUnderTest
from tests.support import AgentProcess, Progress, encode, history, inject, make_items


async def test_kill_9_of_the_middle_agent_at_20_50_80_percent_loses_nothing(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: with stage2 (a separate `mesh run` process) killed -9 at 20 %, 50 % and
    80 % of the stream and restarted each time, the checker finds nothing lost, no sink
    duplicates (the sink is idempotent by event id), per-key order kept; the survivors
    keep their pids; every process stops with exit code 0 on SIGTERM."""
    items = [i.model_copy(update={"sleep_ms": 2}) for i in make_items(keys=12, per_key=250)]
    await _kill_the_middle(broker, prefix, tmp_path, items, fractions=(0.2, 0.5, 0.8))


async def test_kill_9_with_many_inputs_in_flight_on_many_keys_keeps_order_and_loses_nothing(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: the same with slow handlers (40 ms, an LLM call's shape) and 48 handlers in
    flight per replica on 64 keys (`MESH_RUNTIME__CONCURRENCY=48`): killed -9 twice
    with dozens of inputs half done, nothing is lost, no sink duplicates, and each key's
    items arrive in order (offsets are committed only over finished inputs)."""
    items = [i.model_copy(update={"sleep_ms": 40}) for i in make_items(keys=64, per_key=25)]
    await _kill_the_middle(broker, prefix, tmp_path, items, fractions=(0.3, 0.6),
                           env={"MESH_RUNTIME__CONCURRENCY": "48"})


async def _kill_the_middle(broker: BrokerUnderTest, prefix: str, tmp_path: Path,
                           items: list[Item], *, fractions: tuple[float, ...],
                           env: dict[str, str] | None = None) -> None:
    app = build(prefix)
    settings = broker.settings()
    await apply_topics(settings.kafka, app.topics.values())
    source, sink = app.agents[0].consumes[0], app.agents[2].produces[0]
    codec = Codec()
    log = (tmp_path / "agents.log").open("wb")
    procs = {name: AgentProcess(broker, f"tests.apps.stages:{name}", prefix=prefix, log=log,
                                env=env)
             for name in ("stage1", "stage2", "stage3")}
    for proc in procs.values():
        proc.start()
    survivors = {procs["stage1"].pid, procs["stage3"].pid}
    killed = []
    try:
        async with Progress(settings, sink.name) as progress:
            await inject(settings, [encode(codec, source, i) for i in items])
            for fraction in fractions:
                await progress.reached(int(len(items) * fraction), timeout=180)
                killed.append(procs["stage2"].pid)
                procs["stage2"].kill9()
                procs["stage2"].start()
            await progress.reached(len(items), timeout=240)
        assert {procs["stage1"].pid, procs["stage3"].pid} == survivors
        assert all(p.alive() for p in procs.values())
    finally:
        codes = {name: p.terminate() for name, p in procs.items()}
        log.close()
    assert codes == {"stage1": 0, "stage2": 0, "stage3": 0}, (tmp_path / "agents.log").read_text()
    assert len(set(killed)) == len(fractions)
    report = check(await history(settings, codec, items, sink=sink))
    assert report.ok, report.summary()
