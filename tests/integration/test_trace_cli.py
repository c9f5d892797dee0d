"""`mesh trace CORRELATION_ID`, run as a subprocess against the session's broker.

First on an audit history the test writes to mesh.audit itself (so every shape is
known exactly), then end to end: real agents publish their audit, and the trace of
what they did is checked. mesh.audit is shared by every test, so each test uses its
own correlation ids.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from mesh import Codec, Emitter, Mesh, apply_topics
from mesh.config import AuditSettings
from mesh.kafka.murmur import partition_for
from mesh.kafka.reader import TopicReader
from mesh.runtime.audit import AuditEvent, Auditor, AuditOutput, audit_topic
from mesh.views.trace import Trace, read_trace
from tests.apps import retry as retry_app
from tests.apps.stages import Item, build
from tests.conftest import ROOT, BrokerUnderTest
from tests.support import inject, wait_for_count

pytestmark = pytest.mark.broker_agnostic

CLI_TIMEOUT_S = 120.0


async def mesh_trace(broker: BrokerUnderTest, *args: str,
                     prefix: str = "") -> subprocess.CompletedProcess[str]:
    """`mesh trace ARGS...` as a user runs it (stdout is a pipe); ``prefix`` names the
    test's topics for ``-t tests.apps.cli_topics``."""
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "mesh.cli", "trace", *args],
        env=broker.env(MESH_TEST_PREFIX=prefix) if prefix else broker.env(), cwd=ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


async def traced(broker: BrokerUnderTest, correlation_id: str) -> tuple[dict[str, Any], str]:
    """The JSON and the text of `mesh trace`, both required to exit 0."""
    as_json = await mesh_trace(broker, correlation_id, "--json")
    assert as_json.returncode == 0, as_json.stderr
    text = await mesh_trace(broker, correlation_id)
    assert text.returncode == 0, text.stderr
    return json.loads(as_json.stdout), text.stdout


