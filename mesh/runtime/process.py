"""One record's fate: decode, handle, retry or dead-letter, send, audit, observe.

:class:`RecordProcessor` takes one consumed record to the records it produces (outputs,
state writes, a retry record or a dead letter, audit records), sends them, and returns
their acks; the lane that handed the record over commits its offset once they resolve
(:mod:`mesh.runtime.lanes`). What it promises (the half of the delivery contract that is
about one input):

* Bad input (undecodable, wrong schema, oversize; never a header) and inputs whose
  handler fails for good go to ``<topic>.dlq`` with headers naming the original
  topic, partition, offset, error class and message; the partition moves on.
* A handler that fails with a retriable error is tried again as the agent's
  ``RetryPolicy`` says: in place (blocking), or through the agent's retry topics
  (:mod:`mesh.runtime.retry`) while the partition moves on; the last failure goes to
  the dead-letter topic (:mod:`mesh.runtime.dead_letter`) after ``on_failure`` ran.
* Every output carries an event id derived from the input's, so a replay produces the
  same ids; outputs above ``runtime.max_message_bytes`` fail the input.
* Every attempt is audited (:mod:`mesh.runtime.audit`) with the outputs of the last,
  and the audit records go with the outputs; every input's :class:`Outcome` goes to
  the observers (metrics, heartbeats).
* ``Held`` (a breaker open) is not a failure: it propagates to the lane, which keeps
  the input and hands it over again when the hold ends.
* With ``state_first`` (an agent's ``state_first``, at least once), an input's outputs
  are sent only once its state writes are acknowledged: no one sees an output whose
  state a crash could still lose, to act on it while a restarted replica's state lags
  (a person approving a step that the restored workflow has not asked for yet).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

from mesh.agent import Agent, Context
from mesh.config import MeshSettings
from mesh.envelope import TRACESTATE, Envelope, now_ms, read_headers
from mesh.errors import DecodeError, Held, InputError, PayloadTooLarge, TransportError
from mesh.kafka.base import Acks, OutRecord, Record
from mesh.runtime import retry
from mesh.runtime.audit import DEAD_LETTER, OK, RETRY, Auditor
from mesh.runtime.dead_letter import dead_letter
from mesh.runtime.tracing import HandlerTracer
from mesh.serde.codec import Codec

logger = logging.getLogger(__name__)

# Sends what handling a record produced; the acks resolve when the broker has them.
Send = Callable[[Record, list[OutRecord]], Awaitable[Acks]]
Emitted = Sequence[tuple[Envelope[Any], OutRecord]]


class Outputs:
    """Encodes a handler's outputs into records, enforcing the mesh's size limit."""

    def __init__(self, codec: Codec, max_bytes: int) -> None:
        self.codec, self.max_bytes = codec, max_bytes

    def emitted(self, agent: Agent[Any], event: Envelope[Any], ctx: Context, *,
                traceparent: str | None = None) -> list[tuple[Envelope[Any], OutRecord]]:
        """The emitted outputs of ``ctx`` with their envelopes (derived ids); every one
        carries ``traceparent`` when given (the handler's span)."""
        out = []
        carried = agent.propagated(event.extra_headers)
        for index, emitted in enumerate(ctx.outputs):
            extra, state = carried, None
            if emitted.carried is not None:  # a kept event's, the tracestate apart
                extra = tuple(h for h in emitted.carried if h[0] != TRACESTATE)
                state = next((v.decode() for k, v in emitted.carried if k == TRACESTATE),
                             None)
            if emitted.headers:  # set on this output: over the carried ones of that name
                names = {name for name, _ in emitted.headers}
                extra = (*(h for h in carried if h[0] not in names), *emitted.headers)
            value, fingerprint = self.codec.encode(emitted.topic, emitted.payload)
            if len(value) > self.max_bytes:
                raise PayloadTooLarge(
                    f"Output {index} of {agent.name} to {emitted.topic.name} is {len(value)} "
                    f"bytes, above the limit of {self.max_bytes} "
                    "(MESH_RUNTIME__MAX_MESSAGE_BYTES). Send a reference, not the blob.")
            child = event.child(
                emitted.payload, agent=agent.name, index=index, key=emitted.key,
                extra_headers=extra, schema=fingerprint, correlation_id=emitted.correlation_id,
                causation_id=emitted.causation_id,  # a kept event's, not the input's
                traceparent=traceparent, other_trace=emitted.traceparent, other_state=state)
            out.append((child, OutRecord(emitted.topic.name, value, emitted.key,
                                         tuple(child.headers()))))
        return out


class Outcome(NamedTuple):
    """What happened to one input, for observers (metrics, heartbeats, audit).

    A named tuple rather than the house's frozen dataclass: one is built for every
    input, and a frozen dataclass of 16 fields costs four times as much to build (each
    field through ``object.__setattr__``); it is immutable all the same.
    """

    agent: str
    topic: str
    partition: int
    offset: int
    event_id: str | None
    correlation_id: str | None
    ok: bool
    attempts: int
    duration_s: float
    outputs: int = 0
    error_class: str | None = None
    error: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0  # values produced: outputs and state writes (not audit, dead letters)
    result: str = OK  # as the audit says it: ok, retry (to a retry topic), dead_letter


Observer = Callable[[Outcome], None]


class RecordProcessor:
    """Takes one record of an agent's input to its sent outputs (or its retry record or
    dead letter), with its audit, its trace span and its :class:`Outcome`.

    Args:
        agent: the agent whose handler runs.
        settings: the size limit, the audit and tracing settings.
        codec: decodes the input and encodes the outputs.
        send: sends what one input produced (the shared producer at least once; the
            exactly-once lanes send in the input partition's transaction).
        context: the handler's :class:`~mesh.agent.Context` for an event.
        state_first: send an input's outputs only once its state writes are acknowledged
            (the at-least-once runner, for an agent with ``state_first``; a transaction
            makes both visible together anyway).

    Example:
        >>> processor = RecordProcessor(agent, settings, codec=codec, send=send,
        ...                             context=context)  # doctest: +SKIP
        >>> acks = await processor.process(record)  # doctest: +SKIP
        >>> await acks.wait()  # doctest: +SKIP
    """

    def __init__(self, agent: Agent[Any], settings: MeshSettings, *, codec: Codec, send: Send,
                 context: Callable[[Envelope[Any]], Context],
                 state_first: bool = False) -> None:
        self.agent = agent
        self.codec = codec
        self.send = send
        self.context = context
        self.state_first = state_first
        self.max_bytes = settings.runtime.max_message_bytes
        self.outputs = Outputs(codec, self.max_bytes)
        self.auditor = Auditor(codec, settings.audit, source=agent.name)
        self.tracer = HandlerTracer(settings.tracing)
        self.observers: list[Observer] = []
        self.handled = 0
        self.dead_lettered = 0
        self.retried = 0
        self.invalid_headers = 0  # malformed optional headers, ignored and replaced
        self._warned_headers: set[tuple[str, str]] = set()

    async def process(self, record: Record) -> Acks:
        """Handle one record: its outputs (or its dead letter) are sent; the returned acks
        resolve when the broker has them. Raises ``Held`` when the handler holds."""
        started = time.monotonic()
        try:
            event = await self._decode(record)
        except InputError as exc:
            logger.warning("agent %s: bad input %s[%d]@%d: %s", self.agent.name, record.topic,
                           record.partition, record.offset, exc)
            audit = self._audit(record, None, DEAD_LETTER, started, exc)
            acks = await self.send(record, [*audit, self._dead_letter(record, exc, attempts=1)])
            self._observe(record, None, started, attempts=1, error=exc, outputs=(),
                          result=DEAD_LETTER)
            return acks
        acks, attempts, error, outputs, result = await self._handle(record, event)
        self._observe(record, event, started, attempts=attempts, error=error, outputs=outputs,
                      result=result)
        return acks

    def _observe(self, record: Record, event: Envelope[Any] | None, started: float, *,
                 attempts: int, error: BaseException | None,
                 outputs: Sequence[OutRecord], result: str) -> None:
        if not self.observers:
            return
        outcome = Outcome(
            self.agent.name, record.topic, record.partition, record.offset,
            event.event_id if event else None, event.correlation_id if event else None,
            ok=error is None, attempts=attempts, duration_s=time.monotonic() - started,
            outputs=len(outputs), error_class=type(error).__name__ if error else None,
            error=str(error) if error else None, bytes_in=len(record.value or b""),
            bytes_out=sum(len(r.value or b"") for r in outputs), result=result)
        for observer in self.observers:
            try:
                observer(outcome)
            except Exception:  # an observer must never break processing
                logger.exception("agent %s: observer failed", self.agent.name)

    async def _decode(self, record: Record) -> Envelope[Any]:
        limit = self.max_bytes
        if record.value is None:
            raise DecodeError(f"{record.topic}[{record.partition}]@{record.offset} has no "
                              "value (a tombstone); agents consume events, not deletions.")
        if len(record.value) > limit:
            raise PayloadTooLarge(f"Record of {len(record.value)} bytes is above the limit of "
                                  f"{limit} (MESH_RUNTIME__MAX_MESSAGE_BYTES).")
        problems: list[str] = []
        try:
            payload = await self.codec.decode(self.agent.topic_named(record.topic),
                                              record.value)
        except InputError:  # its headers' problems are reported all the same
            read_headers(record.headers, topic=record.topic, partition=record.partition,
                         offset=record.offset, problems=problems)
            if problems:
                self._bad_headers(record, problems)
            raise
        # One envelope per input: the headers read around the decoded payload.
        event = read_headers(record.headers, topic=record.topic, partition=record.partition,
                             offset=record.offset, key=record.key, problems=problems,
                             payload=payload)
        if problems:
            self._bad_headers(record, problems)
        return event

    def _bad_headers(self, record: Record, problems: list[str]) -> None:
        """Malformed optional headers were replaced: count them, and warn once per topic
        and header (a foreign producer repeats its mistake on every record)."""
        self.invalid_headers += len(problems)
        for problem in problems:
            name = problem.split(":", 1)[0]
            level = logging.DEBUG
            if (record.topic, name) not in self._warned_headers:
                self._warned_headers.add((record.topic, name))
                level = logging.WARNING
            logger.log(level, "agent %s: %s[%d]@%d header %s; ignored and replaced (further "
                       "ones on this topic are counted in mesh_invalid_headers_total)",
                       self.agent.name, record.topic, record.partition, record.offset, problem)

    def _audit(self, record: Record, event: Envelope[Any] | None, outcome: str,
               started: float, error: BaseException | None = None,
               emitted: Emitted = (), ctx: Context | None = None) -> list[OutRecord]:
        """The audit records of one input's handling (sent with its outputs), with what
        the handler noted (``ctx.annotate``)."""
        if not self.auditor.enabled:
            return []
        took = time.monotonic() - started
        return self.auditor.consumed(record, event, outcome=outcome,
                                     started_ms=now_ms() - round(took * 1000),
                                     duration_s=took, error=error, outputs=emitted,
                                     details=None if ctx is None else ctx.details)

    async def _handle(self, record: Record, event: Envelope[Any]
                      ) -> tuple[Acks, int, BaseException | None, list[OutRecord], str]:
        """Run the handler: a retriable failure goes to the retry topic (or, with a
        blocking policy, is retried in place); returns the acks, the attempts made here,
        the final error (None on success), the output records (with state writes) and
        the result (ok, retry or dead_letter, as the audit names it).
        Every attempt is audited, with the outputs of the last."""
        policy = self.agent.retry
        in_place = policy.attempts if policy.blocking else 1
        first_failure: int | None = None
        earlier: list[OutRecord] = []  # audits of failed in-place attempts
        for attempt in range(1, in_place + 1):
            tried = time.monotonic()
            this = event if attempt == 1 else replace(event, attempt=event.attempt + attempt - 1)
            ctx = self.context(this)
            try:
                with self.tracer.span(self.agent.name, record.topic, this) as traceparent:
                    result = await self.agent.handle(event.payload, ctx)
                    for topic, payload in self.agent.outputs_of(result):
                        ctx.emit(topic, payload)
                    emitted = self.outputs.emitted(self.agent, event, ctx,
                                                   traceparent=traceparent)
                records = [r for _, r in emitted] + ctx.commit_state()
            except Held:
                raise  # not a failure: the lane holds the input and tries again later
            except Exception as exc:  # user code: classify, retry or dead-letter
                first_failure = first_failure or now_ms()
                if policy.retries(exc) and attempt < in_place:
                    logger.info("agent %s attempt %d failed (%s), retrying", self.agent.name,
                                attempt, exc)
                    earlier += self._audit(record, this, RETRY, tried, exc, ctx=ctx)
                    await asyncio.sleep(policy.delay_ms(attempt) / 1000)
                    continue
                if (policy.retries(exc) and not policy.blocking
                        and event.attempt < policy.attempts):
                    acks = await self._to_retry_topic(record, this, tried, exc, ctx)
                    return acks, attempt, exc, [], RETRY
                logger.warning("agent %s failed on %s[%d]@%d after %d attempt(s): %s: %s",
                               self.agent.name, record.topic, record.partition, record.offset,
                               attempt, type(exc).__name__, exc)
                total = event.attempt + attempt - 1
                acks = await self._failed(
                    record, event, exc, attempts=total, first_failure_ms=first_failure,
                    audit=functools.partial(self._failure_audit, record, this, tried, exc,
                                            earlier, ctx=ctx))
                return acks, attempt, exc, [], DEAD_LETTER
            self.handled += 1
            audit = earlier + self._audit(record, this, OK, tried, emitted=emitted, ctx=ctx)
            return (await self._send_produced(record, records, len(emitted), audit),
                    attempt, None, records, OK)
        raise AssertionError("unreachable: the last attempt returns or dead-letters")

    async def _send_produced(self, record: Record, records: list[OutRecord], outputs: int,
                             rest: list[OutRecord]) -> Acks:
        """Send what a handler (or failure handler) produced: ``records``, its first
        ``outputs`` outputs and then its state writes, with ``rest`` (audit records, a
        dead letter). With ``state_first``, when there are both, the state writes go
        alone and the rest once the broker has them; a failed state write sends nothing
        more: its acks fail the input as any failed ack does (the lane stops, the input
        is not committed, the next owner handles it again), and nothing it caused was
        seen."""
        if not (self.state_first and 0 < outputs < len(records)):
            return await self.send(record, records + rest)
        written = await self.send(record, records[outputs:])
        try:
            await written.wait()
        except TransportError:
            return written
        return written + await self.send(record, records[:outputs] + rest)

    async def _to_retry_topic(self, record: Record, event: Envelope[Any], tried: float,
                              error: Exception, ctx: Context) -> Acks:
        """Send the input to the agent's next retry topic, with its audit."""
        logger.info("agent %s attempt %d failed (%s): to the retry topic",
                    self.agent.name, event.attempt, error)
        self.retried += 1
        policy = self.agent.retry
        return await self.send(record, [
            retry.retry_record(record, error, policy=policy, attempt=event.attempt,
                               group=self.agent.group),
            *self._audit(record, event, RETRY, tried, error, ctx=ctx)])

    def _failure_audit(self, record: Record, event: Envelope[Any], tried: float,
                       error: BaseException, earlier: list[OutRecord],
                       emitted: Emitted, *, ctx: Context) -> list[OutRecord]:
        """The audit of an input failing for good (after ``earlier`` in-place attempts),
        listing what its failure handler emitted."""
        return [*earlier, *self._audit(record, event, DEAD_LETTER, tried, error, emitted,
                                       ctx)]

    async def _failed(self, record: Record, event: Envelope[Any], error: BaseException, *,
                      attempts: int, first_failure_ms: int | None = None,
                      audit: Callable[[Emitted], list[OutRecord]]) -> Acks:
        """An input that failed for good: the agent's failure handler may emit (e.g. a
        ``ChainFailed``), then the input goes to the dead-letter topic; ``audit`` gives
        the failure's audit records, listing what the failure handler emitted."""
        ctx = self.context(event)
        records: list[OutRecord] = []
        emitted: list[tuple[Envelope[Any], OutRecord]] = []
        try:
            await self.agent.on_failure(event.payload, ctx, error)
            emitted = self.outputs.emitted(self.agent, event, ctx)
            records = [r for _, r in emitted] + ctx.commit_state()
        except Exception:  # the failure handler failed too: the dead letter still goes
            logger.exception("agent %s: on_failure raised", self.agent.name)
        return await self._send_produced(record, records, len(emitted), [
            *audit(emitted), self._dead_letter(record, error, attempts=attempts,
                                               first_failure_ms=first_failure_ms)])

    def _dead_letter(self, record: Record, error: BaseException, *, attempts: int,
                     first_failure_ms: int | None = None) -> OutRecord:
        """The dead letter of ``record`` (counted), to send with what else it produced."""
        self.dead_lettered += 1
        return dead_letter(record, error, agent=self.agent.name, attempts=attempts,
                           first_failure_ms=first_failure_ms)
