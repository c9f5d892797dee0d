"""Hierarchical delegation on Kafka: a coordinator plans, specialists do the steps.

The :class:`Coordinator` agent consumes requests, step results and decisions, all keyed
by workflow id and co-partitioned with its state. For a request it asks a planner for a
:class:`~mesh.patterns.delegation.plan.Plan` and validates it (an invalid plan is one
``PlanInvalid`` event and a failed outcome: no crash, no dispatch), publishes it to the
compacted plans topic and dispatches the ready steps to their specialists' task topics.
A plan whose steps declare no ``depends_on`` runs them one after another, each with
every earlier step's result as context (the seed's semantics); declared dependencies
make a DAG whose independent steps are dispatched together and run in parallel (see
:mod:`mesh.patterns.delegation.plan`). Each result marks its step done and dispatches what became
ready. At a checkpoint, or when a step fails, a reviewer may revise the rest of the
plan (a new version, published). When all steps are done a synthesizer builds the final
result: a :class:`WorkflowOutcome` with ``success``, ``final_output``, ``step_results``
(step id -> output) and the plan executed (``plan``, also ``plan_executed``), the
seed's field names. The records and topics are in
:mod:`mesh.patterns.delegation.workflow`, the specialists in
:mod:`mesh.patterns.delegation.specialist`.

A step with ``approval=True`` waits for a person's decision before it is dispatched
(:mod:`mesh.patterns.delegation.approval`); a
:class:`~mesh.patterns.delegation.budget.Budget` (tokens, model calls, cost, wall time;
``Coordinator(budget=)``, overridden by a request's ``budget`` field) stops a workflow
that would go over it (:mod:`mesh.patterns.delegation.budget`). Deadlines and wall time
are watched by a timer that appends markers to the decisions topic, so every change of a
workflow's state is made by one input.

With a plan key (``MESH_SECURITY__PLAN_KEY``) every task and plan version is signed,
specialists run only tasks that check (:mod:`mesh.patterns.delegation.signing`), and only signed
decisions are applied.

Kafka semantics: the workflow's state lives in a compacted workflows topic, written
before the handler's outputs (they are sent once it is acknowledged, so nothing a
person or a specialist sees can come from a state that a crash loses) and before the
input's offset is committed. A
coordinator killed -9 restarts from that topic (a step waiting for approval still
waits); an input it had applied and that is redelivered (the same record) re-sends only
what it caused that is still pending, so a step whose result was recorded is never
dispatched again (steps in flight at the crash may be; their late duplicate results are
ignored). Another record with an event id already applied (a duplicate delivery) is
ignored. One workflow's inputs are handled one at a time, whichever topic they come from.

Example (``examples/delegation.py`` runs a whole mesh):
    >>> topics = DelegationTopics.named("reports", ReportRequest,
    ...                                 specialists=["writer"])  # doctest: +SKIP
    >>> coordinator = Coordinator("reports", topics=topics, planner=my_planner,
    ...                           budget=Budget(tokens=50_000,
    ...                                         wall_time_s=600))  # doctest: +SKIP
"""
# Over 300 lines: the transitions share one state object; plan.py has the pure rules,
# workflow.py the records, approval.py and budget.py their models, signing.py signatures.

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import SecretStr

from mesh.agent import Agent, Context
from mesh.errors import ConfigError, HandlerError
from mesh.kafka.murmur import partition_for
from mesh.patterns.delegation.approval import DEFAULT_TIMEOUT_S, Decision, verify_decision
from mesh.patterns.delegation.budget import Budget, Usage, budget_of_request
from mesh.patterns.delegation.plan import (
    Plan,
    PlanError,
    Planner,
    Reviewer,
    StepResult,
    StepTask,
    Synthesizer,
    as_plan,
    collect,
    order_steps,
    validate_plan,
)
from mesh.patterns.delegation.signing import PlanKey
from mesh.patterns.delegation.specialist import Specialist, StepHandler, record_usage, specialist
from mesh.patterns.delegation.transition import (
    Transition,
    continued,
    due_markers,
    not_applicable,
    position,
)
from mesh.patterns.delegation.workflow import (
    AnyEventKind,
    ControlEventKind,
    DelegationTopics,
    EventKind,
    StepState,
    WorkflowEvent,
    WorkflowOutcome,
    WorkflowState,
    outcome_of,
)
from mesh.serde.avro import json_data
from mesh.topic import Topic