def tree(text: str) -> list[tuple[int, str]]:
    """The rendered tree as (depth, label) lines; rich draws 4 columns per level."""
    lines = []
    for line in text.splitlines()[1:]:
        label = line.lstrip("│├└─ ")
        lines.append(((len(line) - len(label)) // 4, label))
    return lines


def line_of(lines: list[tuple[int, str]], pattern: str) -> tuple[int, int]:
    """(index, depth) of the one line matching ``pattern``."""
    found = [(i, depth) for i, (depth, label) in enumerate(lines) if re.search(pattern, label)]
    assert len(found) == 1, f"{pattern!r} matched {len(found)} lines of:\n" + "\n".join(
        "    " * d + label for d, label in lines)
    return found[0]


async def trace_when(broker: BrokerUnderTest, correlation_id: str,
                     complete: Callable[[Trace], bool], timeout: float = 60.0) -> Trace:
    """Read the trace until ``complete`` holds (audit records travel with, not before,
    the outputs they describe), failing after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        trace = await read_trace(broker.settings().kafka, correlation_id)
        if complete(trace):
            return trace
        assert time.monotonic() < deadline, (
            f"trace {correlation_id} incomplete after {timeout:.0f} s: {trace.to_dict()}")


def by_producer(trace: Trace, producer: str) -> list[Any]:
    return [n for n in trace.walk() if n.producer == producer]


# --- an audit history written by the test ----------------------------------------


async def test_trace_of_a_written_history_prints_the_tree_and_its_json(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: for an audit history with a fan-out, a retry through a retry topic and a
    dead letter (and another workflow's events beside it), `--json` gives the tree
    (ids, producers, topics, outcomes, attempts, times relative to the first event)
    and the text shows the total time on top and each event under the agent that
    produced it, with outcomes and errors."""
    settings = broker.settings()
    await apply_topics(settings.kafka, [audit_topic])
    cid, other = f"{prefix}-wf", f"{prefix}-other"
    e1, e2, e3 = (str(uuid.uuid4()) for _ in range(3))
    t0 = int(time.time() * 1000)

    def event(kind: str, at: int, **fields: Any) -> AuditEvent:
        return AuditEvent(kind=kind, at_ms=t0 + at, correlation_id=fields.pop("cid", cid),
                          **fields)

    history = [
        event("produced", 0, agent="billing", topic="orders", event_id=e1, size=42),
        event("consumed", 5, agent="answerer", topic="orders", event_id=e1, outcome="retry",
              duration_ms=2.5, attempt=1, error_class="TimeoutError", error="llm slow"),
        event("consumed", 7, agent="archiver", topic="orders", event_id=e1, outcome="ok",
              duration_ms=1.0, attempt=1),
        event("consumed", 600, agent="answerer", topic="orders.retry.1", event_id=e1,
              outcome="ok", duration_ms=30.0, attempt=2),
        event("produced", 630, agent="answerer", topic="answers", event_id=e2,
              causation_id=e1, size=77),
        event("consumed", 640, agent="reviewer", topic="answers", event_id=e2,
              causation_id=e1, outcome="dead_letter", duration_ms=3.0, attempt=1,
              error_class="ValueError", error="answer has no sources"),
        event("produced", 5, agent="billing", topic="orders", event_id=e3, cid=other),
    ]
    auditor = Auditor(Codec(), AuditSettings(), source="test")
    await inject(settings, [auditor.record(e) for e in history])

    data, text = await traced(broker, cid)

    assert data["correlation_id"] == cid and data["wall_ms"] == 643.0
    assert (data["events"], data["audit_events"], data["retries"], data["dead_letters"]) == (
        2, 6, 1, 1)
    [root] = data["roots"]
    assert (root["event_id"], root["topic"], root["producer"], root["rel_ms"],
            root["size"]) == (e1, "orders", "billing", 0, 42)
    answerer, archiver = root["consumed_by"]
    assert (archiver["agent"], archiver["outcome"]) == ("archiver", "ok")
    assert answerer["agent"] == "answerer" and answerer["outcome"] == "ok"
    assert [(a["attempt"], a["outcome"], a["topic"], a["rel_ms"], a["error"])
            for a in answerer["attempts"]] == [(1, "retry", "orders", 5, "llm slow"),
                                               (2, "ok", "orders.retry.1", 600, None)]
    [child] = root["children"]
    assert (child["event_id"], child["producer"], child["causation_id"]) == (
        e2, "answerer", e1)
    [reviewer] = child["consumed_by"]
    assert reviewer["outcome"] == "dead_letter"
    assert reviewer["attempts"][0]["error"] == "answer has no sources"
    assert child["children"] == []

    assert text.splitlines()[0] == (f"trace {cid}: 643.0 ms wall time, 2 event(s), "
                                    "3 handling(s), 1 retry, 1 dead letter")
    lines = tree(text)
    at_root = line_of(lines, rf"^orders \[evt {e1[:8]}…\] ← billing @ \+0 ms, 42 B$")
    at_answerer = line_of(lines, r"^→ answerer: ok after 2 consumptions \(\+5 ms … \+600 ms\)")
    at_archiver = line_of(lines, r"^→ archiver: ok 1\.0 ms \(\+7 ms\)$")
    at_child = line_of(lines, rf"^answers \[evt {e2[:8]}…\] ← answerer @ \+630 ms")
    at_review = line_of(lines, r"^→ reviewer: dead_letter 3\.0 ms \(\+640 ms\) "
                               r"ValueError: answer has no sources$")
    line_of(lines, r"^#1 retry 2\.5 ms \(\+5 ms\) TimeoutError: llm slow$")
    line_of(lines, r"^#2 ok 30\.0 ms \(\+600 ms\) via orders\.retry\.1$")
    assert at_answerer[1] == at_archiver[1] == at_root[1] + 1
    assert at_child[1] == at_answerer[1] + 1 and at_answerer[0] < at_child[0] < at_archiver[0]
    assert at_review[1] == at_child[1] + 1
    assert e3[:8] not in text


async def test_trace_of_a_correlation_id_without_audit_events_exits_1(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: exit 1, nothing on stdout, stderr names the correlation id and the topic."""
    await apply_topics(broker.settings().kafka, [audit_topic])
    missing = f"{prefix}-never-{uuid.uuid4().hex}"

    for args in ((missing,), (missing, "--json")):
        result = await mesh_trace(broker, *args)

        assert result.returncode == 1, result.stderr
        assert result.stdout == ""
        message = " ".join(result.stderr.split())
        assert f"no audit events for correlation id '{missing}' in mesh.audit" in message


# --- which partition is read ---------------------------------------------------------


async def audit_partitions(broker: BrokerUnderTest) -> int:
    """mesh.audit's partition count, from the broker's metadata."""
    async with TopicReader(broker.settings().kafka, [audit_topic.name]) as reader:
        return len(reader.partitions)


async def test_trace_reads_only_its_correlation_ids_partition(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: audit records keyed by the correlation id all land in partition_for(id)
    (the runtime's producer and mesh trace agree on the partitioner); an audit event
    of that id deliberately produced to another partition is not in the trace (that
    partition is not read), and `all_partitions=True` finds it."""
    settings = broker.settings()
    await apply_topics(settings.kafka, [audit_topic])
    cid = f"{prefix}-wf"
    count = await audit_partitions(broker)
    home = partition_for(cid.encode(), count)
    t0 = int(time.time() * 1000)
    auditor = Auditor(Codec(), AuditSettings(), source="test")
    keyed = [auditor.record(AuditEvent(kind="produced", at_ms=t0 + i, agent="billing",
                                       topic="orders", event_id=f"{prefix}-e{i}",
                                       correlation_id=cid)) for i in range(4)]
    stray = auditor.record(AuditEvent(kind="produced", at_ms=t0, agent="billing",
                                      topic="orders", event_id=f"{prefix}-stray",
                                      correlation_id=cid))
    elsewhere = (home + 1) % count

    positions = await inject(settings, keyed)
    await inject(settings, [stray._replace(partition=elsewhere)])

    assert {partition for partition, _ in positions} == {home}
    trace = await read_trace(settings.kafka, cid)
    assert {n.event_id for n in trace.walk()} == {f"{prefix}-e{i}" for i in range(4)}
    everywhere = await read_trace(settings.kafka, cid, all_partitions=True)
    assert {n.event_id for n in everywhere.walk()} == {
        f"{prefix}-stray", *(f"{prefix}-e{i}" for i in range(4))}


async def test_an_output_emitted_under_another_correlation_id_is_found_with_all_partitions(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: an agent handling an input of correlation X emits an output of correlation
    Y (listed in X's consumed record, keyed X) and another agent consumes it (keyed Y).
    The trace of Y has the consumption but not the production (a root saying its
    production is not in the audit); with all_partitions it names the producing agent
    and its cause. The trace of X does not show the output (it is not of X)."""
    settings = broker.settings()
    await apply_topics(settings.kafka, [audit_topic])
    x, y = f"{prefix}-x", f"{prefix}-y"
    e_in, e_out = f"{prefix}-in", f"{prefix}-out"
    t0 = int(time.time() * 1000)
    auditor = Auditor(Codec(), AuditSettings(), source="test")
    await inject(settings, [auditor.record(e) for e in (
        AuditEvent(kind="produced", at_ms=t0, agent="billing", topic="orders",
                   event_id=e_in, correlation_id=x),
        AuditEvent(kind="consumed", at_ms=t0 + 5, agent="splitter", topic="orders",
                   event_id=e_in, correlation_id=x, outcome="ok", duration_ms=2.0,
                   attempt=1, outputs=[AuditOutput(event_id=e_out, topic="parts", size=9,
                                                   correlation_id=y)]),
        AuditEvent(kind="consumed", at_ms=t0 + 9, agent="packer", topic="parts",
                   event_id=e_out, correlation_id=y, causation_id=e_in, outcome="ok",
                   duration_ms=1.0, attempt=1))])

    [keyed_only] = (await read_trace(settings.kafka, y)).roots
    [complete] = (await read_trace(settings.kafka, y, all_partitions=True)).roots
    of_x = await read_trace(settings.kafka, x)

    assert (keyed_only.event_id, keyed_only.producer, keyed_only.produced) == (e_out, None, 0)
    assert [h.agent for h in keyed_only.handlings] == ["packer"]
    assert (complete.event_id, complete.producer, complete.produced) == (e_out, "splitter", 1)
    assert (complete.causation_id, complete.cause_in_audit) == (e_in, False)
    assert [h.agent for h in complete.handlings] == ["packer"]
    assert [n.event_id for n in of_x.walk()] == [e_in]


# --- end to end: what real agents audit -----------------------------------------


async def test_trace_of_an_emitted_event_shows_emitter_then_each_stage_nested(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: one event emitted with mesh.Emitter into a real two-stage chain; `mesh
    trace` shows the emitter's event, stage1 consuming it (ok), stage1's output under
    stage1, stage2 consuming that (ok), and stage2's output under stage2, with the
    event ids the agents produced and non-decreasing times."""
    app = build(prefix)
    stage1, stage2 = app.agents[:2]
    settings = broker.settings()
    await apply_topics(settings.kafka, [*app.topics.values(), audit_topic])
    cid, source = f"{prefix}-order-1", f"{prefix}-billing"
    async with Mesh(settings, [stage1, stage2]) as mesh:
        await mesh.wait_assigned()
        async with Emitter(settings, source=source) as emitter:
            [root] = await emitter.emit(stage1.consumes[0],
                                        [Item(key="k", seq=1, source_id="s1")],
                                        correlation_id=cid)
        [output] = await wait_for_count(settings, [stage2.produces[0].name], 1)
        await trace_when(broker, cid, lambda t: bool(by_producer(t, stage2.name))
                         and len(by_producer(t, stage1.name)) == 1
                         and bool(by_producer(t, stage1.name)[0].handlings))

    data, text = await traced(broker, cid)

    [node] = data["roots"]
    assert (node["event_id"], node["producer"], node["topic"]) == (
        root.event_id, source, stage1.consumes[0].name)
    times = [node["rel_ms"]]
    for agent, topic in ((stage1, stage1.produces[0].name), (stage2, stage2.produces[0].name)):
        [handling] = node["consumed_by"]
        assert (handling["agent"], handling["outcome"]) == (agent.name, "ok")
        [attempt] = handling["attempts"]
        assert attempt["attempt"] == 1 and attempt["delivery"] == "first"
        times.append(attempt["rel_ms"])
        [node] = node["children"]
        assert (node["producer"], node["topic"], node["produced"]) == (agent.name, topic, 1)
        times.append(node["rel_ms"])
    assert node["event_id"] == dict(output.headers)["mesh-event-id"].decode()
    assert node["consumed_by"] == [] and node["children"] == []
    assert times[0] == 0 and times == sorted(times)

    lines = tree(text)
    depths = [line_of(lines, pattern)[1] for pattern in (
        rf"^{prefix}\.in \[evt {root.event_id[:8]}…\] ← {source} @ \+0 ms",
        rf"^→ {stage1.name}: ok [\d.]+ ms \(\+\d+ ms\)$",
        rf"^{prefix}\.a \[evt \S+\] ← {stage1.name} @ \+\d+ ms",
        rf"^→ {stage2.name}: ok [\d.]+ ms \(\+\d+ ms\)$",
        rf"^{prefix}\.b \[evt \S+\] ← {stage2.name} @ \+\d+ ms")]
    assert depths == list(range(depths[0], depths[0] + 5))
    labelled = await mesh_trace(broker, cid, "-t", "tests.apps.cli_topics", prefix=prefix)
    assert labelled.returncode == 0, labelled.stderr
    assert re.search(rf"^{prefix}\.in \(Item\) \[evt ", "\n".join(
        label for _, label in tree(labelled.stdout)), re.M)


async def test_trace_shows_retries_through_retry_topics_and_a_dead_letter_from_real_agents(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: with an agent retrying through retry topics, a flaky event's trace shows
    attempt 1 `retry` with the TimeoutError, then attempt 2 `ok` via `<in>.retry.1`
    and the output under it; an event failing every time shows attempts 1 and 2
    `retry` and attempt 3 `dead_letter` with its error, and no output."""
    agent = retry_app.build(prefix, base_ms=50)
    source, sink = agent.consumes[0], agent.produces[0]
    settings = broker.settings()
    await apply_topics(settings.kafka, [*agent.all_topics, audit_topic])
    flaky_cid, down_cid = f"{prefix}-flaky", f"{prefix}-down"
    async with Mesh(settings, [agent]) as mesh:
        await mesh.wait_assigned()
        async with Emitter(settings, source="shop") as emitter:
            await emitter.emit(source, [Item(key="k", seq=1, source_id="f", text="flaky")],
                               correlation_id=flaky_cid)
            await emitter.emit(source, [Item(key="k", seq=2, source_id="d", text="down")],
                               correlation_id=down_cid)
        await wait_for_count(settings, [sink.name], 1)
        await wait_for_count(settings, [source.dlq_name], 1)
        await trace_when(broker, flaky_cid, lambda t: bool(by_producer(t, agent.name)))
        await trace_when(broker, down_cid, lambda t: t.found and any(
            h.outcome == "dead_letter" for h in t.roots[0].handlings))

    flaky, flaky_text = await traced(broker, flaky_cid)
    down, down_text = await traced(broker, down_cid)

    [root] = flaky["roots"]
    [handling] = root["consumed_by"]
    assert [(a["attempt"], a["outcome"], a["topic"], a["error_class"])
            for a in handling["attempts"]] == [
        (1, "retry", source.name, "TimeoutError"), (2, "ok", f"{source.name}.retry.1", None)]
    [output] = root["children"]
    assert (output["producer"], output["topic"]) == (agent.name, sink.name)
    lines = tree(flaky_text)
    _, handled = line_of(lines, rf"^→ {agent.name}: ok after 2 consumptions")
    _, first = line_of(lines, r"^#1 retry .* TimeoutError: downstream timed out on f$")
    _, second = line_of(lines, rf"^#2 ok .* via {re.escape(source.name)}\.retry\.1$")
    _, produced = line_of(lines, rf"^{re.escape(sink.name)} \[evt \S+\] ← {agent.name}")
    assert first == second == produced == handled + 1

    [root] = down["roots"]
    [handling] = root["consumed_by"]
    assert [(a["attempt"], a["outcome"]) for a in handling["attempts"]] == [
        (1, "retry"), (2, "retry"), (3, "dead_letter")]
    assert handling["attempts"][-1]["error"] == "downstream timed out on d"
    assert root["children"] == [] and down["dead_letters"] == 1 and down["retries"] == 2
    assert "1 dead letter" in down_text.splitlines()[0]
    line_of(tree(down_text), r"^#3 dead_letter .* via \S+\.retry\.2 TimeoutError: "
                             r"downstream timed out on d$")
