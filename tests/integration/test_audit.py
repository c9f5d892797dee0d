"""Every agent publishes what it consumed and produced, with outcomes, to mesh.audit."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

from mesh import Codec, Emitter, Mesh, apply_topics
from mesh.runtime.audit import AuditEvent, audit_topic, expand
from tests.apps.stages import Item, build
from tests.conftest import BrokerUnderTest
from tests.support import Follower, wait_for_count


class AuditOf(Follower):
    """Follows mesh.audit, keeping the events of one correlation id."""

    def __init__(self, broker: BrokerUnderTest, correlation_id: str) -> None:
        super().__init__(broker.settings(), [audit_topic.name])
        self.correlation_id = correlation_id
        self.codec = Codec()
        self.events: list[AuditEvent] = []

    async def apply(self, record: Any) -> None:
        event = await self.codec.decode(audit_topic, record.value or b"")
        assert isinstance(event, AuditEvent)
        self.events += [e for e in expand(event) if e.correlation_id == self.correlation_id]

    def of(self, kind: str, agent: str | None = None) -> list[AuditEvent]:
        return [e for e in self.events if e.kind == kind and agent in (None, e.agent)]


async def test_chain_publishes_consumed_and_produced_events_with_ids_sizes_and_outcomes(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: for one emitted event through a two-stage chain, mesh.audit holds the
    emitter's `produced`, then per stage one `consumed` (ok, duration, size, offset) and
    one `produced` whose causation id is the consumed event; ids link emit -> stage1
    -> stage2; no payloads (off by default); a poison event's consumption is audited
    once per attempt: retry, retry (a plain exception is retried), then dead_letter,
    each with its error."""
    app = build(prefix)
    stage1, stage2 = app.agents[:2]
    settings = broker.settings()
    await apply_topics(settings.kafka, app.topics.values())
    correlation = f"wf-{uuid.uuid4().hex}"
    async with AuditOf(broker, correlation) as audit, Mesh(settings, [stage1, stage2]) as mesh:
        await mesh.wait_assigned()
        async with Emitter(settings, source=f"{prefix}-billing") as emitter:
            [root] = await emitter.emit(stage1.consumes[0], [Item(key="k", seq=1, source_id="a")],
                                        correlation_id=correlation)
            [poison] = await emitter.emit(
                stage1.consumes[0], [Item(key="k", seq=2, source_id="p", text="poison")],
                correlation_id=correlation)
        await wait_for_count(settings, [stage2.produces[0].name], 1)
        await audit.until(lambda: len(audit.of("produced", stage2.name)) == 1
                          and len(audit.of("consumed", stage1.name)) == 4, "the chain's audit")

    [emitted_ok, emitted_poison] = audit.of("produced", f"{prefix}-billing")
    assert (emitted_ok.event_id, emitted_poison.event_id) == (root.event_id, poison.event_id)
    assert emitted_ok.topic == stage1.consumes[0].name and emitted_ok.size

    consumed1 = {e.event_id: e for e in audit.of("consumed", stage1.name)}  # the last of each
    ok = consumed1[root.event_id]
    assert (ok.outcome, ok.topic, ok.attempt, ok.error) == ("ok", stage1.consumes[0].name, 1, None)
    assert ok.duration_ms is not None and ok.duration_ms >= 0 and ok.offset is not None
    assert ok.size == emitted_ok.size and ok.payload is None
    attempts = [e for e in audit.of("consumed", stage1.name) if e.event_id == poison.event_id]
    assert [(e.outcome, e.attempt, e.error_class) for e in attempts] == [
        ("retry", 1, "ValueError"), ("retry", 2, "ValueError"), ("dead_letter", 3, "ValueError")]
    assert all("cannot handle poison" in (e.error or "") for e in attempts)

    [out1] = audit.of("produced", stage1.name)
    assert out1.causation_id == root.event_id and out1.topic == stage1.produces[0].name
    [consumed2] = audit.of("consumed", stage2.name)
    assert (consumed2.event_id, consumed2.causation_id, consumed2.outcome) == (
        out1.event_id, root.event_id, "ok")
    [out2] = audit.of("produced", stage2.name)
    assert out2.causation_id == out1.event_id and out2.topic == stage2.produces[0].name
    chain_ids = {root.event_id, out1.event_id, out2.event_id}
    traces = {(e.traceparent or "").split("-")[1] for e in audit.events
              if e.event_id in chain_ids}
    assert traces == {root.traceparent.split("-")[1]}  # one W3C trace through every hop


async def test_payloads_are_in_the_audit_only_when_enabled(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: with MESH_AUDIT__PAYLOADS on, consumed and produced events carry the
    payload as JSON."""
    app = build(prefix)
    stage1 = app.agents[0]
    base = broker.settings()
    settings = base.model_copy(update={"audit": base.audit.model_copy(update={"payloads": True})})
    await apply_topics(settings.kafka, app.topics.values())
    correlation = f"wf-{uuid.uuid4().hex}"
    async with AuditOf(broker, correlation) as audit, Mesh(settings, [stage1]) as mesh:
        await mesh.wait_assigned()
        async with Emitter(settings) as emitter:
            await emitter.emit(stage1.consumes[0], [Item(key="k", seq=1, source_id="x")],
                               correlation_id=correlation)
        await audit.until(lambda: bool(audit.of("produced", stage1.name)), "stage1's output")
    [consumed] = audit.of("consumed", stage1.name)
    assert json.loads(consumed.payload or "{}")["source_id"] == "x"
    [produced] = audit.of("produced", stage1.name)
    assert json.loads(produced.payload or "{}")["hops"] == ["stage1"]


async def test_mesh_tap_decodes_the_audit_topic(
        broker: BrokerUnderTest, prefix: str, mesh_cli: list[str]) -> None:
    """Pass: `mesh tap mesh.audit --json` prints audit events as JSON lines a tool can
    read, including the one an Emitter just published."""
    app = build(prefix)
    settings = broker.settings()
    await apply_topics(settings.kafka, app.topics.values())
    correlation = f"wf-{uuid.uuid4().hex}"
    async with Emitter(settings, source=f"{prefix}-src") as emitter:
        [sent] = await emitter.emit(app.agents[0].consumes[0],
                                    [Item(key="k", seq=1, source_id="t")],
                                    correlation_id=correlation)
    done = subprocess.run([*mesh_cli, "tap", audit_topic.name, "--no-follow", "--json"],
                          env=broker.env(), capture_output=True, text=True, timeout=120,
                          check=True)
    lines = [json.loads(line) for line in done.stdout.splitlines() if correlation in line]
    assert len(lines) == 1
    assert lines[0]["payload"]["event_id"] == sent.event_id
    assert lines[0]["payload"]["agent"] == f"{prefix}-src"
