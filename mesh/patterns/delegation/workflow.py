"""The records of a delegated workflow: its state, its events, its outcome, its topics.

:mod:`mesh.patterns.delegation.coordinator` writes them; taps, views, ``mesh submit`` and tests
read them. Every topic but the task topics is keyed by workflow id and the ones the
coordinator consumes or keeps state in are co-partitioned (the range assignor then
gives one coordinator replica every record of a workflow).

Schema evolution: every field added since the first version has a default, so values
written before decode. Avro names an enum made from a ``Literal`` after its symbols,
so adding a symbol would rename it and strand older values: the event kinds added
with approvals and budgets are a second ``Literal`` beside the first
(``WorkflowEvent.kind: EventKind | ControlEventKind``), an Avro union whose first
branch still matches what older coordinators wrote.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, Field

from mesh.errors import ConfigError
from mesh.patterns.delegation.approval import ApprovalRequest, ApprovalState, Decision
from mesh.patterns.delegation.budget import Budget, BudgetExceeded, Usage
from mesh.patterns.delegation.plan import Plan, StepResult, StepTask
from mesh.topic import Topic, TopicBundle

EventKind = Literal["WorkflowStarted", "PlanPublished", "PlanInvalid", "StepDispatched",
                    "StepCompleted", "StepFailed", "CheckpointReviewed", "WorkflowCompleted",
                    "WorkflowFailed", "ResultIgnored"]
ControlEventKind = Literal["ApprovalRequested", "StepApproved", "StepRejected",
                           "DecisionIgnored", "BudgetExceeded"]
AnyEventKind = EventKind | ControlEventKind


class StepState(BaseModel):
    """A dispatched step in the workflow state; ``caused_by`` is the position of the
    input that dispatched it (re-sent if that input is redelivered)."""

    status: Literal["dispatched", "done", "failed"]
    dispatch_id: str
    caused_by: str
    output: Any = None
    error: str | None = None


class WorkflowState(BaseModel):
    """Everything the coordinator knows about one workflow (the workflows table).

    ``approvals`` holds the steps that asked for a decision (waiting, or decided);
    ``usage`` what the steps reported they cost; ``budget`` the limits in force (the
    coordinator's merged with the request's); ``started_ms`` the request's production
    time, from which wall time counts; ``correlation_id``, ``traceparent`` and
    ``carried`` (its ``tracestate`` and headers) the request's, carried by what the
    timer and decisions cause."""

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
    approvals: dict[str, ApprovalState] = Field(default_factory=dict)
    usage: Usage | None = None
    budget: Budget | None = None
    budget_exceeded: BudgetExceeded | None = None
    started_ms: int = 0
    correlation_id: str = ""
    traceparent: str = ""
    carried: dict[str, bytes] | None = None

    def results(self) -> dict[str, Any]:
        """The outputs of the done steps, in plan order."""
        done = {k: s.output for k, s in self.steps.items() if s.status == "done"}
        return {k: done[k] for k in self.plan.step_ids if k in done}

    def waiting(self) -> list[str]:
        """The steps waiting for a decision."""
        return [k for k, a in self.approvals.items() if a.status == "waiting"]


class WorkflowEvent(BaseModel):
    """What happened to a workflow, for taps, audit and dashboards. ``usage`` is a
    step's cost on its ``StepCompleted``/``StepFailed`` event, the workflow's total on
    ``BudgetExceeded``, which also carries the partial results (``step_results``: the
    output of each step done so far, as the failed outcome has them)."""

    workflow_id: str
    kind: AnyEventKind
    message: str
    step_id: str | None = None
    specialist: str | None = None
    plan_version: int | None = None
    usage: Usage | None = None
    step_results: dict[str, Any] | None = None


class WorkflowOutcome(BaseModel):
    """The answer to a request: the final output with every step's result and the plan
    executed, or the failure with the step that failed and the partial results. A
    workflow stopped by its budget says which limit in ``budget_exceeded``; ``usage``
    is what its steps reported they cost."""

    workflow_id: str
    success: bool
    final_output: Any = None
    step_results: dict[str, Any] = Field(default_factory=dict)
    plan: Plan | None = None
    failed_step: str | None = None
    error: str | None = None
    usage: Usage | None = None
    budget_exceeded: BudgetExceeded | None = None

    @property
    def plan_executed(self) -> Plan | None:
        """The plan executed (its last version): the seed's name for ``plan``."""
        return self.plan


def outcome_of(state: WorkflowState) -> WorkflowOutcome:
    """The outcome a finished workflow's state says."""
    return WorkflowOutcome(
        workflow_id=state.workflow_id, success=state.status == "completed",
        final_output=state.final_output, step_results=state.results(), plan=state.plan,
        failed_step=state.failed_step, error=state.error, usage=state.usage,
        budget_exceeded=state.budget_exceeded)


@dataclass(frozen=True, slots=True)
class DelegationTopics(TopicBundle):
    """The topics of one delegation mesh. ``tasks`` maps each specialist to its topic;
    ``approvals`` and ``decisions`` (optional: without them no step may ask for approval
    and wall time is checked only when an input arrives) carry human approval.

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
    approvals: Topic[ApprovalRequest] | None = None
    decisions: Topic[Decision] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", MappingProxyType(dict(self.tasks)))  # frozen too
        if self.requests.key is None:
            raise ConfigError(f"Requests topic {self.requests.name!r} has no key: key it by "
                              "the workflow id (key='workflow_id').")
        keyed = (self.requests, self.results, self.workflows, self.plans, self.decisions)
        counts = {t.name: t.partitions for t in keyed if t is not None}
        if len(set(counts.values())) != 1:
            raise ConfigError("Requests, results, decisions, workflows and plans must be "
                              "co-partitioned by workflow id, but their partition counts "
                              f"differ: {counts}. Give them the same partition count.")
        if not self.tasks:
            raise ConfigError("A delegation mesh needs at least one specialist task topic.")
        if (self.approvals is None) != (self.decisions is None):
            raise ConfigError("Approvals need both an approvals and a decisions topic; "
                              "pass both or neither.")

    @classmethod
    def named(cls, prefix: str, request_model: type[BaseModel], *, specialists: Iterable[str],
              key: str = "workflow_id", partitions: int = 3) -> DelegationTopics:
        """Topics called ``<prefix>.requests``, ``.plans``, ``.workflows``, ``.results``,
        ``.events``, ``.outcomes``, ``.approvals``, ``.decisions`` and
        ``.tasks.<specialist>``, co-partitioned."""
        def wf(name: str, model: type[BaseModel], compacted: bool = False) -> Topic[Any]:
            return Topic(f"{prefix}.{name}", model, key="workflow_id", partitions=partitions,
                         compacted=compacted)
        return cls(
            requests=Topic(f"{prefix}.requests", request_model, key=key, partitions=partitions),
            plans=wf("plans", Plan, True), workflows=wf("workflows", WorkflowState, True),
            results=wf("results", StepResult), events=wf("events", WorkflowEvent),
            outcomes=wf("outcomes", WorkflowOutcome),
            tasks={s: Topic(f"{prefix}.tasks.{s}", StepTask, key="task_id",
                            partitions=partitions) for s in specialists},
            approvals=wf("approvals", ApprovalRequest), decisions=wf("decisions", Decision))

    def all(self) -> list[Topic[Any]]:
        """Every topic, for ``apply_topics``."""
        extra = [t for t in (self.approvals, self.decisions) if t is not None]
        return [self.requests, self.plans, self.workflows, self.results, self.events,
                self.outcomes, *extra, *self.tasks.values()]
