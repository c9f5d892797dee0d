"""The audit event's wire form: one record per input, expanded for readers."""

from __future__ import annotations

from mesh import Agent, Context, RetryPolicy, Topic
from mesh.config import AuditSettings
from mesh.envelope import Envelope
from mesh.kafka.base import OutRecord, Record
from mesh.runtime.audit import AuditEvent, Auditor, audit_topic, expand
from mesh.serde.codec import Codec
from mesh.testing import InMemoryMesh
from tests.apps.stages import Item


async def test_one_record_per_input_lists_its_outputs_and_expands_to_produced_events() -> None:
    codec = Codec()
    auditor = Auditor(codec, AuditSettings(), source="stage1")
    event = Envelope.new(Item(key="k", seq=1, source_id="a"), source="emit",
                         correlation_id="wf-1")
    record = Record("in", 2, 40, b"k", b"x" * 30, (), 0)
    same = event.child(Item(key="k", seq=1, source_id="a"), agent="stage1", index=0, key=b"k")
    other = Envelope.new(Item(key="k", seq=1, source_id="b"), source="stage1",
                         correlation_id="wf-2")
    [out] = auditor.consumed(record, event, outcome="ok", started_ms=1_000, duration_s=0.25,
                             outputs=[(same, OutRecord("a", b"y" * 7)),
                                      (other, OutRecord("b", b"z" * 9))])
    assert (out.topic, out.key) == (audit_topic.name, b"wf-1")
    decoded = await codec.decode(audit_topic, out.value or b"")
    assert isinstance(decoded, AuditEvent) and len(decoded.outputs) == 2
    consumed, first, second = expand(decoded)
    assert (consumed.kind, consumed.outputs, consumed.size, consumed.duration_ms) == (
        "consumed", [], 30, 250.0)
    assert (first.kind, first.event_id, first.topic, first.size, first.causation_id,
            first.correlation_id, first.at_ms, first.agent) == (
        "produced", same.event_id, "a", 7, event.event_id, "wf-1", 1_250, "stage1")
    assert first.traceparent == same.traceparent
    assert (second.correlation_id, second.topic) == ("wf-2", "b")  # emitted for another
    assert expand(first) == [first]


def test_nothing_is_built_when_the_audit_is_off() -> None:
    auditor = Auditor(Codec(), AuditSettings(enabled=False), source="stage1")
    record = Record("in", 0, 0, None, b"x", (), 0)
    assert auditor.consumed(record, None, outcome="dead_letter", started_ms=0,
                            duration_s=0) == []


async def test_the_fast_consumed_record_is_byte_for_byte_the_models_encoding() -> None:
    """The auditor builds `consumed` records straight in Avro form (the hot path); they
    must be exactly what encoding the AuditEvent model gives, for a decoded input with
    outputs, a failure and an input that did not decode."""
    from mesh.errors import DecodeError
    from mesh.runtime.audit import AuditOutput, audit_record

    codec = Codec()
    auditor = Auditor(codec, AuditSettings(payloads=True), source="stage1")
    event = Envelope.new(Item(key="k", seq=1, source_id="a"), source="emit",
                         correlation_id="wf-1")
    record = Record("in", 2, 40, b"k", b"x" * 30, (), 0)
    child = event.child(Item(key="k", seq=2, source_id="a"), agent="stage1", index=0, key=b"k")
    for env, error, outputs in ((event, None, [(child, OutRecord("a", b"y" * 7))]),
                                (event, ValueError("boom"), []),
                                (None, DecodeError("garbage"), [])):
        [fast] = auditor.consumed(record, env, outcome="ok" if error is None else "retry",
                                  started_ms=1_000, duration_s=0.0125, error=error,
                                  outputs=outputs)
        model = AuditEvent(
            kind="consumed", at_ms=1_000, agent="stage1", topic="in", partition=2, offset=40,
            event_id=env.event_id if env else None,
            correlation_id=env.correlation_id if env else None,
            causation_id=env.causation_id if env else None,
            traceparent=env.traceparent if env else None,
            outcome="ok" if error is None else "retry", duration_ms=12.5,
            attempt=env.attempt if env else None,
            error_class=type(error).__name__ if error else None,
            error=str(error) if error else None, size=30,
            payload=env.payload.model_dump_json() if env else None,
            details={"replica": auditor.replica},
            outputs=[AuditOutput(event_id=o.event_id, topic=r.topic, size=7,
                                 traceparent=o.traceparent, payload=o.payload.model_dump_json())
                     for o, r in outputs])
        slow = audit_record(codec, model, source="stage1")
        assert (fast.value, fast.key, fast.headers) == (slow.value, slow.key, slow.headers)


async def test_what_a_handler_notes_is_in_its_inputs_audit_record() -> None:
    """Through the real runner (the in-memory kit): a handler's ``ctx.annotate`` goes
    into its input's `consumed` audit record's details, beside the replica, also when
    the input then fails for good; an input whose handler noted nothing keeps the
    replica alone. Fail: details missing, not strings, or leaking to other inputs."""
    items = Topic("noted.items", Item, key="key")
    out = Topic("noted.out", Item, key="key")

    async def handle(item: Item, ctx: Context) -> Item | None:
        if item.seq == 0:
            return item
        ctx.annotate(tokens=120, cost=0.5, model="m")
        ctx.annotate(tokens=130)  # the last value counts
        if item.text == "fail":
            raise ValueError("bad")
        return item

    agent = Agent("noter", handler=handle, consumes=items, produces=out,
                  retry=RetryPolicy(attempts=1))
    async with InMemoryMesh(agent) as mesh:
        for seq, text in ((0, ""), (1, ""), (2, "fail")):
            await mesh.emit(items, Item(key="k", seq=seq, source_id=str(seq), text=text))
        await mesh.drain()
        consumed = [e for e in (await _audit_events(mesh)) if e.kind == "consumed"]
    by_outcome = [(e.offset, e.outcome, e.details) for e in consumed]
    replica = consumed[0].details["replica"]
    noted = {"replica": replica, "tokens": "130", "cost": "0.5", "model": "m"}
    assert by_outcome == [(0, "ok", {"replica": replica}), (1, "ok", noted),
                          (2, "dead_letter", noted)]


async def _audit_events(mesh: InMemoryMesh) -> list[AuditEvent]:
    codec = Codec()
    events = []
    for record in mesh.records(audit_topic):
        event = await codec.decode(audit_topic, record.value or b"")
        assert isinstance(event, AuditEvent)
        events.append(event)
    return events
