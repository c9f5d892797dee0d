"""Parallel fan-out / fan-in: branches answer one request, a gather stage merges them.

Fan-out is wiring: :func:`branch` agents consume one request topic, each in its own
group, and answer with a :class:`Part` (result, or failure naming agent and error) keyed
by correlation id. Fan-in is a :class:`Gather`: it consumes the requests (which branches,
what deadline) and the parts, and emits one :class:`Merged` event per request when its
:class:`GatherRule` is decided (all, any, k of n, first valid) or the deadline passes (silent
branches listed as timed out). Failures are listed, a merger builds ``merged_output``,
late parts are counted, never merged; taps follow the events topic.

**One log per request.** Every decision about a correlation id is made in its partition
of the parts topic, in log order: the request handler only appends a ``request`` marker
there, the timer ``deadline``/``expire`` markers, and reading its own merged event back
a ``merged`` marker. Only the parts handler writes the state (a compacted topic keyed by
correlation id), so no key is written from two replicas although aiokafka's round-robin
assignor does not co-partition topics. A part before its request waits for the marker;
a deadline marker lands after every part already logged (a lagging gather never times
out an answer it had not read yet).

**One trace per request.** The row keeps the event id, traceparent and carried headers
(``tracestate``, a tenant id) of the request marker (of the first part, until the
request comes), and the timer's ``deadline``/``expire`` markers act for it: they
continue its trace with its headers and their ``mesh-causation`` names it. So a merged
event decided by the deadline, and the expiry of a row, stay in the trace of the
request they answer, and following causation from the request reaches them
(request -> request marker -> deadline marker -> merged event), never the timer's own
tick, which is in no topic.

**Crashes.** Applied inputs are recorded by event id: a redelivered one re-emits what it
emitted (same ids), changes nothing. A done marker keeps the merged event until it is
read back, then only recognises late parts; ``retention_s`` later it is a tombstone.

Example:
    >>> topics = GatherTopics.named("research", Question)  # doctest: +SKIP
    >>> web = branch("web", search, topics=topics)  # doctest: +SKIP
    >>> fan_in = Gather("research-gather", topics=topics, branches=[web, "db"])  # doctest: +SKIP

One module although over 500 lines: the fan-in's models, rule and transitions share
one state row; apart, each half would import the other's internals.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_core import to_jsonable_python

from mesh.agent import Agent, Context
from mesh.errors import ConfigError, is_retriable
from mesh.topic import Topic, TopicBundle

logger = logging.getLogger(__name__)

PartKind = Literal["part", "request", "deadline", "merged", "expire"]
EventKind = Literal["started", "part_received", "part_ignored", "late_part", "completed",
                    "timed_out", "expired"]
Worker = Callable[[Any], Any]  # (request) -> result, sync or async
Merger = Callable[[list[Any]], Any]  # (results of the successes) -> output, sync or async
Validator = Callable[[Any], Any]  # (result) -> bool, sync or async


class Part(BaseModel):
    """A branch's answer (``kind="part"``: ``result``, or ``ok=False`` and ``error``), or
    a gather's own marker (``request``, ``deadline``, ``merged``, ``expire``)."""

    correlation_id: str
    agent: str
    ok: bool = True
    result: Any = None
    error: str | None = None
    error_class: str | None = None
    kind: PartKind = "part"
    expected: list[str] = Field(default_factory=list)
    deadline_at_ms: int | None = None


class Failure(BaseModel):
    """A failed part (or a failed merge) in a merged event."""

    agent: str
    error: str
    error_class: str | None = None


class Merged(BaseModel):
    """The one event a gather emits per request: the seed's shape (``individual_results[i]``
    is the result of ``successes[i]``) plus the rule, the outcome and who timed out."""

    correlation_id: str
    gather: str
    rule: str
    outcome: Literal["completed", "timed_out"]
    success: bool
    merged_output: Any = None
    individual_results: list[Any] = Field(default_factory=list)
    successes: list[str] = Field(default_factory=list)
    failures: list[Failure] = Field(default_factory=list)
    timed_out: list[str] = Field(default_factory=list)


