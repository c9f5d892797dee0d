"""Hierarchical delegation on Kafka: a coordinator plans, specialists do the steps.

The :class:`Coordinator` agent consumes requests and step results, both keyed by
workflow id and co-partitioned with its state. For a request it asks a planner for a
:class:`~mesh.patterns.plan.Plan` and validates it (an invalid plan is one
``PlanInvalid`` event and a failed outcome: no crash, no dispatch), publishes it to the
compacted plans topic and dispatches the ready steps to their specialists' task topics.
A plan whose steps declare no ``depends_on`` runs them one after another, each with
every earlier step's result as context (the seed's semantics); declared dependencies
make a DAG whose independent steps are dispatched together and run in parallel (see
:mod:`mesh.patterns.plan`). Each result marks its step done and dispatches what became
ready. At a checkpoint, or when a step fails, a reviewer may revise the rest of the
plan (a new version, published). When all steps are done a synthesizer builds the final
result: a :class:`WorkflowOutcome` with ``success``, ``final_output``, ``step_results``
(step id -> output) and the plan executed (``plan``, also ``plan_executed``), the
seed's field names.

With a plan key (``MESH_SECURITY__PLAN_KEY``) every task and plan version is signed and
specialists run only tasks that check (:mod:`mesh.patterns.signing`).

Kafka semantics: the workflow's state lives in a compacted workflows topic, written
with the handler's outputs and acknowledged before the input's offset is committed. A
coordinator killed -9 restarts from that topic; an input it had applied and that is
redelivered (the same record) re-sends only what it caused that is still pending, so a
step whose result was recorded is never dispatched again (steps in flight at the crash
may be; their late duplicate results are ignored). Another record with an event id
already applied (a duplicate delivery) is ignored.

Example (``examples/delegation.py`` runs a whole mesh):
    >>> topics = DelegationTopics.named("reports", ReportRequest, specialists=["writer"])
    >>> coordinator = Coordinator("reports", topics=topics, planner=my_planner)
"""
# Over 300 lines: the transitions share one state object; plan.py has the pure rules,
# signing.py the signatures.

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr

from mesh.agent import Agent, Context
from mesh.errors import ConfigError, HandlerError, SignatureInvalid
from mesh.patterns.plan import (
    Plan,
    PlanError,
    Planner,
    PlanStep,
    Review,
    Reviewer,
    StepResult,
    StepTask,
    Synthesis,
    Synthesizer,
    as_plan,
    collect,
    order_steps,
    ready_steps,
    revise,
    validate_plan,
)
from mesh.patterns.signing import PlanKey, PlanSigner
from mesh.serde import json_data
from mesh.topic import Topic

logger = logging.getLogger(__name__)

EventKind = Literal["WorkflowStarted", "PlanPublished", "PlanInvalid", "StepDispatched",
                    "StepCompleted", "StepFailed", "CheckpointReviewed", "WorkflowCompleted",
                    "WorkflowFailed", "ResultIgnored"]


class StepState(BaseModel):
    """A dispatched step in the workflow state; ``caused_by`` is the position of the
    input that dispatched it (re-sent if that input is redelivered)."""

    status: Literal["dispatched", "done", "failed"]
    dispatch_id: str
    caused_by: str
    output: Any = None
    error: str | None = None


class WorkflowState(BaseModel):
    """Everything the coordinator knows about one workflow (the workflows table)."""

    workflow_id: str
    status: Literal["running", "completed", "failed"]
    request: Any = None
    plan: Plan
    plan_caused_by: str = ""
    steps: dict[str, StepState] = Field(default_factory=dict)
    handled: dict[str, str] = Field(default_factory=dict)  # input event id -> position
    final_output: Any = None
    finished_by: str | None = None
    failed_step: str | None = None
    error: str | None = None

    def results(self) -> dict[str, Any]:
        """The outputs of the done steps, in plan order."""
        done = {k: s.output for k, s in self.steps.items() if s.status == "done"}
        return {k: done[k] for k in self.plan.step_ids if k in done}


