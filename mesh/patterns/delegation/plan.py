"""Delegation plans: a DAG of steps, each naming a specialist, its input and its
dependencies; the rules a plan must satisfy before anything is dispatched; how a step
travels to a specialist and back; and the pluggable parts that make and revise plans
(planner, reviewer, synthesizer).

Everything here is pure (no Kafka): the coordinator (:mod:`mesh.patterns.delegation.coordinator`)
calls it on every request and result. A plan is a payload: it is published, one
version after another, to the compacted plans topic keyed by workflow id.

**Order: a list runs in order unless it declares dependencies.** A plan (or a
reviewer's revision) in which *no* step declares ``depends_on`` is a sequence, as in
the seed's orchestrator: each step runs after every step listed before it, with every
earlier step's result in its task's ``context`` (keyed by step id). As soon as *any*
step declares ``depends_on``, the plan is a DAG and only declared dependencies count:
a step without ``depends_on`` then has none and starts at once, and steps whose
dependencies are done run in parallel, each with its dependencies' results as
context. (An empty ``depends_on`` is no declaration: a planner that writes ``[]``
everywhere gets a sequence.) :func:`order_steps` makes a sequence's order explicit
(each step's ``depends_on`` lists the earlier steps) before the plan is validated and
published, so the plan on the topic says exactly what runs after what, and
:func:`ready_steps` needs no rule of its own. A plan of only independent steps has
nothing to declare: it runs in order; to run such work in parallel, add the step that
uses the results with its ``depends_on`` (or use :mod:`mesh.patterns.gather`).

Example:
    >>> plan = Plan(steps=order_steps([
    ...     PlanStep(id="research", specialist="researcher"),
    ...     PlanStep(id="analyse", specialist="analyst"),
    ...     PlanStep(id="write", specialist="writer"),
    ... ]))
    >>> validate_plan(plan, ["researcher", "analyst", "writer"])
    >>> [s.depends_on for s in plan.steps]
    [[], ['research'], ['research', 'analyse']]
    >>> [s.id for s in ready_steps(plan, done={"research"})]
    ['analyse']
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mesh.errors import ConfigError, MeshError
from mesh.patterns.delegation.budget import Usage


class PlanError(MeshError):
    """A plan that cannot run: unknown specialist, missing dependency, cycle, duplicate
    step id, no steps. Never retriable: the same plan fails the same way.

    Attributes:
        problems: one message per problem found, each naming the value, the rule and
            the fix.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__(" ".join(self.problems))


class PlanStep(BaseModel):
    """One step: which specialist does it, with what input, after which steps.

    ``checkpoint`` asks the coordinator to call its reviewer when the step's result
    arrives, so the reviewer can revise the rest of the plan. ``approval`` makes the
    step wait, once ready, for a person's decision (:mod:`mesh.patterns.delegation.approval`) for
    at most ``approval_timeout_s`` (None: the coordinator's default), then it is
    rejected.

    Example:
        >>> PlanStep(id="analyse", specialist="analyst", depends_on=["research"],
        ...          checkpoint=True).checkpoint
        True
    """

    model_config = ConfigDict(frozen=True)

    id: str
    specialist: str
    input: dict[str, Any] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list)
    checkpoint: bool = False
    approval: bool = False
    approval_timeout_s: float | None = Field(default=None, gt=0)

    def same_work(self, other: PlanStep) -> bool:
        """Whether ``other`` asks for exactly this work (a revision that keeps a step
        in flight does not dispatch it again)."""
        return (self.specialist, self.input, sorted(self.depends_on)) == (
            other.specialist, other.input, sorted(other.depends_on))


class Plan(BaseModel):
    """A versioned plan for one workflow. A planner returns one with just ``steps``
    (and optionally ``reason``); the coordinator sets ``workflow_id`` and ``version``,
    and ``signature`` when it has a plan key (see :mod:`mesh.patterns.delegation.signing`).

    Example:
        >>> Plan(steps=[PlanStep(id="a", specialist="researcher")]).version
        1
    """

    model_config = ConfigDict(frozen=True)

    steps: list[PlanStep]
    workflow_id: str = ""
    version: int = 1
    reason: str = "initial plan"
    author: str = "planner"
    signature: str = ""  # HMAC of the rest, by the coordinator; "" when unsigned

    def step(self, step_id: str) -> PlanStep | None:
        """The step called ``step_id``, or None."""
        return next((s for s in self.steps if s.id == step_id), None)

    @property
    def step_ids(self) -> list[str]:
        return [s.id for s in self.steps]


class StepTask(BaseModel):
    """One step of a plan as dispatched to a specialist, with the results of its dependencies.

    Keyed by ``task_id`` (``<workflow>/<step>``) so parallel steps of one workflow
    spread over partitions and run concurrently. ``signature`` is the coordinator's
    HMAC of every other field (see :mod:`mesh.patterns.delegation.signing`): a specialist with
    the plan key runs only tasks whose signature checks."""

    task_id: str
    workflow_id: str
    step_id: str
    dispatch_id: str
    specialist: str
    plan_version: int
    input: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)
    signature: str = ""