class GatherEvent(BaseModel):
    """What a gather did for a request, for taps."""

    correlation_id: str
    gather: str
    kind: EventKind
    agent: str | None = None
    ok: bool | None = None
    detail: str = ""
    at_ms: int = 0


class GatherState(BaseModel):
    """The gather's row for one correlation id (the compacted state topic's value)."""

    correlation_id: str
    partition: int  # of the parts topic: the timer acts only where it owns it
    created_ms: int
    status: Literal["pending", "done"] = "pending"
    requested: bool = False
    expected: list[str] = Field(default_factory=list)
    deadline_at_ms: int | None = None
    received: list[Part] = Field(default_factory=list)  # pending: the parts so far
    applied: list[str] = Field(default_factory=list)  # event ids of the inputs applied
    answered: list[str] = Field(default_factory=list)  # done: agents whose parts count
    late: list[str] = Field(default_factory=list)  # done: agents that answered too late
    completed_by: str | None = None
    completed_ms: int | None = None
    merged: Merged | None = None  # kept until read back from the merged topic
    traceparent: str | None = None  # of the request: the timer's markers continue it
    carried: dict[str, bytes] | None = None  # the request's tracestate and headers, too
    request_event_id: str | None = None  # of the same record: the timer's markers' cause


@dataclass(frozen=True, slots=True)
class GatherRule:
    """When a gather is decided, and whether it succeeded: ``GatherRule("all")`` (every
    branch answered; success if none failed), ``GatherRule("any")`` (the first success;
    fails once all failed), ``GatherRule.k_of_n(k)`` (``k`` successes; fails once out of
    reach) and ``GatherRule.first_valid(validator)`` (the first success it accepts;
    rejected ones are listed as failures). A gather also takes the plain names ``"all"``
    and ``"any"``. (Not the delegation planner's ``Rule``, which picks a plan.)

    Example:
        >>> GatherRule.k_of_n(2).decided(expected=3, ok=2, answered=2)
        True
        >>> GatherRule("all").label(), GatherRule.k_of_n(2).label(3)
        ('all', '2 of 3')
    """

    kind: Literal["all", "any", "k_of_n", "first_valid"] = "all"
    k: int = 1
    validator: Validator | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("all", "any", "k_of_n", "first_valid"):
            raise ConfigError(f"GatherRule {self.kind!r} is not known: use all, any, "
                              "k_of_n or first_valid.")
        if self.k < 1:
            raise ConfigError(f"GatherRule k_of_n needs k >= 1, got {self.k}.")
        if (self.kind == "first_valid") != (self.validator is not None):
            raise ConfigError("A validator goes with rule first_valid, and only with it: "
                              "use GatherRule.first_valid(validator).")

    @classmethod
    def k_of_n(cls, k: int) -> GatherRule:
        return cls("k_of_n", k=k)

    @classmethod
    def first_valid(cls, validator: Validator) -> GatherRule:
        return cls("first_valid", validator=validator)

    def label(self, expected: int | None = None) -> str:
        """``all``, ``any``, ``first_valid``, or ``2 of 3`` (``2 of n`` without a count)."""
        return f"{self.k} of {expected or 'n'}" if self.kind == "k_of_n" else self.kind

    def decided(self, *, expected: int, ok: int, answered: int) -> bool:
        """Whether no further part can change the outcome."""
        if self.kind == "k_of_n":
            return ok >= self.k or ok + (expected - answered) < self.k
        if self.kind == "all":
            return answered >= expected
        return ok >= 1 or answered >= expected

    def satisfied(self, *, expected: int, ok: int, answered: int) -> bool:
        """Whether the parts so far make a success."""
        if self.kind == "all":
            return answered >= expected and ok >= expected
        return ok >= (self.k if self.kind == "k_of_n" else 1)


def concat(results: list[Any]) -> list[Any]:
    """The default merger: list results are concatenated, others appended.

    Example:
        >>> concat([[1, 2], {"a": 1}, [3]])
        [1, 2, {'a': 1}, 3]
    """
    return [item for r in results for item in (r if isinstance(r, list) else [r])]


