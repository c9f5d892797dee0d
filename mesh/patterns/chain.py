"""Sequential chains: step A's output is step B's input, one agent per step, one topic
per hop.

``Chain(name, steps=[...])`` turns a list of steps (``async (input, ctx) -> output``
functions, or agents whose handlers return their output) into agents wired through
per-step topics::

    <name>.requests  -> step 0 -> <name>.step1 -> step 1 -> ... -> <name>.completed
                                          (any step that fails for good) -> <name>.failed
    every step: started / finished / failed                   -> <name>.events

**Where the history lives: it travels with the event.** Each hop carries a
:class:`ChainHop` with the chain's input and every step output so far, and the last
step appends its own and emits :class:`ChainCompleted` with all of them. So a step
needs no state table, a replay after a crash recomputes exactly what it did before, a
failing step has its partial results in hand when it reports :class:`ChainFailed`, and
any tap of one hop topic sees a whole workflow's past.

**A step sees the whole history when it asks for it.** A step function's first
argument is the previous step's output (typed by its annotation); a step that takes a
third argument gets a :class:`ChainHistory` in it: the chain's ``input``, every earlier
``outputs``, ``previous_output``, ``output(step)`` (by index or name, typed back into
the step's model) and ``as_dict()``, the seed's accumulated dict (the input's fields,
``step_<i>_output`` for each earlier step, ``previous_output``; ``i`` is the step's
0-based index, as the seed's ``enumerate`` numbers it: ``step_0_output`` is the first
step's)::

    async def review(draft: Draft, ctx: Context, history: ChainHistory) -> Review:
        findings = history.output("research")     # a Findings, two steps back
        ...

An agent used as a step keeps its ``(payload, ctx)`` handler (the same agent may run
on its own, outside any chain) and asks its context instead: ``ChainHistory.of(ctx)``
gives the same history to any step while it handles its input, and raises
:class:`~mesh.errors.ConfigError` outside a chain::

    @agent(consumes=drafts, produces=reviews)
    async def reviewer(draft: Draft, ctx: Context) -> Review:
        findings = ChainHistory.of(ctx).output("research")
        ...

Steps with two arguments work as before. The price: an event grows with
every step, and the whole history counts against ``MESH_RUNTIME__MAX_MESSAGE_BYTES``
(send references to large blobs, not the blobs). Outputs travel as JSON (Avro strings
marked ``mesh.json``) because each step has its own model; :meth:`Chain.output` turns
one back into the step's declared model.

Kafka semantics: one step = one agent = one consumer group (replicas share it). Every
hop topic is keyed by the chain's key (the request's record key, else its correlation
id), so the steps of one key run in the order the requests arrived. A step that
raises a retriable error is retried (the step agent's ``RetryPolicy``: through retry
topics by default; ``blocking=True`` keeps per-key order); one that fails for good
emits one ``ChainFailed`` (naming the step's index, name and agent, the error and the
partial results) and its input goes to the hop's ``.dlq``; that
correlation id reaches nothing further, and other keys keep flowing. Delivery is
at-least-once with deterministic event ids: a replayed step emits the same ids, so
consumers of ``completed``/``failed``/``events`` dedup by ``mesh-event-id``.

Step events: ``started`` for step k+1 is produced with the hop that hands it the work
(a tap sees a long step as running); step 0's ``started`` comes with its outcome, since
its input comes from outside. ``finished`` and ``failed`` come with the step's outcome.
(Over 300 lines: the chain's four event models and its step adapter belong with it.)

Example:
    >>> class Topic_(BaseModel):
    ...     request_id: str
    ...     subject: str
    >>> async def research(req: Topic_, ctx: Context) -> dict:
    ...     return {"facts": [req.subject]}
    >>> async def summarise(found: dict, ctx: Context) -> str:
    ...     return "; ".join(found["facts"])
    >>> chain = Chain("notes", [research, summarise], key="request_id")
    >>> [a.name for a in chain.agents], [t.name for t in chain.hops]
    (['notes.research', 'notes.summarise'], ['notes.step1'])
"""

