"""Budgets of delegated workflows: what a step cost, and the limits a workflow keeps to.

A specialist reports what a step cost, when its model says (tokens, model calls, money),
with :func:`~mesh.patterns.delegation.specialist.record_usage`; the cost travels back on the
step's :class:`~mesh.patterns.delegation.plan.StepResult` as a :class:`Usage`, is added to the
workflow's usage in its state, and is published with the step's ``StepCompleted`` (or
``StepFailed``) event and, in total, with the :class:`WorkflowOutcome`.

A :class:`Budget` caps a workflow's tokens, calls, cost and wall time (any of them; None:
no limit). The coordinator has one (``Coordinator(budget=)``) and a request may carry its
own in a ``budget`` field, whose limits replace the coordinator's one by one
(:meth:`Budget.merged`). The rule (:meth:`Budget.exceeded`), checked on every input of
the workflow before anything more is dispatched:

* a usage **over** its limit stops the workflow, even when no step is left (a hard
  limit: the money is spent, the outcome says so);
* a usage **at** its limit stops it when there is still a step to dispatch, since any
  further model call would go over;
* wall time counts from the request's production time; a workflow waiting on a slow
  step (or on an approval) is stopped by the coordinator's timer.

Stopping is a ``BudgetExceeded`` event, then ``WorkflowFailed``, and a failed outcome
with the partial step results, the usage and ``budget_exceeded`` (which limit, how much
was used and allowed). Steps in flight then are not waited for: their results are ignored.

Example:
    >>> budget = Budget(tokens=1000, calls=4).merged(Budget(calls=2))
    >>> (budget.tokens, budget.calls)
    (1000, 2)
    >>> budget.exceeded(Usage(tokens=400, calls=2), elapsed_s=1.0, more=True).message()
    'calls budget exceeded: 2 used of 2 allowed, and steps remain'
    >>> budget.exceeded(Usage(tokens=400, calls=2), elapsed_s=1.0, more=False) is None
    True
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Limit = Literal["tokens", "calls", "cost", "wall_time_s"]


class Usage(BaseModel):
    """What one step (or a whole workflow) cost: model tokens, model calls, money (in
    whatever currency the specialists report; the coordinator only adds it up).

    Example:
        >>> Usage(tokens=10, calls=1) + Usage(tokens=5, calls=1, cost=0.01)
        Usage(tokens=15, calls=2, cost=0.01)
    """

    model_config = ConfigDict(frozen=True)

    tokens: int = Field(default=0, ge=0)
    calls: int = Field(default=0, ge=0)
    cost: float = Field(default=0.0, ge=0)

    def __add__(self, other: Usage) -> Usage:
        return Usage(tokens=self.tokens + other.tokens, calls=self.calls + other.calls,
                     cost=round(self.cost + other.cost, 9))

    def __bool__(self) -> bool:
        return bool(self.tokens or self.calls or self.cost)


class BudgetExceeded(BaseModel):
    """Which limit stopped a workflow: ``used`` of ``allowed`` (seconds for wall time)."""

    limit: Limit
    used: float
    allowed: float
    steps_remained: bool = False

    def message(self) -> str:
        """One line for events and errors.

        Example:
            >>> BudgetExceeded(limit="tokens", used=1200, allowed=1000).message()
            'tokens budget exceeded: 1200 used of 1000 allowed'
        """
        used, allowed = _number(self.used), _number(self.allowed)
        unit = " s" if self.limit == "wall_time_s" else ""
        name = "wall time" if self.limit == "wall_time_s" else self.limit
        tail = ", and steps remain" if self.steps_remained else ""
        return f"{name} budget exceeded: {used}{unit} used of {allowed}{unit} allowed{tail}"


class Budget(BaseModel):
    """A workflow's limits; None means no limit. Valid as a request field
    (``budget: Budget | None = None``) so a requester can set its own.

    Example:
        >>> Budget(wall_time_s=30).exceeded(Usage(), elapsed_s=31, more=True).limit
        'wall_time_s'
    """

    model_config = ConfigDict(frozen=True)

    tokens: int | None = Field(default=None, ge=0)
    calls: int | None = Field(default=None, ge=0)
    cost: float | None = Field(default=None, ge=0)
    wall_time_s: float | None = Field(default=None, gt=0)

    def merged(self, override: Budget | None) -> Budget:
        """This budget with the limits ``override`` sets in place of its own."""
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))

    def exceeded(self, usage: Usage, *, elapsed_s: float, more: bool) -> BudgetExceeded | None:
        """The first limit ``usage`` (after ``elapsed_s``) breaks, by the module's rule;
        ``more``: a step is still to be dispatched."""
        for limit, used in (("tokens", usage.tokens), ("calls", usage.calls),
                            ("cost", usage.cost)):
            allowed = getattr(self, limit)
            if allowed is not None and (used > allowed or (more and used >= allowed)):
                return BudgetExceeded(limit=limit, used=used, allowed=allowed,  # type: ignore[arg-type]
                                      steps_remained=more and used <= allowed)
        if self.wall_time_s is not None and elapsed_s > self.wall_time_s:
            return BudgetExceeded(limit="wall_time_s", used=round(elapsed_s, 3),
                                  allowed=self.wall_time_s)
        return None

    def __bool__(self) -> bool:
        return any(v is not None for v in self.model_dump().values())


def budget_of_request(request: Any) -> Budget | None:
    """A request's own budget: its ``budget`` field (a :class:`Budget` or a dict), if any.

    Example:
        >>> budget_of_request({"budget": {"tokens": 5}}) is None  # a dict is no request model
        True
    """
    raw = getattr(request, "budget", None)
    if raw is None or isinstance(raw, Budget):
        return raw
    return Budget.model_validate(raw if isinstance(raw, dict) else raw.model_dump())


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