class StepResult(BaseModel):
    """A specialist's answer for one dispatch: an output, or a failure after retries,
    with what the step cost when its specialist reported it (``usage``, see
    :mod:`mesh.patterns.delegation.budget`)."""

    workflow_id: str
    step_id: str
    dispatch_id: str
    specialist: str
    ok: bool
    output: Any = None
    error: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class Revision:
    """A reviewer's answer: these steps replace every step not yet done, because of
    ``reason``. Done steps are kept with their results; new steps may depend on them.

    Example:
        >>> Revision([PlanStep(id="fact-check", specialist="checker",
        ...                    depends_on=["analyse"])], reason="claims need checking").reason
        'claims need checking'
    """

    steps: Sequence[PlanStep]
    reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        if not self.reason.strip():
            raise PlanError(["A plan revision needs a reason (it is published with the "
                             "new version for the audit trail): pass reason=."])


class ReviewRejected(MeshError):
    """Raised by a reviewer to end the workflow as failed (e.g. a draft still not
    approved when the re-plans are used up): the message is the failed outcome's
    ``error``, and the done steps' results are kept in it. Never retriable.

    Example:
        >>> str(ReviewRejected("draft not approved after 2 re-plans: too short"))
        'draft not approved after 2 re-plans: too short'
    """


def order_steps(steps: Sequence[PlanStep], *, after: Sequence[str] = ()) -> list[PlanStep]:
    """``steps`` with their order made explicit (see the module docstring): when no step
    declares ``depends_on``, each step depends on ``after`` (steps done before these,
    e.g. those a revision keeps) and on every step before it; otherwise ``steps``
    unchanged.

    Example:
        >>> [s.depends_on for s in order_steps([PlanStep(id="a", specialist="r"),
        ...                                     PlanStep(id="b", specialist="w")])]
        [[], ['a']]
        >>> [s.depends_on for s in order_steps([
        ...     PlanStep(id="a", specialist="r"), PlanStep(id="b", specialist="r"),
        ...     PlanStep(id="c", specialist="w", depends_on=["a", "b"])])]
        [[], [], ['a', 'b']]
    """
    if any(step.depends_on for step in steps):
        return list(steps)
    earlier, ordered = list(after), []
    for step in steps:
        ordered.append(step.model_copy(update={"depends_on": list(earlier)}))
        earlier.append(step.id)
    return ordered


def validate_plan(plan: Plan, specialists: Collection[str]) -> None:
    """Check that ``plan`` can run with ``specialists``; raise :class:`PlanError` with
    every problem found otherwise.

    Rules: at least one step; step ids unique; every specialist known; every
    dependency a step of the plan; no cycles (a step depending on itself included).

    Example:
        >>> validate_plan(Plan(steps=[PlanStep(id="write-code", specialist="coder")]),
        ...               ["researcher", "writer"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        mesh.patterns.delegation.plan.PlanError: Unknown specialist 'coder' in step ...
    """
    where = f" of workflow {plan.workflow_id!r}" if plan.workflow_id else ""
    if not plan.steps:
        raise PlanError([f"Plan v{plan.version}{where} has no steps: a plan needs at "
                         "least one step. Fix the planner."])
    problems: list[str] = []
    seen: set[str] = set()
    for step in plan.steps:
        if step.id in seen:
            problems.append(f"Duplicate step id {step.id!r}{where}: step ids must be "
                            "unique. Rename one of them.")
        seen.add(step.id)
    known = ", ".join(sorted(specialists)) or "none"
    for step in plan.steps:
        if step.specialist not in specialists:
            problems.append(f"Unknown specialist {step.specialist!r} in step {step.id!r}: "
                            f"known are {known}. Register it or fix the plan.")
        for dep in step.depends_on:
            if dep not in seen:
                problems.append(f"Step {step.id!r} depends on {dep!r}, which is not a step "
                                f"of the plan (steps: {', '.join(plan.step_ids)}). Add the "
                                "step or remove the dependency.")
    cycle = find_cycle(plan.steps)
    if cycle:
        problems.append(f"Plan{where} has a dependency cycle: {' -> '.join(cycle)} (each "
                        "depends on the next). Steps must form a DAG: remove one of these "
                        "dependencies.")
    if problems:
        raise PlanError(problems)