__all__ = ["Budget", "ControlEventKind", "Coordinator", "DelegationTopics", "EventKind",
           "Specialist", "StepHandler", "StepResult", "StepState", "StepTask", "Usage",
           "WorkflowEvent", "WorkflowOutcome", "WorkflowState", "record_usage", "specialist"]

logger = logging.getLogger(__name__)


class Coordinator(Agent[Any]):
    """The coordinator service of a delegation mesh (see the module docstring).

    Args:
        name: the agent (and default consumer group) name.
        topics: the mesh's topics; its ``tasks`` name the known specialists.
        planner: ``async (request) -> Plan``, e.g. a :class:`RulesPlanner`.
        reviewer: ``async (Review) -> Revision | None``, called at checkpoint steps and
            when a step fails; None keeps the plan (a failure then fails the workflow);
            raising :class:`~mesh.patterns.delegation.plan.ReviewRejected` fails it.
        synthesizer: ``async (Synthesis) -> Any``; default :func:`collect`.
        plan_key: the key to sign tasks and plans with; default: the runner's
            ``MESH_SECURITY__PLAN_KEY``. Neither: unsigned (insecure, warned once).
        budget: the limits of every workflow (a request's ``budget`` field overrides
            them one by one); None: no limits.
        approval_timeout_s: how long a step waits for a decision when its plan step
            does not say (``approval_timeout_s``); then it is rejected.
        check_every_s: the timer's period for approval deadlines and wall time.
    """

    # Its plans, tasks, approval requests and events go out once the workflow's state is
    # written: a person who approves a requested step after a crash finds it waiting.
    state_first = True

    def __init__(self, name: str, *, topics: DelegationTopics, planner: Planner,
                 reviewer: Reviewer | None = None, synthesizer: Synthesizer = collect,
                 group: str | None = None, description: str = "",
                 plan_key: SecretStr | None = None, budget: Budget | None = None,
                 approval_timeout_s: float = DEFAULT_TIMEOUT_S,
                 check_every_s: float = 1.0) -> None:
        control: list[Topic[Any]] = [t for t in (topics.approvals, topics.decisions) if t]
        super().__init__(name, consumes=[topics.requests, topics.results,
                                         *([topics.decisions] if topics.decisions else [])],
                         produces=[topics.plans, topics.events, topics.outcomes,
                                   *topics.tasks.values(), *control],
                         state=[topics.workflows], group=group,
                         description=description or "delegation coordinator")
        if approval_timeout_s <= 0 or check_every_s <= 0:
            raise ConfigError(f"Coordinator {name!r}: approval_timeout_s "
                              f"({approval_timeout_s}) and check_every_s ({check_every_s}) "
                              "must be positive.")
        self.topics, self.planner = topics, planner
        self.reviewer, self.synthesizer = reviewer, synthesizer
        self.plan_key = PlanKey(name, "coordinator", key=plan_key)
        self.budget = budget or Budget()
        self.approval_timeout_s = approval_timeout_s
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._marked: dict[tuple[str, str, str], float] = {}  # timer markers sent: when
        self._resend_s = max(30.0, 10 * check_every_s)
        if topics.decisions is not None:
            self.every(check_every_s)(self._tick)

    async def on_start(self, settings: Any) -> None:
        self.plan_key.signer(settings)  # warns now if unsigned, fails on an empty key

    async def handle(self, payload: Any, ctx: Context) -> None:
        topic = ctx.event.topic or ""
        async with self._exclusive(self._workflow_of(payload, topic)):
            if topic == self.topics.results.name:
                await self._on_result(payload, ctx)
            elif self.topics.decisions and topic == self.topics.decisions.name:
                await self._on_decision(payload, ctx)
            else:
                await self._on_request(payload, ctx)

    async def on_failure(self, payload: Any, ctx: Context, error: BaseException) -> None:
        """The planner, reviewer or synthesizer failed for good: the workflow fails. A
        result naming no known workflow is reported as ignored (and dead-lettered), so
        is a decision that failed (e.g. its signature did not check)."""
        why = f"{type(error).__name__}: {error}"
        topic = ctx.event.topic
        if self.topics.decisions and topic == self.topics.decisions.name:
            self._event(ctx, payload.workflow_id, "DecisionIgnored",
                        f"Decision on step {payload.step_id!r} ({payload.verdict()}) ignored "
                        f"and dead-lettered: {why}", step_id=payload.step_id)
            return
        if topic != self.topics.results.name:  # no state: a replay may retry
            wf = self._workflow_id(payload)
            self._event(ctx, wf, "WorkflowFailed", f"Planning failed: {why}")
            ctx.emit(self.topics.outcomes, WorkflowOutcome(
                workflow_id=wf, success=False, error=f"Planning failed: {why}"))
            return
        async with self._exclusive(payload.workflow_id):
            current = ctx.get(self.topics.workflows, payload.workflow_id)
            if current is None:
                self._ignore(ctx, payload, f"no such workflow (dead-lettered to "
                                           f"{self.topics.results.dlq_name})")
            elif current.status == "running":
                turn = Transition(self, ctx, current.model_copy(deep=True))
                turn.fail(payload.step_id, f"Coordinator failed on the result of step "
                                           f"{payload.step_id!r}: {why}")
                turn.save()

    @contextlib.asynccontextmanager
    async def _exclusive(self, workflow_id: str) -> AsyncIterator[None]:
        """One input of a workflow at a time, from whichever topic: a decision and a
        result of one workflow may otherwise overlap (ordering is per topic partition).
        The runtime applies a handler's state writes as soon as it returns, before it
        awaits anything, so the next holder reads them."""
        lock, users = self._locks.setdefault(workflow_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[workflow_id]

    def _workflow_of(self, payload: Any, topic: str) -> str:
        if topic == self.topics.requests.name:
            return self._workflow_id(payload)
        return str(payload.workflow_id)

    def _workflow_id(self, request: Any) -> str:
        return str(getattr(request, self.topics.requests.key or "workflow_id"))

    def _event(self, ctx: Context, wf: str, kind: AnyEventKind, message: str, *,
               state: WorkflowState | None = None, **extra: Any) -> None:
        event = WorkflowEvent(workflow_id=wf, kind=kind, message=message, **extra)
        ctx.emit(self.topics.events, event, **continued(ctx, state, self.topics.decisions))

    def validate(self, plan: Plan) -> None:
        """:func:`validate_plan`, and approval steps need the approvals topics."""
        validate_plan(plan, self.topics.tasks)
        asking = [s.id for s in plan.steps if s.approval]
        if asking and self.topics.decisions is None:
            raise PlanError([f"Steps {', '.join(asking)} ask for approval, but the mesh has "
                             "no approvals and decisions topics. Declare them "
                             "(DelegationTopics.named does) or drop approval=True."])

    async def _on_request(self, request: Any, ctx: Context) -> None:
        wf = self._workflow_id(request)
        existing = ctx.get(self.topics.workflows, wf)
        if existing is not None:
            Transition(self, ctx, existing).replay_or_ignore()
            return
        self._event(ctx, wf, "WorkflowStarted", f"Workflow {wf!r} received; planning.")
        plan: Plan | None = None
        try:
            planned = as_plan(await self.planner(request))
            plan = planned.model_copy(update={
                "workflow_id": wf, "version": 1, "signature": "",
                "steps": order_steps(planned.steps)})  # a list without depends_on: in order
            self.validate(plan)
        except PlanError as exc:
            self._reject(ctx, wf, request, exc, plan)
            return
        budget = self.budget.merged(budget_of_request(request))
        turn = Transition(self, ctx, WorkflowState(
            workflow_id=wf, status="running", plan=plan, request=json_data(request),
            handled={ctx.event_id: position(ctx)}, budget=budget or None,
            started_ms=ctx.event.produced_at_ms, correlation_id=ctx.correlation_id,
            traceparent=ctx.traceparent, carried=ctx.carried))
        turn.publish_plan()
        await turn.advance()
        turn.save()

    def _reject(self, ctx: Context, wf: str, request: Any, error: PlanError,
                plan: Plan | None) -> None:
        logger.warning("workflow %s: plan invalid: %s", wf, error)
        self._event(ctx, wf, "PlanInvalid", str(error), plan_version=1)
        state = WorkflowState(workflow_id=wf, status="failed", request=json_data(request),
                              plan=plan or Plan(steps=[], workflow_id=wf), error=str(error),
                              handled={ctx.event_id: position(ctx)}, finished_by=position(ctx))
        ctx.put(self.topics.workflows, wf, state)
        ctx.emit(self.topics.outcomes, outcome_of(state))

    async def _on_result(self, result: StepResult, ctx: Context) -> None:
        current = ctx.get(self.topics.workflows, result.workflow_id)
        if current is None:  # the state is written with the dispatch: this is bad input
            raise HandlerError(
                f"Result of step {result.step_id!r} ({result.dispatch_id}) names workflow "
                f"{result.workflow_id!r}, which coordinator {self.name!r} has no state for. "
                f"Check who produced it to {self.topics.results.name}.")
        if ctx.event_id in current.handled:
            Transition(self, ctx, current).replay_or_ignore()
            return
        step = current.steps.get(result.step_id)
        if current.status != "running":
            self._ignore(ctx, result, f"the workflow is {current.status}")
        elif step is None or step.dispatch_id != result.dispatch_id:
            self._ignore(ctx, result, "not the current dispatch of the step")
        elif step.status != "dispatched":
            self._ignore(ctx, result, f"the step is already {step.status}")
        else:
            turn = Transition(self, ctx, current.model_copy(deep=True))
            turn.state.handled[ctx.event_id] = turn.position
            await turn.apply(result)
            turn.save()

    async def _on_decision(self, decision: Decision, ctx: Context) -> None:
        signer = self.plan_key.for_context(ctx)
        if decision.kind == "decision" and signer is not None:
            verify_decision(signer, decision)  # raises: dead-lettered, DecisionIgnored
        current = ctx.get(self.topics.workflows, decision.workflow_id)
        if current is not None and ctx.event_id in current.handled:
            Transition(self, ctx, current).replay_or_ignore()
            return
        why = not_applicable(current, decision, ctx.event.produced_at_ms)
        if why is not None:
            if decision.kind == "decision":  # a marker that came late is no news
                self._event(ctx, decision.workflow_id, "DecisionIgnored",
                            f"Decision on step {decision.step_id!r} ({decision.verdict()}) "
                            f"ignored: {why}.", step_id=decision.step_id, state=current)
            return
        assert current is not None
        turn = Transition(self, ctx, current.model_copy(deep=True))
        turn.state.handled[ctx.event_id] = turn.position
        await turn.decide(decision)
        turn.save()

    def _ignore(self, ctx: Context, result: StepResult, why: str) -> None:
        logger.info("workflow %s: result of %s (%s) ignored: %s", result.workflow_id,
                    result.step_id, result.dispatch_id, why)
        self._event(ctx, result.workflow_id, "ResultIgnored",
                    f"Result of step {result.step_id!r} ({result.dispatch_id}) ignored: {why}.",
                    step_id=result.step_id, specialist=result.specialist)

    async def _tick(self, ctx: Context) -> None:
        """Append a marker to the decisions topic for each approval past its deadline
        and each workflow past its wall time, in the partitions this replica owns (once,
        and again if it went unapplied for a while)."""
        decisions = self.topics.decisions
        assert decisions is not None
        now_ms, now = int(time.time() * 1000), time.monotonic()
        due: set[tuple[str, str, str]] = set()
        for wf, state in list(ctx.table(self.topics.workflows).items()):
            if state.status != "running" or not ctx.owns(
                    decisions, partition_for(wf.encode(), decisions.partitions)):
                continue
            for kind, step_id in due_markers(state, now_ms):
                mark = (wf, kind, step_id)
                due.add(mark)
                if now - self._marked.get(mark, -self._resend_s) < self._resend_s:
                    continue
                self._marked[mark] = now
                marker = Decision(workflow_id=wf, step_id=step_id, kind=kind, by=self.name)
                ctx.emit(decisions, marker, **continued(ctx, state, decisions))
        for gone in set(self._marked) - due:
            del self._marked[gone]