from __future__ import annotations

import inspect
import logging
import typing
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from mesh.agent import Agent, App, Context
from mesh.envelope import now_ms
from mesh.errors import ConfigError, HandlerError
from mesh.serde.avro import json_data
from mesh.topic import Topic

logger = logging.getLogger(__name__)

StepFunction = Callable[..., Awaitable[Any]]  # (input, ctx) or (input, ctx, history)
StepStatus = Literal["started", "finished", "failed"]
_ERROR_CHARS = 2000
# The step running in this task, with its context and history, for ChainHistory.of(ctx):
# the Context is the runtime's, so the chain keeps the history beside it, set while
# the step runs (each input is handled in a task of its own).
_RUNNING: ContextVar[tuple[Context, ChainHistory] | None] = ContextVar(
    "mesh_chain_step", default=None)


class StepOutput(BaseModel):
    """What step ``index`` produced (as JSON), and when it ran (epoch ms)."""

    index: int
    step: str
    agent: str
    model: str | None = None
    output: Any = None
    started_at_ms: int
    finished_at_ms: int


class ChainHop(BaseModel):
    """The work handed to step ``step``: the chain's input and every output so far."""

    chain: str
    key: str
    step: int
    input: Any = None
    outputs: list[StepOutput] = Field(default_factory=list)


class ChainCompleted(BaseModel):
    """A chain that ran every step: ``outputs`` in step order, ``result`` the last one."""

    chain: str
    key: str
    correlation_id: str
    input: Any = None
    outputs: list[StepOutput]
    result: Any = None


class ChainFailed(BaseModel):
    """A chain stopped by a step that failed for good (after its retries)."""

    chain: str
    key: str
    correlation_id: str
    failed_step: int
    failed_step_name: str
    failed_agent: str
    error_class: str
    error: str
    input: Any = None
    partial_results: list[StepOutput] = Field(default_factory=list)


class ChainStepEvent(BaseModel):
    """A step started, finished or failed, for taps and dashboards."""

    chain: str
    key: str
    correlation_id: str
    step: int
    step_name: str
    agent: str
    status: StepStatus
    at_ms: int
    error_class: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ChainHistory:
    """What ran before a step: the chain's input and every earlier step's output, the
    third argument of a step function that takes one, or ``ChainHistory.of(ctx)`` in
    any step (an agent's handler too; see the module docstring).

    It is the history that travels with the event (no lookup, no state): a replay sees
    the same history. Outputs are JSON data; :meth:`output` types them back.

    Example:
        >>> first = StepOutput(index=0, step="research", agent="notes.research",
        ...                    output={"facts": ["a"]}, started_at_ms=1, finished_at_ms=2)
        >>> history = ChainHistory("notes", {"subject": "kafka"}, (first,))
        >>> history.previous_output, history.output("research")
        ({'facts': ['a']}, {'facts': ['a']})
        >>> sorted(history.as_dict())
        ['previous_output', 'step_0_output', 'subject']
    """

    chain: str
    input: Any
    outputs: tuple[StepOutput, ...] = ()
    models: tuple[type[BaseModel] | None, ...] = ()  # each step's output model, by index

    @classmethod
    def of(cls, ctx: Context) -> ChainHistory:
        """The history of the chain step handling ``ctx``'s input, for a step that takes
        no third argument (an agent's ``(payload, ctx)`` handler). Call it while the step
        runs, with the context it was given.

        Example:
            >>> async def reviewer(draft: Draft, ctx: Context) -> Review:  # doctest: +SKIP
            ...     findings = ChainHistory.of(ctx).output("research")
        """
        found = _RUNNING.get()
        if found is None or found[0] is not ctx:
            raise ConfigError(
                f"Agent {ctx.agent.name!r} is not running as a chain step, so its context "
                "carries no chain history. Call ChainHistory.of(ctx) from a step of a Chain "
                "(with the ctx the step was given, before it returns).")
        return found[1]

    @property
    def previous_output(self) -> Any:
        """The previous step's output (JSON), or None at the first step."""
        return self.outputs[-1].output if self.outputs else None

    def output(self, step: int | str) -> Any:
        """An earlier step's output, by index or step name, as the step's output model
        if it declares one (else JSON data)."""
        found = next((o for o in self.outputs if step in (o.index, o.step)), None)
        if found is None:
            ran = ", ".join(f"{o.index} ({o.step})" for o in self.outputs) or "none"
            raise ConfigError(f"Chain {self.chain!r}: no output of step {step!r} before this "
                              f"step; the earlier steps are {ran}. Ask for one of them.")
        model = self.models[found.index] if found.index < len(self.models) else None
        return model.model_validate(found.output) if model is not None else found.output

    def as_dict(self) -> dict[str, Any]:
        """The seed's accumulated input: the chain input's fields (or ``input``), then
        ``step_<i>_output`` per earlier step (``i`` its 0-based index, as in the seed)
        and ``previous_output``."""
        merged = dict(self.input) if isinstance(self.input, dict) else {"input": self.input}
        for out in self.outputs:
            merged[f"step_{out.index}_output"] = out.output
        if self.outputs:
            merged["previous_output"] = self.previous_output
        return merged


