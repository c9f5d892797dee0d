"""With OpenTelemetry configured, every handler run is a span whose parent is the span
of the event that caused it; without a recording provider, the W3C ids still travel."""

from __future__ import annotations

import uuid

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from mesh import Emitter, Mesh, apply_topics
from mesh.runtime.tracing import HandlerTracer
from tests.apps.stages import Item, build
from tests.conftest import BrokerUnderTest
from tests.support import wait_for_count


def _span_id(traceparent: str) -> int:
    return int(traceparent.split("-")[2], 16)


def _trace_id(traceparent: str) -> int:
    return int(traceparent.split("-")[1], 16)


async def test_handler_spans_chain_parent_to_child_across_hops(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: one emitted event through stage1 -> stage2 gives two CONSUMER spans in the
    emitted event's trace: stage1's parent is the emitted traceparent's span, stage2's
    parent is stage1's span, and the sink record carries stage2's span as its parent;
    a poison event's span has status ERROR with the exception recorded."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = build(prefix)
    stage1, stage2 = app.agents[:2]
    settings = broker.settings()
    await apply_topics(settings.kafka, app.topics.values())
    mesh = Mesh(settings, [stage1, stage2])
    for runner in mesh.runners:
        runner.processor.tracer = HandlerTracer(settings.tracing, provider=provider)
    async with mesh:
        await mesh.wait_assigned()
        async with Emitter(settings) as emitter:
            [root] = await emitter.emit(stage1.consumes[0], [Item(key="k", seq=1, source_id="a")],
                                        correlation_id=f"wf-{uuid.uuid4().hex}")
            [poison] = await emitter.emit(
                stage1.consumes[0], [Item(key="k", seq=2, source_id="p", text="poison")])
        [out] = await wait_for_count(settings, [stage2.produces[0].name], 1)

    spans = {(s.name.split(" ")[0], s.attributes["messaging.message.id"]): s
             for s in exporter.get_finished_spans()}
    first = spans[(stage1.name, root.event_id)]
    assert first.kind == SpanKind.CONSUMER
    assert first.context.trace_id == _trace_id(root.traceparent)
    assert first.parent is not None and first.parent.span_id == _span_id(root.traceparent)
    [second] = [s for (agent, _), s in spans.items() if agent == stage2.name]
    assert second.context.trace_id == first.context.trace_id
    assert second.parent is not None and second.parent.span_id == first.context.span_id
    sink_traceparent = dict(out.headers)["traceparent"].decode()
    assert _span_id(sink_traceparent) == second.context.span_id
    failed = spans[(stage1.name, poison.event_id)]
    assert failed.status.status_code == StatusCode.ERROR
    assert [e.name for e in failed.events] == ["exception"]
    provider.shutdown()


def test_without_a_configured_provider_no_span_replaces_the_derived_ids() -> None:
    """Pass: OpenTelemetry's default (no-op) provider yields no traceparent, so the
    outputs keep the ids derived from their event ids; disabled tracing likewise."""
    from mesh.config import TracingSettings
    from mesh.envelope import Envelope

    event = Envelope(None, "e1", "c1")
    with HandlerTracer(TracingSettings()).span("a", "t", event) as traceparent:
        assert traceparent is None
    with HandlerTracer(TracingSettings(enabled=False)).span("a", "t", event) as traceparent:
        assert traceparent is None
