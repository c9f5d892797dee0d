"""Pipelines with checkpoints: after every stage the workflow's state goes to a compacted
checkpoints topic keyed by workflow id, and a restarted pipeline resumes from it.

One :class:`Pipeline` is one agent (replicas share its group) over five topics::

    <source>            requests, keyed by workflow id -> the task for stage 0
    <name>.tasks        "run stage k of workflow w": its own work queue, keyed by w
    <name>.checkpoints  compacted: every Checkpoint version per workflow, latest wins
    <name>.events       started / finished / failed / completed / deleted
    <name>.results      one WorkflowResult per workflow (completed or failed)

Stage k of w runs on the request and every earlier result; the next checkpoint (stage
k done, its output added) and the task for k+1 are acknowledged before the task's
offset is committed. After a kill -9 the task is redelivered: if the checkpoint has
stage k, the stage is **not run again** (the task for k+1 is resent with its original
event id); if not, it runs again. Only the owner of w's tasks partition writes w's
checkpoints, so the table the runtime rebuilds on assignment is current for the
workflows it runs. A stage failing for good (after the runtime's retries) writes a
``failed`` checkpoint naming it and the error. A workflow id runs once: a repeated
request is absorbed by the checkpoint until the retention deletes it.

With ``retention_s``, a timer tombstones workflows finished longer ago, so the table
holds the workflows in flight plus one retention's worth. The ``deleted`` event it
emits acts for the task that finished the workflow (the last stage's, or the one that
failed): every checkpoint keeps the event id and ``traceparent`` of the task whose run
wrote it, so the event is in the workflow's trace, a child of that task's span, and its
``mesh-causation`` names that task (``mesh trace`` shows it beside ``completed`` or
``failed``, not under the timer's tick, which is in no topic).

:mod:`mesh.views.workflows` reads every version of one workflow still in the log
(``mesh workflows show ID``). Over 300 lines: one agent's stages, checkpoints, events
and retention timer share one state.

Example:
    >>> class Doc(BaseModel):
    ...     doc_id: str
    >>> async def extract(run: StageRun, ctx: Context) -> dict:
    ...     return {"id": run.input.doc_id}
    >>> pipe = Pipeline(PipelineTopics.named("docs", Topic("docs.in", Doc, key="doc_id")),
    ...                 [extract])
    >>> pipe.agent.name, pipe.topics.checkpoints.name, pipe.topics.checkpoints.compacted
    ('docs', 'docs.checkpoints', True)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

from mesh.agent import Agent, App, Context
from mesh.envelope import now_ms
from mesh.errors import ConfigError, HandlerError, PayloadInvalid
from mesh.serde.avro import json_data
from mesh.topic import Topic, TopicBundle

logger = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741  # the request model
M = TypeVar("M", bound=BaseModel)
Status = Literal["running", "completed", "failed"]
EventStatus = Literal["started", "finished", "failed", "completed", "deleted"]
_ERROR_CHARS = 2000
_SWEEP_BATCH = 1000  # tombstones per timer run, so one run's batch stays small


class StageTask(BaseModel):
    """Run stage ``stage`` of workflow ``workflow_id``; stage 0 carries the request."""

    workflow_id: str
    stage: int
    input: Any = None


class StageResult(BaseModel):
    """One completed stage: its output (JSON) and when it ran (epoch ms)."""

    stage: int
    name: str
    output: Any = None
    started_at_ms: int
    finished_at_ms: int


class Checkpoint(BaseModel):
    """A workflow's state after a stage: what is done, what it produced, what is next.

    ``version`` counts the writes (1 = after the first stage); ``partition`` is the
    tasks partition that owns the workflow (only its owner writes or deletes it);
    ``written_by``, ``traceparent`` and ``carried`` are the event id, W3C trace
    context and carried headers (``tracestate``, a tenant id) of the task whose run
    wrote this version, so what a timer emits for the workflow later (the retention's
    ``deleted`` event) names that task as its cause and stays in its trace.
    """

    workflow_id: str
    pipeline: str
    version: int
    status: Status
    input: Any = None
    completed: list[StageResult] = Field(default_factory=list)
    next_stage: int | None = None
    failed_stage: int | None = None
    failed_stage_name: str | None = None
    error_class: str | None = None
    error: str | None = None
    partition: int = 0
    correlation_id: str = ""
    traceparent: str | None = None
    carried: dict[str, bytes] | None = None
    written_by: str | None = None  # the task's event id (None: written before it was kept)
    updated_at_ms: int
    finished_at_ms: int | None = None

    @property
    def completed_stages(self) -> list[str]:
        """Names of the completed stages, in order."""
        return [r.name for r in self.completed]

    @property
    def results(self) -> dict[str, Any]:
        """The accumulated results: stage name -> output."""
        return {r.name: r.output for r in self.completed}


class StageEvent(BaseModel):
    """A stage started, finished or failed; a workflow completed or was deleted."""

    pipeline: str
    workflow_id: str
    correlation_id: str
    status: EventStatus
    stage: int | None = None
    stage_name: str | None = None
    at_ms: int
    elapsed_ms: int | None = None
    error_class: str | None = None
    error: str | None = None


class WorkflowResult(BaseModel):
    """How a workflow ended: every stage's result, or the stage that failed and why."""

    pipeline: str
    workflow_id: str
    correlation_id: str
    status: Literal["completed", "failed"]
    results: dict[str, Any] = Field(default_factory=dict)
    failed_stage: int | None = None
    failed_stage_name: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PipelineTopics(TopicBundle):
    """The topics of one pipeline, built with :meth:`named`; bound at module level in
    ``topics/`` (see ``topics/pipeline.py``), ``mesh topics apply`` finds them all."""

    name: str
    source: Topic[Any]
    tasks: Topic[StageTask]
    checkpoints: Topic[Checkpoint]
    events: Topic[StageEvent]
    results: Topic[WorkflowResult]

    def __post_init__(self) -> None:
        if self.source.key is None:
            raise ConfigError(f"Pipeline {self.name!r}: source {self.source.name!r} has no "
                              "key field, but the key is the workflow id. Declare it with "
                              "key='<your id field>'.")

    @classmethod
    def named(cls, name: str, source: Topic[Any], *, partitions: int | None = None,
              retention_ms: int | None = None) -> PipelineTopics:
        """The topics of pipeline ``name`` fed by ``source`` (partitions default to the
        source's, so a workflow's request and tasks share a partition number)."""
        parts = partitions or source.partitions

        def topic(suffix: str, model: type[M], **extra: Any) -> Topic[M]:
            return Topic(f"{name}.{suffix}", model, key="workflow_id", partitions=parts,
                         **extra)

        return cls(name, source, topic("tasks", StageTask, retention_ms=retention_ms),
                   topic("checkpoints", Checkpoint, compacted=True),
                   topic("events", StageEvent, retention_ms=retention_ms),
                   topic("results", WorkflowResult, retention_ms=retention_ms))

    def all(self) -> list[Topic[Any]]:
        """Every topic, for ``apply_topics``."""
        return [self.source, self.tasks, self.checkpoints, self.events, self.results]