@dataclass(frozen=True, slots=True)
class Step:
    """One step: a function from input to output, its name, its declared models.

    ``input``/``output`` default to the function's annotations (pydantic models), or
    for an agent to its consumed/produced topic's model. Without an input model the
    step gets the previous output as plain JSON. ``history`` (default: whether ``run``
    takes a third positional argument; False for an agent, whose handler takes two)
    hands it a :class:`ChainHistory` as that argument. Any step, an agent's handler
    too, can read it with :meth:`ChainHistory.of` instead.

    Example:
        >>> async def review(draft: dict, ctx: Context) -> dict:
        ...     return {"ok": True}
        >>> Step.of(review).name
        'review'
    """

    run: StepFunction
    name: str
    input: type[BaseModel] | None = None
    output: type[BaseModel] | None = None
    history: bool | None = None

    def __post_init__(self) -> None:
        if self.history is None:
            object.__setattr__(self, "history", _takes_third_argument(self.run))
        if not self.name or "/" in self.name or " " in self.name:
            raise ConfigError(f"Step name {self.name!r} is not valid: use a non-empty name "
                              "without spaces or '/' (it becomes part of an agent name).")

    @classmethod
    def of(cls, item: Step | Agent[Any] | StepFunction) -> Step:
        """A step from a :class:`Step`, an agent (its handler) or an async function."""
        if isinstance(item, Step):
            return item
        if isinstance(item, Agent):
            return cls(item.handle, item.name, _single_model(item.consumes),
                       _single_model(item.produces), history=False)
        if not callable(item):
            raise ConfigError(f"Chain step {item!r} is not a step: pass an async function "
                              "(input, ctx) -> output, an Agent or a Step.")
        hints = _hints(item)
        first = _first_parameter(item)
        return cls(item, getattr(item, "__name__", type(item).__name__),
                   _model_or_none(hints.get(first) if first else None),
                   _model_or_none(hints.get("return")))