def find_cycle(steps: Iterable[PlanStep]) -> list[str]:
    """A dependency cycle as a path back to its start, each step depending on the
    next (``['a', 'b', 'a']``), or ``[]``. Dependencies on unknown steps are ignored."""
    graph = {s.id: list(s.depends_on) for s in steps}
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for dep in graph.get(node, []):
            if dep not in graph or state.get(dep) == 2:
                continue
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            found = visit(dep)
            if found:
                return found
        path.pop()
        state[node] = 2
        return []

    for node in graph:
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def ready_steps(plan: Plan, *, done: Collection[str],
                started: Collection[str] = ()) -> list[PlanStep]:
    """The steps to dispatch now: not done, not started, every dependency done; in plan
    order. Steps returned together are independent of each other and run in parallel.
    Only declared dependencies count: pass a plan through :func:`order_steps` first
    for the sequential reading of a plan without any (the coordinator does).

    Example:
        >>> plan = Plan(steps=[PlanStep(id="a", specialist="r"),
        ...                    PlanStep(id="b", specialist="r"),
        ...                    PlanStep(id="c", specialist="w", depends_on=["a", "b"])])
        >>> [s.id for s in ready_steps(plan, done={"a"}, started={"b"})]
        []
        >>> [s.id for s in ready_steps(plan, done={"a", "b"})]
        ['c']
    """
    return [s for s in plan.steps
            if s.id not in done and s.id not in started
            and all(dep in done for dep in s.depends_on)]


def revise(plan: Plan, revision: Revision, *, done: Collection[str]) -> Plan:
    """The next version of ``plan``: its done steps, then the revision's steps in place
    of everything not yet done. A revision that declares no ``depends_on`` is a
    sequence after the done steps (:func:`order_steps`). Validate the result with
    :func:`validate_plan`.

    Example:
        >>> plan = Plan(steps=[PlanStep(id="a", specialist="r"),
        ...                    PlanStep(id="b", specialist="w", depends_on=["a"])])
        >>> new = revise(plan, Revision([PlanStep(id="c", specialist="w", depends_on=["a"])],
        ...                             reason="c instead of b"), done={"a"})
        >>> new.version, new.step_ids
        (2, ['a', 'c'])
    """
    kept = [s for s in plan.steps if s.id in done]
    new = order_steps(revision.steps, after=[s.id for s in kept])
    return plan.model_copy(update={"steps": kept + new,
                                   "version": plan.version + 1, "reason": revision.reason,
                                   "author": "reviewer", "signature": ""})


@dataclass(frozen=True, slots=True)
class Review:
    """What a reviewer sees: the workflow after ``step`` finished (or failed, with
    ``failure`` set), the plan, and the outputs of every done step."""

    workflow_id: str
    request: Any
    plan: Plan
    step: PlanStep
    results: Mapping[str, Any]
    failure: str | None = None


@dataclass(frozen=True, slots=True)
class Synthesis:
    """What a synthesizer sees when every step is done."""

    workflow_id: str
    request: Any
    plan: Plan
    results: Mapping[str, Any]


class Planner(Protocol):
    """Turns a request into a plan; an LLM planner implements this (raise
    :class:`PlanError` for a request it cannot plan)."""

    def __call__(self, request: Any, /) -> Awaitable[Plan]: ...


Reviewer = Callable[[Review], Awaitable[Revision | None]]
Synthesizer = Callable[[Synthesis], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Rule:
    """A planning rule: when ``when(request)`` holds, plan ``steps(request)``."""

    name: str
    steps: Callable[[Any], Sequence[PlanStep]]
    when: Callable[[Any], bool] = field(default=lambda request: True)


class RulesPlanner:
    """A planner from rules, tried in order; the first that matches plans.

    Example:
        >>> planner = RulesPlanner(Rule("report", lambda r: [
        ...     PlanStep(id="research", specialist="researcher")]))
        >>> import asyncio
        >>> asyncio.run(planner(object())).reason
        "rule 'report'"
    """

    def __init__(self, *rules: Rule) -> None:
        if not rules:
            raise ConfigError("RulesPlanner needs at least one Rule.")
        self.rules = rules

    async def __call__(self, request: Any, /) -> Plan:
        for rule in self.rules:
            if rule.when(request):
                return Plan(steps=list(rule.steps(request)), reason=f"rule {rule.name!r}")
        names = ", ".join(r.name for r in self.rules)
        raise PlanError([f"No planning rule matches the request (rules: {names}). Add a "
                         "rule for it or a catch-all rule last."])


async def collect(synthesis: Synthesis) -> Any:
    """The default synthesizer: the step results, in plan order."""
    return dict(synthesis.results)


def as_plan(raw: Any) -> Plan:
    """A planner's answer as a Plan: an LLM planner may return a dict or JSON text.

    Example:
        >>> as_plan({"steps": [{"id": "a", "specialist": "researcher"}]}).step_ids
        ['a']
    """
    if isinstance(raw, Plan):
        return raw
    try:
        if isinstance(raw, (str, bytes)):
            return Plan.model_validate_json(raw)
        return Plan.model_validate(raw)
    except ValidationError as exc:
        raise PlanError([f"The planner returned a {type(raw).__name__} that is not a plan "
                         f"({exc.error_count()} error(s): {exc.errors()[0]['msg']} at "
                         f"{'.'.join(map(str, exc.errors()[0]['loc'])) or 'top level'}). "
                         "Return mesh.patterns.delegation.plan.Plan or its JSON."]) from exc
