"""The checkpointed pipeline (mesh.patterns.pipeline) on a real broker: a checkpoint
after every stage, a failure checkpoint, the history view, and retention tombstones."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from mesh import Codec, Envelope, Mesh, MeshSettings, apply_topics
from mesh.kafka.base import OutRecord
from mesh.patterns.pipeline import Checkpoint, Pipeline, StageEvent, WorkflowResult
from mesh.state import CompactedTable
from mesh.topic import Topic
from mesh.views.workflows import checkpoint_topics, format_history, workflow_history
from tests.apps.pipeline import STAGES, Doc, build
from tests.conftest import ROOT, BrokerUnderTest
from tests.support import inject, read_all, wait_for_count


def encode(codec: Codec, topic: Topic[Any], doc: Doc) -> OutRecord:
    env = Envelope.new(doc, source="test", correlation_id=f"corr-{doc.doc_id}",
                       key=topic.key_of(doc))
    value, fingerprint = codec.encode(topic, doc)
    return OutRecord(topic.name, value, env.key,
                     tuple(env.with_payload(doc, schema=fingerprint).headers()))


async def decode_all(settings: MeshSettings, codec: Codec, topic: Topic[Any]) -> list[Any]:
    records = sorted(await read_all(settings, [topic.name]), key=lambda r: (r.partition, r.offset))
    return [await codec.decode(topic, r.value) for r in records if r.value is not None]


async def run_docs(settings: MeshSettings, pipe: Pipeline,
                   docs: list[Doc]) -> list[WorkflowResult]:
    codec = Codec()
    async with Mesh(settings, [pipe.agent]) as mesh:
        await mesh.wait_assigned()
        await inject(settings, [encode(codec, pipe.topics.source, d) for d in docs])
        records = await wait_for_count(settings, [pipe.topics.results.name], len(docs))
    return [await codec.decode(pipe.topics.results, r.value or b"") for r in records]


async def test_every_stage_writes_a_checkpoint_and_the_history_shows_each_version(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: each workflow completes with all four results (each stage saw the earlier
    ones); its checkpoint history holds versions 1-4 in order, one stage more each,
    ending completed; the events topic has started and finished for every stage and one
    completed; the plain-text rendering shows each version and result."""
    pipe = build(prefix)
    settings = broker.settings()
    await apply_topics(settings.kafka, pipe.topics.all())
    docs = [Doc(doc_id=f"doc-{n}", text=f"words of doc {n}") for n in range(6)]
    results = await run_docs(settings, pipe, docs)
    assert {r.workflow_id for r in results} == {d.doc_id for d in docs}
    for result in results:
        assert result.status == "completed"
        assert result.results["index"]["stages"] == list(STAGES)
        assert result.correlation_id == f"corr-{result.workflow_id}"

    assert checkpoint_topics(pipe.topics.all()) == [pipe.topics.checkpoints]
    history = await workflow_history(settings.kafka, "doc-3", [pipe.topics.checkpoints])
    assert history.found and not history.deleted
    versions = [v for v in history.versions if v is not None]
    assert [v.version for v in versions] == [1, 2, 3, 4]
    assert [v.completed_stages for v in versions] == [list(STAGES[:n]) for n in range(1, 5)]
    assert [v.status for v in versions] == ["running"] * 3 + ["completed"]
    assert [v.next_stage for v in versions] == [1, 2, 3, None]
    assert history.latest is not None and history.latest.results["summarise"]["doc"] == "doc-3"

    events = await decode_all(settings, Codec(), pipe.topics.events)
    seen = Counter((e.workflow_id, e.stage, e.status) for e in events)
    for doc in docs:
        for stage in range(4):
            assert seen[(doc.doc_id, stage, "started")] >= 1
            assert seen[(doc.doc_id, stage, "finished")] == 1
        assert seen[(doc.doc_id, None, "completed")] == 1

    lines = format_history(history).splitlines()
    assert lines[0] == f"workflow doc-3 ({pipe.topics.checkpoints.name})"
    rows = [line.split() for line in lines if line[:1].isdigit()]
    assert [r[:2] for r in rows[:4]] == [["1", "running"], ["2", "running"], ["3", "running"],
                                         ["4", "completed"]]
    assert [r[1] for r in rows[4:]] == list(STAGES)  # the latest version's results
    missing = await workflow_history(settings.kafka, "no-such-doc", pipe.topics.checkpoints)
    assert not missing.found and "no checkpoints" in format_history(missing)

    def cli(workflow: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "mesh.cli", "workflows", "show", workflow,
             "-t", "tests.apps.pipeline"], env=broker.env(MESH_TEST_PREFIX=prefix),
            cwd=ROOT, capture_output=True, timeout=120, check=False)

    shown = cli("doc-3")
    assert shown.returncode == 0, shown.stderr.decode()
    assert shown.stdout.decode().splitlines() == lines
    absent = cli("no-such-doc")
    assert absent.returncode == 1 and b"no checkpoints" in absent.stderr