@dataclass(frozen=True, slots=True)
class GatherTopics(TopicBundle):
    """The topics of one fan-out / fan-in; :meth:`named` builds a consistent set.

    Example:
        >>> GatherTopics.named("research", Question).parts.name  # doctest: +SKIP
        'research.parts'
    """

    requests: Topic[Any]
    parts: Topic[Part]
    merged: Topic[Merged]
    events: Topic[GatherEvent]
    state: Topic[GatherState]

    @classmethod
    def named(cls, prefix: str, request_model: type[BaseModel], *, key: str | None = None,
              partitions: int = 3) -> GatherTopics:
        """``<prefix>.requests`` (keyed by ``key``), ``.parts``, ``.merged``,
        ``.gather-events`` and the compacted ``.gather-state``, keyed by correlation id."""
        def by_id(name: str, model: type[BaseModel], compacted: bool = False) -> Topic[Any]:
            return Topic(f"{prefix}.{name}", model, key="correlation_id",
                         partitions=partitions, compacted=compacted)
        return cls(Topic(f"{prefix}.requests", request_model, key=key, partitions=partitions),
                   by_id("parts", Part), by_id("merged", Merged),
                   by_id("gather-events", GatherEvent), by_id("gather-state", GatherState, True))

    def all(self) -> list[Topic[Any]]:
        """Every topic, for ``apply_topics``."""
        return [self.requests, self.parts, self.merged, self.events, self.state]


