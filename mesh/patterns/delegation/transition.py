"""One input applied to one delegated workflow: the coordinator's transitions.

:class:`Transition` holds a copy of the workflow's state while one input (a request, a
result, a decision or a timer marker) changes it, and emits what the change causes:
plan versions, tasks, approval requests, events, the outcome. It is what
:class:`~mesh.patterns.delegation.coordinator.Coordinator` runs for each input; the Kafka
semantics (what a redelivered input re-sends) are described there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from mesh.agent import Context
from mesh.patterns.delegation.approval import ApprovalRequest, ApprovalState, Decision, DecisionKind
from mesh.patterns.delegation.budget import Usage
from mesh.patterns.delegation.plan import (
    Plan,
    PlanError,
    PlanStep,
    Review,
    ReviewRejected,
    StepResult,
    StepTask,
    Synthesis,
    ready_steps,
    revise,
)
from mesh.patterns.delegation.signing import PlanSigner
from mesh.patterns.delegation.workflow import (
    AnyEventKind,
    DelegationTopics,
    StepState,
    WorkflowState,
    outcome_of,
)
from mesh.serde.avro import json_data
from mesh.topic import Topic

if TYPE_CHECKING:
    from mesh.patterns.delegation.coordinator import Coordinator

logger = logging.getLogger(__name__)


def due_markers(state: WorkflowState, now_ms: int) -> list[tuple[DecisionKind, str]]:
    """The timer markers a running workflow needs now."""
    due: list[tuple[DecisionKind, str]] = [
        ("deadline", step_id) for step_id, a in state.approvals.items()
        if a.status == "waiting" and a.deadline_at_ms <= now_ms]
    wall = state.budget.wall_time_s if state.budget else None
    if wall is not None and state.started_ms + wall * 1000 < now_ms:
        due.append(("wall_time", ""))
    return due


def not_applicable(state: WorkflowState | None, decision: Decision, at_ms: int) -> str | None:
    """Why ``decision`` changes nothing (None: it applies)."""
    if state is None:
        return f"no workflow {decision.workflow_id!r}"
    if state.status != "running":
        return f"the workflow is {state.status}"
    if decision.kind == "wall_time":
        return None  # the turn checks the budget itself
    approval = state.approvals.get(decision.step_id)
    if approval is None:
        waiting = ", ".join(state.waiting()) or "none"
        return f"step {decision.step_id!r} did not ask for approval (waiting: {waiting})"
    if approval.status != "waiting":
        return f"the step was {approval.status} already" + (
            f" by {approval.by}" if approval.by else "")
    if decision.kind == "deadline" and at_ms < approval.deadline_at_ms:
        return "its deadline has not passed"
    return None


def continued(ctx: Context, state: WorkflowState | None, decisions: Topic[Decision] | None
              ) -> dict[str, Any]:
    """Outputs caused by a decision or a timer carry on the request's correlation id,
    trace and carried headers (a person's ``mesh approve`` knows none); others the
    input's."""
    if state is None or not state.correlation_id or (
            ctx.event.topic and (decisions is None or ctx.event.topic != decisions.name)):
        return {}
    return {"correlation_id": state.correlation_id, "traceparent": state.traceparent or None,
            "carried": state.carried}


def position(ctx: Context) -> str:
    return f"{ctx.event.topic}:{ctx.event.partition}:{ctx.event.offset}"


@dataclass(slots=True)
class Transition:
    """One input applied to one workflow: the state it changes and what it emits."""

    coordinator: Coordinator
    ctx: Context
    state: WorkflowState
    position: str = ""
    signer: PlanSigner | None = None

    def __post_init__(self) -> None:
        self.position = position(self.ctx)
        self.signer = self.coordinator.plan_key.for_context(self.ctx)

    def signed(self, plan: Plan) -> Plan:
        """``plan`` signed with the plan key (as it is, when unsigned)."""
        return self.signer.sign_plan(plan) if self.signer else plan

    @property
    def topics(self) -> DelegationTopics:
        return self.coordinator.topics

    def emit(self, topic: Topic[Any], payload: Any) -> None:
        self.ctx.emit(topic, payload, **continued(self.ctx, self.state, self.topics.decisions))

    def event(self, kind: AnyEventKind, message: str, **extra: Any) -> None:
        self.coordinator._event(self.ctx, self.state.workflow_id, kind, message,
                                state=self.state, **extra)

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
            self.emit(self.topics.plans, self.signed(self.state.plan))
        for step_id, step in self.state.steps.items():
            planned = self.state.plan.step(step_id)
            if step.status == "dispatched" and step.caused_by == self.position and planned:
                self.send(planned, step.dispatch_id)
        for step_id, approval in self.state.approvals.items():
            planned = self.state.plan.step(step_id)
            if approval.status == "waiting" and approval.caused_by == self.position and planned:
                self.ask(planned, approval)
        if self.state.finished_by == self.position:
            self.emit(self.topics.outcomes, outcome_of(self.state))

    def publish_plan(self) -> None:
        plan = self.state.plan = self.signed(self.state.plan)
        self.state.plan_caused_by = self.position
        self.emit(self.topics.plans, plan)
        self.event("PlanPublished", f"Plan v{plan.version} ({plan.reason}): "
                   f"{', '.join(plan.step_ids)}.", plan_version=plan.version)

    def send(self, step: PlanStep, dispatch_id: str) -> None:
        wf = self.state.workflow_id
        context = {d: self.state.steps[d].output for d in step.depends_on}
        task = StepTask(task_id=f"{wf}/{step.id}", workflow_id=wf, step_id=step.id,
                        dispatch_id=dispatch_id, specialist=step.specialist,
                        plan_version=self.state.plan.version, input=step.input,
                        context=context)
        self.emit(self.topics.tasks[step.specialist],
                  self.signer.sign_task(task) if self.signer else task)

    def ask(self, step: PlanStep, approval: ApprovalState) -> None:
        """Publish the approval request of ``step``."""
        assert self.topics.approvals is not None  # Coordinator.validate checked
        wf, seconds = self.state.workflow_id, (approval.deadline_at_ms
                                               - approval.requested_at_ms) / 1000
        self.emit(self.topics.approvals, ApprovalRequest(
            workflow_id=wf, step_id=step.id, specialist=step.specialist,
            plan_version=self.state.plan.version, input=step.input,
            requested_at_ms=approval.requested_at_ms, deadline_at_ms=approval.deadline_at_ms,
            message=f"Step {step.id!r} ({step.specialist}) of workflow {wf!r} waits for "
                    f"approval for {seconds:g} s, then is rejected: `mesh approve {wf} "
                    f"{step.id}` or `mesh reject {wf} {step.id} --reason TEXT`."))

    async def advance(self) -> None:
        """Dispatch every ready step (together: they run in parallel), ask for approval
        where a step needs it, or finish; unless the budget stops the workflow."""
        done = {k for k, s in self.state.steps.items() if s.status == "done"}
        plan = self.state.plan
        if done >= set(plan.step_ids):
            if not self.over_budget(more=False):
                await self.complete()
            return
        approvals = self.state.approvals
        held = {k for k, a in approvals.items() if a.status != "approved"}
        ready = ready_steps(plan, done=done, started=self.state.steps.keys() | held)
        if self.over_budget(more=bool(ready)):
            return
        for step in ready:
            if step.approval and step.id not in approvals:
                self.request_approval(step)
                continue
            dispatch_id = f"{self.state.workflow_id}/{step.id}/v{plan.version}"
            self.state.steps[step.id] = StepState(status="dispatched", dispatch_id=dispatch_id,
                                                  caused_by=self.position)
            self.send(step, dispatch_id)
            self.event("StepDispatched", f"Step {step.id!r} dispatched to {step.specialist}.",
                       step_id=step.id, specialist=step.specialist, plan_version=plan.version)

    def request_approval(self, step: PlanStep) -> None:
        now = self.ctx.event.produced_at_ms
        seconds = step.approval_timeout_s or self.coordinator.approval_timeout_s
        approval = self.state.approvals[step.id] = ApprovalState(
            status="waiting", caused_by=self.position, requested_at_ms=now,
            deadline_at_ms=now + int(seconds * 1000))
        self.ask(step, approval)
        self.event("ApprovalRequested", f"Step {step.id!r} ({step.specialist}) waits for "
                   f"approval (deadline in {seconds:g} s).", step_id=step.id,
                   specialist=step.specialist, plan_version=self.state.plan.version)

    async def decide(self, decision: Decision) -> None:
        """Apply a decision, a deadline or a wall-time marker (it applies: see
        :func:`not_applicable`)."""
        if decision.kind == "wall_time":
            self.over_budget(more=True)
            return
        approval = self.state.approvals[decision.step_id]
        if decision.kind == "deadline":
            seconds = (approval.deadline_at_ms - approval.requested_at_ms) / 1000
            decision = decision.model_copy(update={
                "approved": False, "by": "deadline",
                "reason": f"no decision within {seconds:g} s"})
        approval.status = "approved" if decision.approved else "rejected"
        approval.by, approval.reason = decision.by or None, decision.reason or None
        planned = self.state.plan.step(decision.step_id)
        what = f"Step {decision.step_id!r}" + (f" ({planned.specialist})" if planned else "")
        if decision.approved:
            self.event("StepApproved", f"{what} {decision.verdict()}.", step_id=decision.step_id)
            await self.advance()
        else:
            self.event("StepRejected", f"{what} {decision.verdict()}.", step_id=decision.step_id)
            self.fail(decision.step_id, f"{what} {decision.verdict()}.")

    def over_budget(self, *, more: bool) -> bool:
        """Stop the workflow if its usage or wall time breaks its budget."""
        budget = self.state.budget
        if not budget:
            return False
        elapsed = (self.ctx.event.produced_at_ms - self.state.started_ms) / 1000
        exceeded = budget.exceeded(self.state.usage or Usage(), elapsed_s=elapsed, more=more)
        if exceeded is None:
            return False
        self.state.budget_exceeded = exceeded
        self.event("BudgetExceeded", f"Workflow {self.state.workflow_id!r} stopped: "
                   f"{exceeded.message()}.", usage=self.state.usage,
                   step_results=self.state.results())
        self.fail(None, f"Budget exceeded: {exceeded.message()}.")
        return True

    async def apply(self, result: StepResult) -> None:
        """Record ``result``; review at a checkpoint or on failure; then go on."""
        step = self.state.steps[result.step_id]
        planned = self.state.plan.step(result.step_id)
        assert planned is not None  # a dispatched step is in the current plan
        what = f"Step {planned.id!r} ({planned.specialist})"
        if result.usage:
            self.state.usage = (self.state.usage or Usage()) + result.usage
        if result.ok:
            step.status, step.output = "done", result.output
            self.event("StepCompleted", f"{what} done.", step_id=planned.id,
                       specialist=planned.specialist, usage=result.usage)
        else:
            step.status, step.error = "failed", result.error
            self.event("StepFailed", f"{what} failed: {result.error}", step_id=planned.id,
                       specialist=planned.specialist, usage=result.usage)
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
        """Ask the reviewer and apply its revision; "failed" if the reviewer raised
        :class:`ReviewRejected` or the revision was invalid (the workflow then failed)."""
        reviewer = self.coordinator.reviewer
        if reviewer is None:
            return "kept"
        try:
            revision = await reviewer(Review(
                self.state.workflow_id, self.request(), self.state.plan, step,
                self.state.results(), failure))
        except ReviewRejected as exc:
            self.event("CheckpointReviewed", f"Review after step {step.id!r}: workflow "
                       f"rejected: {exc}", step_id=step.id, plan_version=self.state.plan.version)
            self.fail(step.id, str(exc))
            return "failed"
        verdict = f"revised: {revision.reason}" if revision else "plan kept"
        self.event("CheckpointReviewed", f"Review after step {step.id!r}: {verdict}.",
                   step_id=step.id, plan_version=self.state.plan.version)
        if revision is None:
            return "kept"
        done = {k for k, s in self.state.steps.items() if s.status == "done"}
        new = revise(self.state.plan, revision, done=done)
        try:
            self.coordinator.validate(new)
        except PlanError as exc:
            self.event("PlanInvalid", f"Revision v{new.version} rejected: {exc}",
                       plan_version=new.version)
            self.fail(step.id, f"Revision v{new.version} after step {step.id!r} rejected: {exc}")
            return "failed"
        self.drop_replaced(new)
        self.state.plan = new
        self.publish_plan()
        return "revised"

    def drop_replaced(self, new: Plan) -> None:
        """Forget what ``new`` does not keep: steps in flight (a late result of one is
        ignored) and approvals of steps it changes (a late decision is ignored)."""
        def kept(step_id: str) -> bool:
            old, same = self.state.plan.step(step_id), new.step(step_id)
            return bool(old and same and same.same_work(old))

        for step_id, state in list(self.state.steps.items()):
            if not (state.status == "done" or (state.status == "dispatched" and kept(step_id))):
                del self.state.steps[step_id]
        for step_id in [k for k in self.state.approvals if not kept(k)]:
            del self.state.approvals[step_id]

    async def complete(self) -> None:
        synthesizer = self.coordinator.synthesizer
        output = await synthesizer(Synthesis(self.state.workflow_id, self.request(),
                                             self.state.plan, self.state.results()))
        self.state.final_output = json_data(output)
        self.state.status, self.state.finished_by = "completed", self.position
        self.emit(self.topics.outcomes, outcome_of(self.state))
        self.event("WorkflowCompleted", f"Workflow {self.state.workflow_id!r} completed: "
                   f"{len(self.state.plan.steps)} steps, plan v{self.state.plan.version}.",
                   plan_version=self.state.plan.version)

    def fail(self, step_id: str | None, error: str) -> None:
        self.state.status, self.state.finished_by = "failed", self.position
        self.state.failed_step, self.state.error = step_id, error
        self.emit(self.topics.outcomes, outcome_of(self.state))
        self.event("WorkflowFailed", error, step_id=step_id,
                   plan_version=self.state.plan.version)