async def test_failing_stage_writes_a_failure_checkpoint_naming_stage_and_error(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: the document failing in classify ends with a `failed` checkpoint naming
    stage 1 (classify) and the error, keeping extract's result; its result says failed,
    a failed event names the stage, its task is in the tasks dead-letter topic, and the
    other documents complete."""
    pipe = build(prefix)
    settings = broker.settings()
    await apply_topics(settings.kafka, pipe.topics.all())
    docs = [Doc(doc_id=f"doc-{n}", text="some text") for n in range(4)]
    docs.append(Doc(doc_id="bad", text="text", fail_at="classify"))
    results = {r.workflow_id: r for r in await run_docs(settings, pipe, docs)}
    assert {k: r.status for k, r in results.items()} == {
        **{d.doc_id: "completed" for d in docs[:4]}, "bad": "failed"}
    assert (results["bad"].failed_stage, results["bad"].failed_stage_name) == (1, "classify")

    history = await workflow_history(settings.kafka, "bad", pipe.topics.checkpoints)
    latest = history.latest
    assert isinstance(latest, Checkpoint)
    assert (latest.status, latest.failed_stage, latest.failed_stage_name) == (
        "failed", 1, "classify")
    assert latest.error_class == "ValueError"
    assert latest.error == "stage classify cannot handle document bad"
    assert latest.completed_stages == ["extract"] and latest.finished_at_ms is not None
    assert [v.status for v in history.versions if v] == ["running", "failed"]
    text = format_history(history)
    assert "classify (stage 1): ValueError: stage classify cannot handle" in text

    events: list[StageEvent] = await decode_all(settings, Codec(), pipe.topics.events)
    failed = [(e.workflow_id, e.stage, e.stage_name, e.error) for e in events
              if e.status == "failed"]
    assert failed == [("bad", 1, "classify", "stage classify cannot handle document bad")]
    assert len(await read_all(settings, [pipe.topics.tasks.dlq_name])) == 1


async def wait_rows(table_of: Any, expected: set[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while set(dict(table_of().items())) != expected:
        assert time.monotonic() < deadline, (
            f"table holds {sorted(dict(table_of().items()))}, expected {sorted(expected)}")
        table_of().changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(table_of().changed.wait(), timeout=1.0)


async def test_retention_tombstones_finished_workflows_and_keeps_running_ones(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: with a 0.5 s retention, the checkpoints of finished workflows (completed,
    failed, and one finished long ago) are tombstoned and `deleted` events emitted,
    while a running workflow's checkpoint stays; after two waves of workflows the table
    (in memory and rebuilt from the topic) holds only the running one."""
    pipe = build(prefix, retention_s=0.5, sweep_every_s=0.2)
    settings = broker.settings()
    await apply_topics(settings.kafka, pipe.topics.all())
    codec = Codec()
    seed = CompactedTable(pipe.topics.checkpoints, settings.kafka, codec)
    now = int(time.time() * 1000)
    running = Checkpoint(workflow_id="running", pipeline=pipe.name, version=1,
                         status="running", next_stage=1, updated_at_ms=now)
    old = Checkpoint(workflow_id="old", pipeline=pipe.name, version=4, status="completed",
                     updated_at_ms=1_000, finished_at_ms=1_000, partition=2)
    await inject(settings, [seed.record_of("running", running), seed.record_of("old", old)])

    waves = [[Doc(doc_id=f"w{w}-{n}", text="x", fail_at="index" if n == 0 else "")
              for n in range(5)] for w in range(2)]
    async with Mesh(settings, [pipe.agent]) as mesh:
        await mesh.wait_assigned()

        def table() -> CompactedTable[Checkpoint]:
            return mesh.runners[0].tables[pipe.topics.checkpoints.name]

        sent = 0
        for wave in waves:
            await inject(settings, [encode(codec, pipe.topics.source, d) for d in wave])
            sent += len(wave)
            await wait_for_count(settings, [pipe.topics.results.name], sent)
            await wait_rows(table, {"running"})
    restored = CompactedTable(pipe.topics.checkpoints, settings.kafka, codec)
    assert await restored.restore() == 1 and restored.get("running") == running

    finished = {d.doc_id for wave in waves for d in wave} | {"old"}
    events = await decode_all(settings, codec, pipe.topics.events)
    assert {e.workflow_id for e in events if e.status == "deleted"} == finished
    history = await workflow_history(settings.kafka, "w1-0", pipe.topics.checkpoints)
    assert history.deleted and history.versions[-2] is not None
    assert history.versions[-2].status == "failed"
    assert "deleted" in format_history(history)