async def _settle(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def branch(name: str, worker: Worker, *, topics: GatherTopics, group: str | None = None,
           description: str = "") -> Agent[Any]:
    """A fan-out branch: ``worker(request)`` (sync or async) answers with a :class:`Part`.

    Consumes ``topics.requests`` in its own group (default ``name``); the part is keyed
    by correlation id, with the runtime's deterministic event id. A retriable error is
    retried (through the branch's retry topics by default); when retries run out (the
    runtime also dead-letters the request) or the error is not retriable, the part says
    ``ok=False`` with the error.

    Example:
        >>> web = branch("web", lambda q: {"findings": [q.text]}, topics=topics)  # doctest: +SKIP
    """
    def failed(ctx: Context, error: BaseException) -> Part:
        return Part(correlation_id=ctx.correlation_id, agent=name, ok=False,
                    error=str(error) or type(error).__name__, error_class=type(error).__name__)

    async def handle(request: Any, ctx: Context) -> Part:
        try:
            result = to_jsonable_python(await _settle(worker(request)))
        except Exception as exc:
            if is_retriable(exc):
                raise  # retried by the runtime, then on_failure below
            ctx.logger.info("branch %s failed: %s: %s", name, type(exc).__name__, exc)
            return failed(ctx, exc)
        return Part(correlation_id=ctx.correlation_id, agent=name, result=result)

    async def on_failure(request: Any, ctx: Context, error: BaseException) -> None:
        ctx.emit(topics.parts, failed(ctx, error))

    return Agent(name, consumes=topics.requests, produces=topics.parts, handler=handle,
                 on_failure=on_failure, group=group, description=description or "branch")


class Gather(Agent[Any]):
    """The fan-in stage (see the module docstring).

    Args:
        name: the agent name; its markers and merged events carry it.
        topics: requests, parts, merged, events and state topics.
        branches: the expected branch names (or agents), or ``(request) -> names``.
        rule: a :class:`GatherRule`, or ``"all"`` (default) / ``"any"``.
        deadline_s: the default deadline, from the request's production time.
        deadline_of: ``(request) -> seconds | None``, a per-request override.
        merger: ``(results) -> merged_output``, sync or async (default :func:`concat`);
            an error of it is listed as a failure of the gather.
        retention_s: how long done markers (and parts whose request never came) stay.
        check_every_s: the timer's period for deadlines and retention.
        group: consumer group (default ``name``).
    """

    def __init__(self, name: str, *, topics: GatherTopics,
                 branches: Sequence[str | Agent[Any]] | Callable[[Any], Sequence[str]],
                 rule: GatherRule | str = "all", deadline_s: float = 60.0,
                 deadline_of: Callable[[Any], float | None] | None = None,
                 merger: Merger = concat, retention_s: float = 3600.0,
                 check_every_s: float = 1.0, group: str | None = None,
                 description: str = "") -> None:
        for topic, model in ((topics.parts, Part), (topics.merged, Merged),
                             (topics.events, GatherEvent), (topics.state, GatherState)):
            if topic.model is not model or topic.key != "correlation_id":
                raise ConfigError(f"Gather topic {topic.name!r} must carry {model.__name__} "
                                  "keyed by 'correlation_id'; fix its declaration.")
        self.rule = (rule if isinstance(rule, GatherRule)
                     else GatherRule(rule))  # type: ignore[arg-type]
        if deadline_s <= 0 or retention_s <= 0:
            raise ConfigError(f"Gather {name!r}: deadline_s ({deadline_s}) and retention_s "
                              f"({retention_s}) must be positive.")
        super().__init__(name, consumes=[topics.requests, topics.parts, topics.merged],
                         produces=[topics.parts, topics.merged, topics.events],
                         state=[topics.state], group=group,
                         description=description or f"gather ({self.rule.label()})")
        if callable(branches):
            self._branches: Callable[[Any], Sequence[str]] = branches
        else:
            names = [b.name if isinstance(b, Agent) else b for b in branches]
            if not names or (self.rule.kind == "k_of_n" and self.rule.k > len(names)):
                raise ConfigError(f"Gather {name!r} expects branches {names} with rule "
                                  f"{self.rule.label()}: name at least one (and k at most "
                                  "as many as there are branches).")
            self._branches = lambda _request: names
        self.topics, self.deadline_s, self.deadline_of = topics, deadline_s, deadline_of
        self.merger, self.retention_s = merger, retention_s
        self._sent: dict[str, tuple[str, float]] = {}  # timer markers: cid -> (kind, when)
        self._resend_s = max(30.0, 10 * check_every_s)
        self.every(check_every_s)(self._tick)

    async def handle(self, payload: Any, ctx: Context) -> None:
        if ctx.event.topic == self.topics.requests.name:
            self._forward_request(payload, ctx)
        elif ctx.event.topic == self.topics.merged.name:
            if payload.gather == self.name:  # our merged event is stored: shrink the row
                self._marker(ctx, payload.correlation_id, "merged")
        elif payload.kind == "part" or payload.agent == self.name:
            await _Turn(self, ctx, payload).run()

    def _forward_request(self, request: Any, ctx: Context) -> None:
        """Append a request marker to the parts topic (no state here: see the module)."""
        expected = list(dict.fromkeys(str(b) for b in self._branches(request)))
        if not expected:
            raise ConfigError(f"Gather {self.name!r}: no branches expected for request "
                              f"{ctx.correlation_id!r}. Make branches= name at least one.")
        override = self.deadline_of(request) if self.deadline_of else None
        seconds = self.deadline_s if override is None else override
        ctx.emit(self.topics.parts, Part(
            correlation_id=ctx.correlation_id, agent=self.name, kind="request",
            expected=expected, deadline_at_ms=ctx.event.produced_at_ms + int(seconds * 1000)))

    def _marker(self, ctx: Context, cid: str, kind: PartKind, *,
                row: GatherState | None = None) -> None:
        """Append a marker; from the timer, ``row`` names the record it acts for."""
        ctx.emit(self.topics.parts, Part(correlation_id=cid, agent=self.name, kind=kind),
                 correlation_id=cid, traceparent=row.traceparent if row else None,
                 carried=row.carried if row else None,
                 causation_id=row.request_event_id if row else None)

    async def _tick(self, ctx: Context) -> None:
        """Append deadline and expire markers for the rows of owned partitions."""
        now_ms, now = int(time.time() * 1000), time.monotonic()
        table = ctx.table(self.topics.state)
        for cid, row in list(table.items()):
            kind = self._due(row, now_ms)
            if kind is None or not ctx.owns(self.topics.parts, row.partition):
                continue
            sent = self._sent.get(cid)  # one marker per row and kind, unless long ignored
            if sent is None or sent[0] != kind or now - sent[1] > self._resend_s:
                self._sent[cid] = (kind, now)
                # On behalf of the request: in its trace, caused by its marker.
                self._marker(ctx, cid, kind, row=row)
        for cid in [c for c in self._sent if c not in table]:
            del self._sent[cid]

    def _due(self, row: GatherState, now_ms: int) -> PartKind | None:
        retention_ms = int(self.retention_s * 1000)
        if row.status == "done":
            return "expire" if (row.completed_ms or 0) + retention_ms <= now_ms else None
        if not row.requested:
            return "expire" if row.created_ms + retention_ms <= now_ms else None
        return "deadline" if (row.deadline_at_ms or 0) <= now_ms else None


class _Turn:
    """One part or marker applied to a row. Outputs keep one order (the input's event,
    the merged event, the outcome event): a redelivery re-emits them under the same ids."""

    def __init__(self, gather: Gather, ctx: Context, part: Part) -> None:
        self.gather, self.ctx, self.part = gather, ctx, part
        self.cid = part.correlation_id
        self.row: GatherState | None = ctx.get(gather.topics.state, self.cid)

    async def run(self) -> None:
        row, kind = self.row, self.part.kind
        if row is not None and self.ctx.event_id in row.applied:
            self._again(row)
        elif kind == "part":
            await self._on_part(row)
        elif kind == "request":
            await self._on_request(row)
        elif row is None:
            return  # a marker for a row gone (expired) or never made
        elif kind == "deadline" and row.status == "pending" and row.requested:
            await self._complete(row, timed_out=True)
        elif kind == "merged" and row.merged is not None:
            self._save(row.model_copy(update={"merged": None}))
        elif kind == "expire" and (row.status == "done" or not row.requested):
            self._event("expired", f"{len(row.received)} part(s) dropped: no request came"
                        if row.status == "pending" else f"{len(row.late)} late part(s)")
            self.ctx.delete(self.gather.topics.state, self.cid)

    def _event(self, kind: EventKind, detail: str = "", *, part: Part | None = None) -> None:
        self.ctx.emit(self.gather.topics.events, GatherEvent(
            correlation_id=self.cid, gather=self.gather.name, kind=kind, detail=detail,
            agent=part.agent if part else None, ok=part.ok if part else None,
            at_ms=self.ctx.event.produced_at_ms), correlation_id=self.cid)

    def _save(self, row: GatherState, *, applied: bool = False) -> GatherState:
        me = self.ctx.event_id
        if applied and me not in row.applied:
            row = row.model_copy(update={"applied": [*row.applied, me]})
        self.ctx.put(self.gather.topics.state, self.cid, row)
        return row

    def _again(self, row: GatherState) -> None:
        """A redelivery of an applied input: the same outputs, nothing changed."""
        p = self.part
        if p.kind == "part":
            self._event("late_part" if p.agent in row.late else "part_received",
                        p.error or "", part=p)
        elif p.kind == "request":
            self._event("started", ", ".join(row.expected))
        if row.completed_by == self.ctx.event_id and row.merged is not None:
            self._emit_merged(row.merged)

    async def _on_part(self, row: GatherState | None) -> None:
        p = self.part
        if row is None:  # before its request: kept until the request marker comes
            self._event("part_received", p.error or "", part=p)
            self._save(GatherState(correlation_id=self.cid, partition=self.ctx.event.partition
                                   or 0, created_ms=self.ctx.event.produced_at_ms,
                                   received=[await self._receive()],
                                   traceparent=self.ctx.traceparent,
                                   carried=self.ctx.carried,
                                   request_event_id=self.ctx.event_id), applied=True)
        elif row.status == "done":
            if p.agent in row.expected and p.agent not in row.answered + row.late:
                logger.info("gather %s: %s answered %s after completion: counted, ignored",
                            self.gather.name, p.agent, self.cid)
                self._event("late_part", p.error or "", part=p)
                self._save(row.model_copy(update={"late": [*row.late, p.agent]}), applied=True)
        elif any(r.agent == p.agent for r in row.received):
            return  # the same branch again (a duplicate request): its first part counts
        elif row.requested and p.agent not in row.expected:
            self._event("part_ignored", f"{p.agent} is not an expected branch", part=p)
        else:
            self._event("part_received", p.error or "", part=p)
            received = [*row.received, await self._receive()]
            await self._complete(row.model_copy(update={"received": received}))

    async def _receive(self) -> Part:
        """The part as held: with rule first_valid, a rejected result is a failure."""
        p, validator = self.part, self.gather.rule.validator
        if not p.ok or validator is None:
            return p
        try:
            valid, why = bool(await _settle(validator(p.result))), ""
        except Exception as exc:  # a validator bug rejects the part, visibly
            valid, why = False, f"validator raised {type(exc).__name__}: {exc}"
        name = getattr(validator, "__name__", "validator")
        return p if valid else p.model_copy(update={
            "ok": False, "error_class": "Rejected", "error": why or f"rejected by {name}"})

    async def _on_request(self, row: GatherState | None) -> None:
        p = self.part
        if row is not None and (row.requested or row.status == "done"):
            return  # the same correlation id requested again: one merged event per id
        base = row or GatherState(correlation_id=self.cid, partition=self.ctx.event.partition
                                  or 0, created_ms=self.ctx.event.produced_at_ms)
        self._event("started", ", ".join(p.expected))
        await self._complete(base.model_copy(update={
            "requested": True, "expected": p.expected, "deadline_at_ms": p.deadline_at_ms,
            "received": [r for r in base.received if r.agent in p.expected],
            "traceparent": self.ctx.traceparent, "carried": self.ctx.carried,
            "request_event_id": self.ctx.event_id,
        }))
        for ignored in (r for r in base.received if r.agent not in p.expected):
            self._event("part_ignored", f"{ignored.agent} is not an expected branch",
                        part=ignored)

    async def _complete(self, row: GatherState, *, timed_out: bool = False) -> None:
        """Save ``row`` as this input left it: done, with the merged event emitted, if
        the request is decided by the rule (or by the deadline), else as it is. One state
        write per input: a crash between two writes of one input (they may go in two
        produce requests) would leave a row that its redelivery, already applied, never
        completes."""
        gather, rule = self.gather, self.gather.rule
        wins = [r for r in row.received if r.ok]
        if not timed_out and not (row.requested and rule.decided(
                expected=len(row.expected), ok=len(wins), answered=len(row.received))):
            self._save(row, applied=True)
            return
        failures = [Failure(agent=r.agent, error=r.error or "failed", error_class=r.error_class)
                    for r in row.received if not r.ok]
        answered = [r.agent for r in row.received]
        output, merge_failure = None, None
        try:
            output = to_jsonable_python(await _settle(gather.merger([r.result for r in wins])))
        except Exception as exc:  # user code: the merge failed, the request still ends
            merge_failure = Failure(agent=gather.name, error_class=type(exc).__name__, error=(
                f"merger {getattr(gather.merger, '__name__', 'merger')} failed: {exc}"))
        merged = Merged(
            correlation_id=self.cid, gather=gather.name, rule=rule.label(len(row.expected)),
            outcome="timed_out" if timed_out else "completed",
            success=merge_failure is None and rule.satisfied(
                expected=len(row.expected), ok=len(wins), answered=len(answered)),
            merged_output=output, successes=[r.agent for r in wins],
            individual_results=[r.result for r in wins],
            failures=failures + ([merge_failure] if merge_failure else []),
            timed_out=[a for a in row.expected if a not in answered] if timed_out else [])
        self._emit_merged(merged)
        self._save(row.model_copy(update={
            "status": "done", "received": [], "answered": answered, "merged": merged,
            "completed_by": self.ctx.event_id, "completed_ms": self.ctx.event.produced_at_ms,
        }), applied=True)

    def _emit_merged(self, merged: Merged) -> None:
        self.ctx.emit(self.gather.topics.merged, merged, correlation_id=self.cid)
        self._event(merged.outcome, f"{len(merged.successes)} ok, {len(merged.failures)} "
                    f"failed, {len(merged.timed_out)} timed out; success={merged.success}")
