"""Specialists of a delegation mesh: agents that do one step each and answer with a result.

A :class:`Specialist` consumes its task topic, runs ``handler(task, ctx)`` and produces a
:class:`~mesh.patterns.delegation.plan.StepResult` to the results topic. Inside the handler,
:func:`record_usage` adds to what the step cost (tokens, model calls, money: from the
model's answer, e.g. pydantic-ai's ``result.usage()``); the total travels on the result
(``usage``, also on a failed result: the tokens were spent) and on the attempt's audit
record (``details``: tokens, calls, cost), reaches the workflow's budget
(:mod:`mesh.patterns.delegation.budget`) and is counted per specialist for ``/metrics``
(``mesh_step_tokens_total``, ``mesh_step_calls_total``, ``mesh_step_cost_total``:
:class:`StepMetrics`, in the host's metrics from the specialist's start).

Example:
    >>> @specialist("writer", topics=topics)  # doctest: +SKIP
    ... async def writer(task: StepTask, ctx: Context) -> dict:
    ...     answer = await model_agent.run(task.input["brief"])
    ...     record_usage(tokens=answer.usage().total_tokens, calls=answer.usage().requests)
    ...     return {"text": answer.output}
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import Any

from prometheus_client.core import CounterMetricFamily
from pydantic import SecretStr

from mesh.agent import Agent, Context
from mesh.errors import ConfigError, SignatureInvalid
from mesh.patterns.delegation.budget import Usage
from mesh.patterns.delegation.plan import StepResult, StepTask
from mesh.patterns.delegation.signing import PlanKey
from mesh.patterns.delegation.workflow import DelegationTopics
from mesh.runtime.metrics import Members, host_metrics
from mesh.serde.avro import json_data

StepHandler = Callable[[StepTask, Context], Awaitable[Any]]

# The usage of the step being run; a list, so tasks the handler starts (which copy the
# context) add to the same total.
_meter: ContextVar[list[Usage] | None] = ContextVar("mesh_step_usage", default=None)


def record_usage(usage: Usage | None = None, *, tokens: int = 0, calls: int = 0,
                 cost: float = 0.0) -> bool:
    """Add ``usage`` (or ``tokens``, ``calls``, ``cost``) to the cost of the step being
    run. Call it from a specialist's handler (or code it calls), once per model call or
    once with the total. Returns False, recording nothing, outside a step.

    Example:
        >>> record_usage(tokens=120, calls=1)  # not inside a specialist's step
        False
    """
    meter = _meter.get()
    if meter is None:
        return False
    meter.append((usage or Usage()) + Usage(tokens=tokens, calls=calls, cost=cost))
    return True


class StepUsageStats:
    """What one specialist's steps reported they cost, for ``/metrics``."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        self.steps = 0
        self.tokens = 0
        self.calls = 0
        self.cost = 0.0

    def add(self, usage: Usage) -> None:
        self.steps += 1
        self.tokens += usage.tokens
        self.calls += usage.calls
        self.cost += usage.cost


class StepMetrics(Members[StepUsageStats]):
    """The specialists reported by one metrics registry (a part, see
    :meth:`mesh.runtime.metrics.MeshMetrics.part`): what their steps reported they cost,
    summed by specialist, read when Prometheus scrapes."""

    def collect(self) -> Iterator[Any]:
        families = [CounterMetricFamily(f"mesh_step_{what}", help_text, labels=["agent"])
                    for what, help_text in (
                        ("tokens", "Tokens delegated steps reported (record_usage)"),
                        ("calls", "Model calls delegated steps reported (record_usage)"),
                        ("cost", "Cost delegated steps reported (record_usage)"))]
        totals: dict[str, list[float]] = {}
        for stats in self.snapshot():
            total = totals.setdefault(stats.agent, [0, 0, 0.0])
            for i, value in enumerate((stats.tokens, stats.calls, stats.cost)):
                total[i] += value
        for agent, values in sorted(totals.items()):
            for family, value in zip(families, values, strict=True):
                family.add_metric([agent], value)
        yield from families


class Specialist(Agent[StepTask]):
    """A specialist: consumes its task topic, runs ``handler(task, ctx)``, produces a
    :class:`StepResult` to the results topic. Retriable errors are retried (the agent's
    ``RetryPolicy``: through retry topics by default); a task failing for good gives a failed
    ``StepResult`` naming the error (and the task is dead-lettered). With a plan key
    (``plan_key=``, else ``MESH_SECURITY__PLAN_KEY``) a task the coordinator did not sign
    for it is dead-lettered as ``SignatureInvalid``, unrun and unanswered. What the
    handler reports with :func:`record_usage` goes on the result as ``usage``."""

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
        self.usage_stats = StepUsageStats(name)
        self._spent: dict[str, Usage] = {}  # dispatch id -> usage of its failed attempts

    async def on_start(self, settings: Any) -> None:
        self.plan_key.signer(settings)  # warns now if unsigned, fails on an empty key
        metrics = host_metrics()
        if metrics is not None:
            metrics.part(StepMetrics).add(self.usage_stats)

    async def handle(self, task: StepTask, ctx: Context) -> StepResult:
        signer = self.plan_key.for_context(ctx)
        if signer is not None:
            signer.verify_task(task, specialist=self.name)  # before any work is done
        meter: list[Usage] = []
        token = _meter.set(meter)
        try:
            output = await self._work(task, ctx)
        finally:
            _meter.reset(token)
            self._charge(task, meter, ctx)
        return self._result(task, ok=True, output=json_data(output),
                            usage=self._spent.pop(task.dispatch_id, None))

    async def on_failure(self, task: StepTask, ctx: Context, error: BaseException) -> None:
        if isinstance(error, SignatureInvalid):  # not our work: answer nothing
            return
        ctx.emit(self.results, self._result(task, ok=False,
                                            error=f"{type(error).__name__}: {error}",
                                            usage=self._spent.pop(task.dispatch_id, None)))

    def _charge(self, task: StepTask, meter: list[Usage], ctx: Context) -> None:
        """Count an attempt's usage, note it in the attempt's audit record
        (``details``: tokens, calls, cost), and keep it for the result (attempts retried
        in this process add up; a retry elsewhere reports only its own)."""
        if not meter:
            return
        used = sum(meter, Usage())
        self.usage_stats.add(used)
        ctx.annotate(tokens=used.tokens, calls=used.calls, cost=used.cost)
        self._spent[task.dispatch_id] = self._spent.get(task.dispatch_id, Usage()) + used
        if len(self._spent) > 10_000:  # dispatches that never answered (stolen by a rebalance)
            self._spent.pop(next(iter(self._spent)))

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
