"""OpenTelemetry spans around handler runs, parented by the W3C trace context the
input carried (``traceparent`` header).

Without the ``otel`` extra (``opentelemetry-api``), or with it but no tracer provider
configured by the process (the API's default is a no-op), there are no spans and the
ids still travel: every output gets a ``traceparent`` with the input's trace id and a
span id derived from the output's event id. With a recording span, the outputs carry
that span's id instead, so the next hop's handler span is its child.

Example:
    >>> tracer = HandlerTracer(TracingSettings())
    >>> with tracer.span("answerer", "questions", event) as traceparent:  # doctest: +SKIP
    ...     ...  # outputs get ``traceparent`` (None: no recording span)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mesh.config import TracingSettings

if TYPE_CHECKING:
    from mesh.envelope import Envelope

try:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the optional extra is not installed: ids travel, no spans
    trace = None  # type: ignore[assignment]


_LOOK_EVERY_S = 5.0
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()  # reusable: no state


class HandlerTracer:
    """Makes a span per handler run when OpenTelemetry is installed and enabled."""

    def __init__(self, settings: TracingSettings, *, provider: Any = None) -> None:
        self.active = settings.enabled and trace is not None
        self._provider = provider
        self._seen_provider = False
        self._next_look = 0.0
        if self.active:
            self._tracer = trace.get_tracer("mesh", tracer_provider=provider)
            self._propagator = TraceContextTextMapPropagator()

    def _recording(self) -> bool:
        """Whether spans would record: a provider was given or the process set one (the
        API's default proxy and no-op providers record nothing, so skip their cost).
        Looked up again at most every few seconds while none is set."""
        if not self.active:
            return False
        if self._provider is not None or self._seen_provider:
            return True
        now = time.monotonic()
        if now >= self._next_look:
            self._next_look = now + _LOOK_EVERY_S
            self._seen_provider = not isinstance(
                trace.get_tracer_provider(), (trace.ProxyTracerProvider,
                                              trace.NoOpTracerProvider))
        return self._seen_provider

    def span(self, agent: str, topic: str, event: Envelope[Any]
             ) -> contextlib.AbstractContextManager[str | None]:
        """A CONSUMER span for ``agent`` handling ``event`` from ``topic``; gives the
        traceparent its outputs should carry (None when the span is not recording).
        An exception escaping the block is recorded on the span and re-raised."""
        if not self._recording():
            return _NO_SPAN  # every input of every agent: no generator to run
        return self._span(agent, topic, event)

    @contextlib.contextmanager
    def _span(self, agent: str, topic: str, event: Envelope[Any]) -> Iterator[str | None]:
        parent = self._propagator.extract({"traceparent": event.traceparent})
        with self._tracer.start_as_current_span(
                f"{agent} process {topic}", context=parent, kind=trace.SpanKind.CONSUMER,
                attributes={"messaging.system": "kafka",
                            "messaging.destination.name": topic,
                            "messaging.operation.type": "process",
                            "messaging.message.id": event.event_id,
                            "messaging.consumer.group.name": agent,
                            "mesh.correlation_id": event.correlation_id,
                            "mesh.attempt": event.attempt}) as span:
            context = span.get_span_context()
            yield (f"00-{context.trace_id:032x}-{context.span_id:016x}-"
                   f"{int(context.trace_flags):02x}") if span.is_recording() else None