@dataclass(frozen=True, slots=True)
class StageRun(Generic[I]):
    """What a stage gets: the workflow, the request and every earlier stage's result."""

    workflow_id: str
    stage: int
    name: str
    input: I
    results: Mapping[str, Any]

    def result(self, name: str, model: type[M] | None = None) -> Any:
        """Stage ``name``'s output (JSON), validated into ``model`` if given."""
        if name not in self.results:
            raise ConfigError(f"Stage {self.name!r} asked for the result of {name!r}, which has "
                              f"not run before it (done: {', '.join(self.results) or 'none'}).")
        return self.results[name] if model is None else model.model_validate(self.results[name])


StageFunction = Callable[[StageRun[Any], Context], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Stage:
    """A named stage: ``async (run: StageRun, ctx) -> output`` (a model or JSON data)."""

    run: StageFunction
    name: str

    @classmethod
    def of(cls, item: Stage | StageFunction) -> Stage:
        if isinstance(item, Stage):
            return item
        if not callable(item):
            raise ConfigError(f"Pipeline stage {item!r} is not a Stage or an async function "
                              "(run, ctx) -> output: pass one.")
        return cls(item, getattr(item, "__name__", type(item).__name__))


class Pipeline:
    """A checkpointed pipeline of stages run by one agent; see the module docstring.

    Args:
        topics: its topics (:meth:`PipelineTopics.named`).
        stages: async functions ``(run, ctx) -> output``, or :class:`Stage`.
        retention_s: delete finished workflows' checkpoints after this many seconds
            (None: keep them).
        sweep_every_s: how often the retention timer runs (default: retention / 4,
            between 0.1 s and 60 s).

    Example:
        >>> pipe = Pipeline(topics, [extract, classify], retention_s=86_400)  # doctest: +SKIP
    """

    def __init__(self, topics: PipelineTopics, stages: Sequence[Stage | StageFunction], *,
                 retention_s: float | None = None, sweep_every_s: float | None = None) -> None:
        self.topics, self.name = topics, topics.name
        self.stages = tuple(Stage.of(s) for s in stages)
        names = [s.name for s in self.stages]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"Pipeline {self.name!r} needs stages with distinct names, got "
                              f"{names}. Wrap one in Stage(fn, name=...).")
        if retention_s is not None and retention_s < 0:
            raise ConfigError(f"Pipeline {self.name!r}: retention_s={retention_s} must be >= 0"
                              " (or None to keep finished workflows).")
        self.retention_s = retention_s
        self.agent: Agent[Any] = Agent(
            self.name, consumes=[topics.source, topics.tasks],
            produces=[topics.tasks, topics.events, topics.results], handler=self._handle,
            state=[topics.checkpoints], on_failure=self._failed,
            description=f"checkpointed pipeline: {' -> '.join(names)}")
        if retention_s is not None:
            every = sweep_every_s or min(max(retention_s / 4, 0.1), 60.0)
            self.agent.every(every)(self._sweep)
        self.app = App(self.name, agents=[self.agent], topics=topics.all())

    async def _handle(self, payload: Any, ctx: Context) -> None:
        if isinstance(payload, StageTask):
            await self._run_task(payload, ctx)
            return
        workflow_id = (self.topics.source.key_of(payload) or b"").decode()
        if not workflow_id:
            raise PayloadInvalid(f"Request on {self.topics.source.name!r} has an empty "
                                 f"{self.topics.source.key!r}: it is the workflow id. Set it.")
        self._schedule(workflow_id, 0, ctx, request=payload.model_dump(mode="json"))

    def _schedule(self, workflow_id: str, stage: int, ctx: Context, *,
                  request: Any = None) -> None:
        ctx.emit(self.topics.tasks, StageTask(workflow_id=workflow_id, stage=stage,
                                              input=request))
        ctx.emit(self.topics.events, self._event(workflow_id, ctx, "started", stage))

    async def _run_task(self, task: StageTask, ctx: Context) -> None:
        wf, count = task.workflow_id, len(self.stages)
        current = self._current(task, ctx)
        if current is None or task.stage >= count:  # retried, then dead-lettered
            raise HandlerError(
                f"Pipeline {self.name!r} ({count} stages) got a task for stage {task.stage} of "
                f"{wf!r}, which has no checkpoint or no such stage (deleted after its "
                "retention? stages removed?). Replay it from the dead-letter topic if it "
                "should go on.", retriable=current is None)
        done = len(current.completed)
        if current.status == "running" and task.stage == done:
            await self._execute(current, task, ctx)
            return
        # A replay or a duplicate: the checkpoint has the stage. Resend what its run sent
        # (the next task or the result, then its events: a kill -9 may have landed after
        # the checkpoint's batch and before theirs), in the same order, so every output
        # gets the same event id as the first time and sinks apply it once.
        if current.status == "completed" and task.stage == count - 1:
            ctx.emit(self.topics.results, self._result(current))
            self._finished_again(current, task.stage, ctx)
            ctx.emit(self.topics.events, self._event(wf, ctx, "completed"))
        elif current.status == "running" and task.stage == done - 1:
            self._schedule(wf, done, ctx)
            self._finished_again(current, task.stage, ctx)
        ctx.logger.info("pipeline %s: %s stage %d is %s by the checkpoint, not run", self.name,
                        wf, task.stage, "done" if task.stage < done else "not due")

    def _finished_again(self, current: Checkpoint, index: int, ctx: Context) -> None:
        """The ``finished`` event of a recorded stage, as its run emitted it (its
        elapsed time from the checkpoint)."""
        run = current.completed[index]
        ctx.emit(self.topics.events, self._event(
            current.workflow_id, ctx, "finished", index,
            elapsed_ms=run.finished_at_ms - run.started_at_ms))

    async def _execute(self, current: Checkpoint, task: StageTask, ctx: Context) -> None:
        stage, index = self.stages[task.stage], task.stage
        began = now_ms()
        run = StageRun(current.workflow_id, index, stage.name,
                       self.topics.source.model.model_validate(current.input),
                       current.results)
        output = await stage.run(run, ctx)
        finished, last = now_ms(), index == len(self.stages) - 1
        result = StageResult(stage=index, name=stage.name, output=json_data(output),
                             started_at_ms=began, finished_at_ms=finished)
        state = self._write(current, ctx, completed=[*current.completed, result],
                            status="completed" if last else "running",
                            next_stage=None if last else index + 1,
                            finished_at_ms=finished if last else None)
        # Output order is part of the idempotency: a replay that finds this checkpoint
        # resends outputs 0 (and 1) only, and they get the same event ids as here.
        if last:
            ctx.emit(self.topics.results, self._result(state))
        else:
            self._schedule(state.workflow_id, index + 1, ctx)
        ctx.emit(self.topics.events, self._event(state.workflow_id, ctx, "finished", index,
                                                 elapsed_ms=finished - began))
        if last:
            ctx.emit(self.topics.events, self._event(state.workflow_id, ctx, "completed"))

    async def _failed(self, payload: Any, ctx: Context, error: BaseException) -> None:
        current = self._current(payload, ctx) if isinstance(payload, StageTask) else None
        if current is None or current.status != "running":
            return  # nothing to record: the runtime dead-letters the input
        message = (str(error) or type(error).__name__)[:_ERROR_CHARS]
        name = self.stages[payload.stage].name if payload.stage < len(self.stages) else "?"
        state = self._write(current, ctx, status="failed", next_stage=None,
                            failed_stage=payload.stage, failed_stage_name=name,
                            error_class=type(error).__name__, error=message,
                            finished_at_ms=now_ms())
        ctx.emit(self.topics.results, self._result(state))
        ctx.emit(self.topics.events, self._event(payload.workflow_id, ctx, "failed",
                                                 payload.stage, error=error))
        ctx.logger.warning("pipeline %s: %s failed at stage %d (%s): %s", self.name,
                           payload.workflow_id, payload.stage, name, message)

    async def _sweep(self, ctx: Context) -> None:
        """Tombstone the checkpoints of workflows finished before the retention horizon
        (only those whose tasks partition this replica owns)."""
        assert self.retention_s is not None
        horizon = now_ms() - int(self.retention_s * 1000)
        expired = [cp for _, cp in list(ctx.table(self.topics.checkpoints).items())
                   if cp.finished_at_ms is not None and cp.finished_at_ms <= horizon
                   and ctx.owns(self.topics.tasks, cp.partition)][:_SWEEP_BATCH]
        for cp in expired:
            ctx.delete(self.topics.checkpoints, cp.workflow_id)
            # On behalf of the task that finished the workflow: its trace, its event id.
            ctx.emit(self.topics.events, self._event(cp.workflow_id, ctx, "deleted",
                                                     correlation_id=cp.correlation_id),
                     correlation_id=cp.correlation_id or None, traceparent=cp.traceparent,
                     carried=cp.carried, causation_id=cp.written_by)
        if expired:
            logger.info("pipeline %s: deleted %d finished workflow(s)", self.name, len(expired))

    def _write(self, current: Checkpoint, ctx: Context, **update: Any) -> Checkpoint:
        """Stage the next version of ``current`` (persisted with the handler's outputs),
        written by the task ``ctx`` handles."""
        state = current.model_copy(update={
            "version": current.version + 1, "partition": ctx.event.partition or 0,
            "written_by": ctx.event_id, "traceparent": ctx.traceparent,
            "carried": ctx.carried, "updated_at_ms": now_ms(), **update})
        ctx.put(self.topics.checkpoints, state.workflow_id, state)
        return state

    def _current(self, task: StageTask, ctx: Context) -> Checkpoint | None:
        """The workflow's checkpoint; for stage 0 of a new workflow, version 0 (unwritten)."""
        found = ctx.get(self.topics.checkpoints, task.workflow_id)
        if found is not None or task.stage != 0:
            return found
        return Checkpoint(workflow_id=task.workflow_id, pipeline=self.name, version=0,
                          status="running", input=task.input, next_stage=0,
                          correlation_id=ctx.correlation_id, updated_at_ms=now_ms())

    def _result(self, state: Checkpoint) -> WorkflowResult:
        return WorkflowResult(
            pipeline=self.name, workflow_id=state.workflow_id, results=state.results,
            correlation_id=state.correlation_id, status="failed" if state.status == "failed"
            else "completed", failed_stage=state.failed_stage,
            failed_stage_name=state.failed_stage_name, error=state.error)

    def _event(self, workflow_id: str, ctx: Context, status: EventStatus,
               stage: int | None = None, *, elapsed_ms: int | None = None,
               error: BaseException | None = None, correlation_id: str = "") -> StageEvent:
        return StageEvent(
            pipeline=self.name, workflow_id=workflow_id, status=status, stage=stage,
            correlation_id=correlation_id or ctx.correlation_id, at_ms=now_ms(),
            stage_name=self.stages[stage].name
            if stage is not None and 0 <= stage < len(self.stages) else None,
            elapsed_ms=elapsed_ms,
            error_class=type(error).__name__ if error is not None else None,
            error=(str(error) or type(error).__name__)[:_ERROR_CHARS] if error else None)