class WorkflowEvent(BaseModel):
    """What happened to a workflow, for taps, audit and dashboards."""

    workflow_id: str
    kind: EventKind
    message: str
    step_id: str | None = None
    specialist: str | None = None
    plan_version: int | None = None


class WorkflowOutcome(BaseModel):
    """The answer to a request: the final output with every step's result and the plan
    executed, or the failure with the step that failed and the partial results."""

    workflow_id: str
    success: bool
    final_output: Any = None
    step_results: dict[str, Any] = Field(default_factory=dict)
    plan: Plan | None = None
    failed_step: str | None = None
    error: str | None = None

    @property
    def plan_executed(self) -> Plan | None:
        """The plan executed (its last version): the seed's name for ``plan``."""
        return self.plan


@dataclass(frozen=True, slots=True)
class DelegationTopics:
    """The topics of one delegation mesh. ``tasks`` maps each specialist to its topic.

    Example:
        >>> topics = DelegationTopics.named("reports", ReportRequest,
        ...                                 specialists=["researcher", "writer"])  # doctest: +SKIP
        >>> topics.tasks["writer"].name  # doctest: +SKIP
        'reports.tasks.writer'
    """

    requests: Topic[Any]
    plans: Topic[Plan]
    workflows: Topic[WorkflowState]
    results: Topic[StepResult]
    events: Topic[WorkflowEvent]
    outcomes: Topic[WorkflowOutcome]
    tasks: Mapping[str, Topic[StepTask]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", MappingProxyType(dict(self.tasks)))  # frozen too
        if self.requests.key is None:
            raise ConfigError(f"Requests topic {self.requests.name!r} has no key: key it by "
                              "the workflow id (key='workflow_id').")
        counts = {t.name: t.partitions
                  for t in (self.requests, self.results, self.workflows, self.plans)}
        if len(set(counts.values())) != 1:
            raise ConfigError("Requests, results, workflows and plans must be co-partitioned "
                              f"by workflow id, but their partition counts differ: {counts}. "
                              "Give them the same partition count.")
        if not self.tasks:
            raise ConfigError("A delegation mesh needs at least one specialist task topic.")

    @classmethod
    def named(cls, prefix: str, request_model: type[BaseModel], *, specialists: Iterable[str],
              key: str = "workflow_id", partitions: int = 3) -> DelegationTopics:
        """Topics called ``<prefix>.requests``, ``.plans``, ``.workflows``, ``.results``,
        ``.events``, ``.outcomes`` and ``.tasks.<specialist>``, co-partitioned."""
        def wf(name: str, model: type[BaseModel], compacted: bool = False) -> Topic[Any]:
            return Topic(f"{prefix}.{name}", model, key="workflow_id", partitions=partitions,
                         compacted=compacted)
        return cls(
            requests=Topic(f"{prefix}.requests", request_model, key=key, partitions=partitions),
            plans=wf("plans", Plan, True), workflows=wf("workflows", WorkflowState, True),
            results=wf("results", StepResult), events=wf("events", WorkflowEvent),
            outcomes=wf("outcomes", WorkflowOutcome),
            tasks={s: Topic(f"{prefix}.tasks.{s}", StepTask, key="task_id",
                            partitions=partitions) for s in specialists})

    def all(self) -> list[Topic[Any]]:
        """Every topic, for ``apply_topics``."""
        return [self.requests, self.plans, self.workflows, self.results, self.events,
                self.outcomes, *self.tasks.values()]


StepHandler = Callable[[StepTask, Context], Awaitable[Any]]



class Coordinator(Agent[Any]):
    """The coordinator service of a delegation mesh (see the module docstring).

    Args:
        name: the agent (and default consumer group) name.
        topics: the mesh's topics; its ``tasks`` name the known specialists.
        planner: ``async (request) -> Plan``, e.g. a :class:`RulesPlanner`.
        reviewer: ``async (Review) -> Revision | None``, called at checkpoint steps and
            when a step fails; None keeps the plan (a failure then fails the workflow).
        synthesizer: ``async (Synthesis) -> Any``; default :func:`collect`.
        plan_key: the key to sign tasks and plans with; default: the runner's
            ``MESH_SECURITY__PLAN_KEY``. Neither: unsigned (insecure, warned once).
    """

    def __init__(self, name: str, *, topics: DelegationTopics, planner: Planner,
                 reviewer: Reviewer | None = None, synthesizer: Synthesizer = collect,
                 group: str | None = None, description: str = "",
                 plan_key: SecretStr | None = None) -> None:
        super().__init__(name, consumes=[topics.requests, topics.results],
                         produces=[topics.plans, topics.events, topics.outcomes,
                                   *topics.tasks.values()],
                         state=[topics.workflows], group=group,
                         description=description or "delegation coordinator")
        self.topics, self.planner = topics, planner
        self.reviewer, self.synthesizer = reviewer, synthesizer
        self.plan_key = PlanKey(name, "coordinator", key=plan_key)

    async def on_start(self, settings: Any) -> None:
        self.plan_key.signer(settings)  # warns now if unsigned, fails on an empty key

    async def handle(self, payload: Any, ctx: Context) -> None:
        if ctx.event.topic == self.topics.results.name:
            await self._on_result(payload, ctx)
        else:
            await self._on_request(payload, ctx)

    async def on_failure(self, payload: Any, ctx: Context, error: BaseException) -> None:
        """The planner, reviewer or synthesizer failed for good: the workflow fails. A
        result naming no known workflow is reported as ignored (and dead-lettered)."""
        why = f"{type(error).__name__}: {error}"
        if ctx.event.topic != self.topics.results.name:  # no state: a replay may retry
            wf = self._workflow_id(payload)
            self._event(ctx, wf, "WorkflowFailed", f"Planning failed: {why}")
            ctx.emit(self.topics.outcomes, WorkflowOutcome(
                workflow_id=wf, success=False, error=f"Planning failed: {why}"))
            return
        current = ctx.get(self.topics.workflows, payload.workflow_id)
        if current is None:
            self._ignore(ctx, payload, f"no such workflow (dead-lettered to "
                                       f"{self.topics.results.dlq_name})")
        elif current.status == "running":
            turn = _Turn(self, ctx, current.model_copy(deep=True))
            turn.fail(payload.step_id, f"Coordinator failed on the result of step "
                                       f"{payload.step_id!r}: {why}")
            turn.save()

    def _workflow_id(self, request: Any) -> str:
        return str(getattr(request, self.topics.requests.key or "workflow_id"))

    def _event(self, ctx: Context, wf: str, kind: EventKind, message: str, **extra: Any) -> None:
        ctx.emit(self.topics.events, WorkflowEvent(workflow_id=wf, kind=kind, message=message,
                                                   **extra))

    async def _on_request(self, request: Any, ctx: Context) -> None:
        wf = self._workflow_id(request)
        existing = ctx.get(self.topics.workflows, wf)
        if existing is not None:
            _Turn(self, ctx, existing).replay_or_ignore()
            return
        self._event(ctx, wf, "WorkflowStarted", f"Workflow {wf!r} received; planning.")
        plan: Plan | None = None
        try:
            planned = as_plan(await self.planner(request))
            plan = planned.model_copy(update={
                "workflow_id": wf, "version": 1, "signature": "",
                "steps": order_steps(planned.steps)})  # a list without depends_on: in order
            validate_plan(plan, self.topics.tasks)
        except PlanError as exc:
            self._reject(ctx, wf, request, exc, plan)
            return
        turn = _Turn(self, ctx, WorkflowState(workflow_id=wf, status="running", plan=plan,
                                              request=json_data(request),
                                              handled={ctx.event_id: _position(ctx)}))
        turn.publish_plan()
        await turn.advance()
        turn.save()

    def _reject(self, ctx: Context, wf: str, request: Any, error: PlanError,
                plan: Plan | None) -> None:
        logger.warning("workflow %s: plan invalid: %s", wf, error)
        self._event(ctx, wf, "PlanInvalid", str(error), plan_version=1)
        state = WorkflowState(workflow_id=wf, status="failed", request=json_data(request),
                              plan=plan or Plan(steps=[], workflow_id=wf), error=str(error),
                              handled={ctx.event_id: _position(ctx)}, finished_by=_position(ctx))
        ctx.put(self.topics.workflows, wf, state)
        ctx.emit(self.topics.outcomes, _outcome(state))

    async def _on_result(self, result: StepResult, ctx: Context) -> None:
        current = ctx.get(self.topics.workflows, result.workflow_id)
        if current is None:  # the state is written with the dispatch: this is bad input
            raise HandlerError(
                f"Result of step {result.step_id!r} ({result.dispatch_id}) names workflow "
                f"{result.workflow_id!r}, which coordinator {self.name!r} has no state for. "
                f"Check who produced it to {self.topics.results.name}.")
        if ctx.event_id in current.handled:
            _Turn(self, ctx, current).replay_or_ignore()
            return
        step = current.steps.get(result.step_id)
        if current.status != "running":
            self._ignore(ctx, result, f"the workflow is {current.status}")
        elif step is None or step.dispatch_id != result.dispatch_id:
            self._ignore(ctx, result, "not the current dispatch of the step")
        elif step.status != "dispatched":
            self._ignore(ctx, result, f"the step is already {step.status}")
        else:
            turn = _Turn(self, ctx, current.model_copy(deep=True))
            turn.state.handled[ctx.event_id] = turn.position
            await turn.apply(result)
            turn.save()

    def _ignore(self, ctx: Context, result: StepResult, why: str) -> None:
        logger.info("workflow %s: result of %s (%s) ignored: %s", result.workflow_id,
                    result.step_id, result.dispatch_id, why)
        self._event(ctx, result.workflow_id, "ResultIgnored",
                    f"Result of step {result.step_id!r} ({result.dispatch_id}) ignored: {why}.",
                    step_id=result.step_id, specialist=result.specialist)


def _position(ctx: Context) -> str:
    return f"{ctx.event.topic}:{ctx.event.partition}:{ctx.event.offset}"


def _outcome(state: WorkflowState) -> WorkflowOutcome:
    return WorkflowOutcome(
        workflow_id=state.workflow_id, success=state.status == "completed",
        final_output=state.final_output, step_results=state.results(), plan=state.plan,
        failed_step=state.failed_step, error=state.error)


@dataclass(slots=True)
class _Turn:
    """One input applied to one workflow: the state it changes and what it emits."""

    coordinator: Coordinator
    ctx: Context
    state: WorkflowState
    position: str = ""
    signer: PlanSigner | None = None

    def __post_init__(self) -> None:
        self.position = _position(self.ctx)
        self.signer = self.coordinator.plan_key.for_context(self.ctx)

    def signed(self, plan: Plan) -> Plan:
        """``plan`` signed with the plan key (as it is, when unsigned)."""
        return self.signer.sign_plan(plan) if self.signer else plan

    @property
    def topics(self) -> DelegationTopics:
        return self.coordinator.topics

    def event(self, kind: EventKind, message: str, **extra: Any) -> None:
        self.coordinator._event(self.ctx, self.state.workflow_id, kind, message, **extra)

    def save(self) -> None:
        self.ctx.put(self.topics.workflows, self.state.workflow_id, self.state)

    def request(self) -> Any:
        return self.topics.requests.model.model_validate(self.state.request)

    def replay_or_ignore(self) -> None:
        """An input seen before: if it is the same record (redelivered after a crash),
        re-send what it caused that may not have reached the broker; else ignore it."""
        if self.state.handled.get(self.ctx.event_id) != self.position:
            logger.info("workflow %s: duplicate event %s ignored", self.state.workflow_id,
                        self.ctx.event_id)
            return
        if self.state.plan_caused_by == self.position:
            self.ctx.emit(self.topics.plans, self.signed(self.state.plan))
        for step_id, step in self.state.steps.items():
            planned = self.state.plan.step(step_id)
            if step.status == "dispatched" and step.caused_by == self.position and planned:
                self.send(planned, step.dispatch_id)
        if self.state.finished_by == self.position:
            self.ctx.emit(self.topics.outcomes, _outcome(self.state))

    def publish_plan(self) -> None:
        plan = self.state.plan = self.signed(self.state.plan)
        self.state.plan_caused_by = self.position
        self.ctx.emit(self.topics.plans, plan)
        self.event("PlanPublished", f"Plan v{plan.version} ({plan.reason}): "
                   f"{', '.join(plan.step_ids)}.", plan_version=plan.version)

    def send(self, step: PlanStep, dispatch_id: str) -> None:
        wf = self.state.workflow_id
        context = {d: self.state.steps[d].output for d in step.depends_on}
        task = StepTask(task_id=f"{wf}/{step.id}", workflow_id=wf, step_id=step.id,
                        dispatch_id=dispatch_id, specialist=step.specialist,
                        plan_version=self.state.plan.version, input=step.input,
                        context=context)
        self.ctx.emit(self.topics.tasks[step.specialist],
                      self.signer.sign_task(task) if self.signer else task)

    async def advance(self) -> None:
        """Dispatch every ready step (together: they run in parallel), or finish."""
        done = {k for k, s in self.state.steps.items() if s.status == "done"}
        plan = self.state.plan
        if done >= set(plan.step_ids):
            await self.complete()
            return
        for step in ready_steps(plan, done=done, started=self.state.steps):
            dispatch_id = f"{self.state.workflow_id}/{step.id}/v{plan.version}"
            self.state.steps[step.id] = StepState(status="dispatched", dispatch_id=dispatch_id,
                                                  caused_by=self.position)
            self.send(step, dispatch_id)
            self.event("StepDispatched", f"Step {step.id!r} dispatched to {step.specialist}.",
                       step_id=step.id, specialist=step.specialist, plan_version=plan.version)

    async def apply(self, result: StepResult) -> None:
        """Record ``result``; review at a checkpoint or on failure; then go on."""
        step = self.state.steps[result.step_id]
        planned = self.state.plan.step(result.step_id)
        assert planned is not None  # a dispatched step is in the current plan
        what = f"Step {planned.id!r} ({planned.specialist})"
        if result.ok:
            step.status, step.output = "done", result.output
            self.event("StepCompleted", f"{what} done.", step_id=planned.id,
                       specialist=planned.specialist)
        else:
            step.status, step.error = "failed", result.error
            self.event("StepFailed", f"{what} failed: {result.error}", step_id=planned.id,
                       specialist=planned.specialist)
        verdict = "kept"
        if planned.checkpoint or not result.ok:
            verdict = await self.review(planned, None if result.ok else result.error)
        if verdict == "failed":
            return
        if not result.ok and verdict == "kept":
            self.fail(planned.id, f"{what} failed: {result.error}")
            return
        await self.advance()

    async def review(self, step: PlanStep, failure: str | None
                     ) -> Literal["kept", "revised", "failed"]:
        """Ask the reviewer and apply its revision; "failed" if the revision was
        invalid (the workflow then failed)."""
        reviewer = self.coordinator.reviewer
        if reviewer is None:
            return "kept"
        revision = await reviewer(Review(
            self.state.workflow_id, self.request(), self.state.plan, step,
            self.state.results(), failure))
        verdict = f"revised: {revision.reason}" if revision else "plan kept"
        self.event("CheckpointReviewed", f"Review after step {step.id!r}: {verdict}.",
                   step_id=step.id, plan_version=self.state.plan.version)
        if revision is None:
            return "kept"
        done = {k for k, s in self.state.steps.items() if s.status == "done"}
        new = revise(self.state.plan, revision, done=done)
        try:
            validate_plan(new, self.topics.tasks)
        except PlanError as exc:
            self.event("PlanInvalid", f"Revision v{new.version} rejected: {exc}",
                       plan_version=new.version)
            self.fail(step.id, f"Revision v{new.version} after step {step.id!r} rejected: {exc}")
            return "failed"
        for step_id, state in list(self.state.steps.items()):
            old, kept = self.state.plan.step(step_id), new.step(step_id)
            keep = state.status == "done" or (
                state.status == "dispatched" and old and kept and kept.same_work(old))
            if not keep:
                del self.state.steps[step_id]  # a late result of it is ignored
        self.state.plan = new
        self.publish_plan()
        return "revised"

    async def complete(self) -> None:
        synthesizer = self.coordinator.synthesizer
        output = await synthesizer(Synthesis(self.state.workflow_id, self.request(),
                                             self.state.plan, self.state.results()))
        self.state.final_output = json_data(output)
        self.state.status, self.state.finished_by = "completed", self.position
        self.ctx.emit(self.topics.outcomes, _outcome(self.state))
        self.event("WorkflowCompleted", f"Workflow {self.state.workflow_id!r} completed: "
                   f"{len(self.state.plan.steps)} steps, plan v{self.state.plan.version}.",
                   plan_version=self.state.plan.version)

    def fail(self, step_id: str, error: str) -> None:
        self.state.status, self.state.finished_by = "failed", self.position
        self.state.failed_step, self.state.error = step_id, error
        self.ctx.emit(self.topics.outcomes, _outcome(self.state))
        self.event("WorkflowFailed", error, step_id=step_id,
                   plan_version=self.state.plan.version)


class Specialist(Agent[StepTask]):
    """A specialist: consumes its task topic, runs ``handler(task, ctx)``, produces a
    :class:`StepResult` to the results topic. Retriable errors are retried (the agent's
    ``RetryPolicy``: through retry topics by default); a task failing for good gives a failed
    ``StepResult`` naming the error (and the task is dead-lettered). With a plan key
    (``plan_key=``, else ``MESH_SECURITY__PLAN_KEY``) a task the coordinator did not sign
    for it is dead-lettered as ``SignatureInvalid``, unrun and unanswered."""

    def __init__(self, name: str, *, topics: DelegationTopics, handler: StepHandler,
                 group: str | None = None, description: str = "",
                 plan_key: SecretStr | None = None) -> None:
        tasks = topics.tasks.get(name)
        if tasks is None:
            raise ConfigError(f"Unknown specialist {name!r}: the topics have task topics for "
                              f"{', '.join(sorted(topics.tasks))}. Add it to specialists=.")
        super().__init__(name, consumes=tasks, produces=topics.results, group=group,
                         description=description or f"specialist {name}")
        self.results, self._work = topics.results, handler
        self.plan_key = PlanKey(name, "specialist", key=plan_key)

    async def on_start(self, settings: Any) -> None:
        self.plan_key.signer(settings)  # warns now if unsigned, fails on an empty key

    async def handle(self, task: StepTask, ctx: Context) -> StepResult:
        signer = self.plan_key.for_context(ctx)
        if signer is not None:
            signer.verify_task(task, specialist=self.name)  # before any work is done
        output = await self._work(task, ctx)
        return self._result(task, ok=True, output=json_data(output))

    async def on_failure(self, task: StepTask, ctx: Context, error: BaseException) -> None:
        if isinstance(error, SignatureInvalid):  # not our work: answer nothing
            return
        ctx.emit(self.results, self._result(task, ok=False,
                                            error=f"{type(error).__name__}: {error}"))

    @staticmethod
    def _result(task: StepTask, **outcome: Any) -> StepResult:
        echoed = {"workflow_id", "step_id", "dispatch_id", "specialist"}
        return StepResult(**task.model_dump(include=echoed), **outcome)


def specialist(name: str, *, topics: DelegationTopics, group: str | None = None,
               plan_key: SecretStr | None = None) -> Callable[[StepHandler], Specialist]:
    """Declare a :class:`Specialist` from an async ``(task, ctx) -> output`` handler.

    Example:
        >>> @specialist("researcher", topics=topics)  # doctest: +SKIP
        ... async def researcher(task: StepTask, ctx: Context) -> dict:
        ...     return {"facts": [f"about {task.input['subject']}"]}
    """
    def wrap(handler: StepHandler) -> Specialist:
        return Specialist(name, topics=topics, handler=handler, group=group,
                          description=(handler.__doc__ or "").strip(), plan_key=plan_key)
    return wrap