class Chain:
    """A sequential chain of steps, each its own agent, wired through per-step topics.

    Args:
        name: prefix of the chain's topics and agents.
        steps: async functions ``(input, ctx) -> output``, agents, or :class:`Step`.
        source: the topic of requests (default ``<name>.requests``, carrying the first
            step's input model, keyed by ``key``).
        key: the request field to key the default source topic by (per-key order).
        partitions: partitions of every topic the chain declares.
        retention_ms: ``retention.ms`` of the chain's topics (broker default if None).

    Example:
        >>> chain = Chain("research", [research, analyse, synthesise, review],  # doctest: +SKIP
        ...               key="request_id")
        >>> mesh = Mesh(settings, chain.agents)  # doctest: +SKIP
    """

    def __init__(self, name: str, steps: Sequence[Step | Agent[Any] | StepFunction], *,
                 source: Topic[Any] | None = None, key: str | None = None,
                 partitions: int = 3, retention_ms: int | None = None) -> None:
        if not steps:
            raise ConfigError(f"Chain {name!r} has no steps: pass at least one.")
        self.name = name
        self.steps = tuple(Step.of(s) for s in steps)
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ConfigError(f"Chain {name!r} has duplicate step names {names}: wrap one in "
                              "Step(fn, name=...) to tell them apart.")
        self.source = source or self._default_source(key, partitions, retention_ms)
        first = self.steps[0].input
        if first is not None and not issubclass(self.source.model, first):
            raise ConfigError(f"Chain {name!r}: step {names[0]!r} takes {first.__name__}, but "
                              f"{self.source.name!r} carries {self.source.model.__name__}. "
                              "Make them match.")
        parts = partitions if source is None else source.partitions

        def topic(suffix: str, model: type[BaseModel]) -> Topic[Any]:
            return Topic(f"{name}.{suffix}", model, key="key", partitions=parts,
                         retention_ms=retention_ms)

        self.hops = tuple(topic(f"step{i}", ChainHop) for i in range(1, len(self.steps)))
        self.completed = topic("completed", ChainCompleted)
        self.failed = topic("failed", ChainFailed)
        self.events = topic("events", ChainStepEvent)
        self._began: dict[str, int] = {}  # event id -> ms its step began (for failures)
        self.agents = [self._agent(i) for i in range(len(self.steps))]
        self.app = App(name, agents=self.agents, topics=self.topics)

    @property
    def topics(self) -> list[Topic[Any]]:
        """Every topic of the chain: source, hops, completed, failed, events."""
        return [self.source, *self.hops, self.completed, self.failed, self.events]

    def output(self, outputs: Sequence[StepOutput], index: int) -> Any:
        """Step ``index``'s output from ``outputs`` (of a ``ChainCompleted`` or the
        ``partial_results`` of a ``ChainFailed``), as the step's output model if it has one.

        Example:
            >>> chain.output(done.outputs, 1)  # doctest: +SKIP
            Analysis(...)
        """
        found = next((o for o in outputs if o.index == index), None)
        if found is None:
            raise ConfigError(f"Chain {self.name!r}: no output of step {index} among "
                              f"{[o.index for o in outputs]}.")
        model = self.steps[index].output
        return model.model_validate(found.output) if model is not None else found.output

    def _default_source(self, key: str | None, partitions: int,
                        retention_ms: int | None) -> Topic[Any]:
        model = self.steps[0].input
        if model is None:
            raise ConfigError(f"Chain {self.name!r}: the first step {self.steps[0].name!r} "
                              "declares no pydantic input model, so the request topic cannot "
                              "be typed. Annotate its input or pass source=Topic(...).")
        return Topic(f"{self.name}.requests", model, key=key, partitions=partitions,
                     retention_ms=retention_ms)

    def _agent(self, index: int) -> Agent[Any]:
        step, last = self.steps[index], index == len(self.steps) - 1
        consumes = self.source if index == 0 else self.hops[index - 1]
        target = self.completed if last else self.hops[index]
        name = f"{self.name}.{step.name}"

        async def handle(payload: Any, ctx: Context) -> None:
            began = now_ms()
            self._began[ctx.event_id] = began
            hop = self._hop_of(index, payload, ctx)
            given = self._input_of(index, hop, payload)
            history = self._history(hop)
            running = _RUNNING.set((ctx, history))
            try:
                value = await (step.run(given, ctx, history) if step.history
                               else step.run(given, ctx))
            finally:
                _RUNNING.reset(running)
            done = StepOutput(index=index, step=step.name, agent=name,
                              model=type(value).__name__ if isinstance(value, BaseModel) else None,
                              output=json_data(value), started_at_ms=began, finished_at_ms=now_ms())
            outputs = [*hop.outputs, done]
            if last:
                ctx.emit(target, ChainCompleted(chain=self.name, key=hop.key,
                                                correlation_id=ctx.correlation_id,
                                                input=hop.input, outputs=outputs,
                                                result=done.output))
            else:
                ctx.emit(target, ChainHop(chain=self.name, key=hop.key, step=index + 1,
                                          input=hop.input, outputs=outputs))
            if index == 0:
                ctx.emit(self.events, self._event(hop, ctx, 0, "started", began))
            ctx.emit(self.events, self._event(hop, ctx, index, "finished", done.finished_at_ms))
            if not last:
                ctx.emit(self.events, self._event(hop, ctx, index + 1, "started", now_ms()))
            self._began.pop(ctx.event_id, None)

        async def failed(payload: Any, ctx: Context, error: BaseException) -> None:
            began = self._began.pop(ctx.event_id, now_ms())
            hop = self._hop_of(index, payload, ctx)
            message = (str(error) or type(error).__name__)[:_ERROR_CHARS]
            ctx.emit(self.failed, ChainFailed(
                chain=self.name, key=hop.key, correlation_id=ctx.correlation_id,
                failed_step=index, failed_step_name=step.name, failed_agent=name,
                error_class=type(error).__name__, error=message, input=hop.input,
                partial_results=hop.outputs))
            if index == 0:
                ctx.emit(self.events, self._event(hop, ctx, 0, "started", began))
            ctx.emit(self.events, self._event(hop, ctx, index, "failed", now_ms(),
                                              error=error))
            ctx.logger.warning("chain %s failed at step %d (%s): %s", self.name, index,
                               step.name, message)

        return Agent(name, consumes=consumes, produces=[target, self.events, self.failed],
                     handler=handle, on_failure=failed,
                     description=f"step {index} of chain {self.name}: {step.name}")

    def _hop_of(self, index: int, payload: Any, ctx: Context) -> ChainHop:
        if index > 0:
            return payload  # type: ignore[no-any-return]
        key = ctx.event.key.decode(errors="replace") if ctx.event.key else ctx.correlation_id
        return ChainHop(chain=self.name, key=key, step=0, input=json_data(payload))

    def _history(self, hop: ChainHop) -> ChainHistory:
        return ChainHistory(self.name, hop.input, tuple(hop.outputs),
                            tuple(s.output for s in self.steps))

    def _input_of(self, index: int, hop: ChainHop, payload: Any) -> Any:
        if index == 0:
            return payload
        previous = hop.outputs[-1].output if hop.outputs else None
        model = self.steps[index].input
        if model is None:
            return previous
        try:
            return model.model_validate(previous)
        except ValidationError as exc:
            raise HandlerError(
                f"Step {index} ({self.steps[index].name!r}) of chain {self.name!r} takes "
                f"{model.__name__}, but step {index - 1} returned something else: {exc}. "
                "Make the previous step return that model.") from exc

    def _event(self, hop: ChainHop, ctx: Context, index: int, status: StepStatus, at_ms: int,
               *, error: BaseException | None = None) -> ChainStepEvent:
        return ChainStepEvent(
            chain=self.name, key=hop.key, correlation_id=ctx.correlation_id, step=index,
            step_name=self.steps[index].name, agent=f"{self.name}.{self.steps[index].name}",
            status=status, at_ms=at_ms,
            error_class=type(error).__name__ if error is not None else None,
            error=(str(error) or type(error).__name__)[:_ERROR_CHARS] if error else None)

    def __repr__(self) -> str:
        return f"Chain({self.name!r}, steps={[s.name for s in self.steps]})"




def _hints(fn: Any) -> dict[str, Any]:
    """Resolved annotations of ``fn`` (empty when they cannot be resolved, e.g. a model
    defined inside a function: pass ``Step(..., input=..., output=...)`` then)."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: no declared models
        logger.debug("annotations of %r cannot be resolved", fn)
        return {}


def _takes_third_argument(fn: Any) -> bool:
    """Whether ``fn`` takes a third positional argument (the step's history)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3


def _first_parameter(fn: Any) -> str | None:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins and some callables have no signature
        return None
    return params[0] if params else None


def _model_or_none(tp: Any) -> type[BaseModel] | None:
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _single_model(topics: Sequence[Topic[Any]]) -> type[BaseModel] | None:
    models = {t.model for t in topics}
    return models.pop() if len(models) == 1 else None
