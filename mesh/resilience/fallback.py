"""Fallback agents: when the primary handler fails for good, the next one answers.

:func:`with_fallbacks` wraps a primary agent and an ordered list of fallbacks (plain
handlers or other agents, whose ``handle`` is used) into one agent, a :class:`Fallbacks`.
For each input it tries level 0 (the primary) first, so traffic returns to the primary
as soon as it answers again (e.g. its breaker closed). A level is given up when:

* it raises a non-retriable error, or a retriable one ``retries_per_level`` times
  (retried in place with a short backoff), or
* it raises :class:`~mesh.errors.BreakerOpen`: its breaker is open, so the next level is
  tried *at once*; the input is not held (the runtime would hold it if the error escaped).

A failed level's emits and state writes are dropped; only the answering level's go out.

**Which level answered** is said twice:

* a result model: declare the produced topic with ``fallback_result(Model)`` and a
  ``Model`` returned by any level is wrapped as ``{success, used_fallback,
  fallback_level, handler, result}`` (the seed article's fallback result). A produced
  topic carrying a plain model gets the payload unchanged;
* a ``fallback_used`` event (level > 0) on ``<agent>.fallback-events`` naming the level,
  the handler and the errors of the levels before it.

When every level fails, the wrapper raises :class:`FallbacksExhausted` (not retriable,
carrying every attempt); the agent's failure handler emits one ``fallback_failed`` event
listing each level's error (level, handler, error class, message) and the runtime sends
the input to ``<topic>.dlq`` with the error class ``FallbacksExhausted``.

**Counted for /metrics**: each wrapper keeps a :class:`FallbackStats` (answers by level,
inputs exhausted) that :class:`FallbackMetrics` reads at scrape time
(``mesh_fallbacks_total{agent,level,handler}``, ``mesh_fallbacks_exhausted_total``), in
the metrics given to it or else in its host's (from its start under the host). Counts
are of handler runs: an input handled again after a crash counts again.

Example:
    >>> from pydantic import BaseModel
    >>> from mesh.topic import Topic
    >>> class Q(BaseModel):
    ...     qid: str
    >>> class A(BaseModel):
    ...     text: str
    >>> async def primary(q, ctx): raise TimeoutError("model busy")
    >>> async def cheap(q, ctx): return A(text="cheap answer")
    >>> main = Agent("answer", consumes=Topic("fb.q", Q, key="qid"),
    ...              produces=Topic("fb.a", fallback_result(A)), handler=primary)
    >>> wrapped = with_fallbacks(main, cheap, retries_per_level=2)
    >>> wrapped.name, [t.name for t in wrapped.produces]
    ('answer', ['fb.a', 'answer.fallback-events'])
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client.core import CounterMetricFamily
from pydantic import BaseModel, Field, create_model

from mesh.agent import Agent, Context, Handler
from mesh.errors import BreakerOpen, ConfigError, HandlerError, InputError, is_retriable
from mesh.runtime.metrics import Members, MeshMetrics, host_metrics
from mesh.topic import Topic

logger = logging.getLogger(__name__)

_RESULT_MODELS: dict[type[BaseModel], type[BaseModel]] = {}


class FallbackStats:
    """What one fallback-wrapped agent answered with, for ``/metrics``.

    ``answered[level]`` counts the inputs answered by ``level`` (0 = the primary, so
    ``answered[1:]`` are the fallbacks used); ``exhausted`` the inputs every level failed.

    Example:
        >>> FallbackStats("answer", ["answer", "cheap"]).answered
        [0, 0]
    """

    def __init__(self, agent: str, handlers: Sequence[str]) -> None:
        self.agent = agent
        self.handlers = tuple(handlers)  # by level
        self.answered = [0] * len(self.handlers)
        self.exhausted = 0


class FallbackMetrics(Members[FallbackStats]):
    """The fallback agents reported by one metrics registry (a part, see
    :meth:`mesh.runtime.metrics.MeshMetrics.part`), read when Prometheus scrapes:

    * ``mesh_fallbacks_total{agent,level,handler}``: inputs answered by fallback level
      ``level`` (1 = the first fallback; the primary's answers are not counted here);
    * ``mesh_fallbacks_exhausted_total{agent}``: inputs every level failed
      (dead-lettered).

    Wrappers of one agent name (two replicas in one process) are summed.
    """

    def collect(self) -> Iterator[Any]:
        used = CounterMetricFamily("mesh_fallbacks", "Inputs answered by a fallback level "
                                   "(1 = the first fallback)",
                                   labels=["agent", "level", "handler"])
        exhausted = CounterMetricFamily("mesh_fallbacks_exhausted", "Inputs every fallback "
                                        "level failed (then dead-lettered)", labels=["agent"])
        answered: dict[tuple[str, int, str], int] = {}
        failed: dict[str, int] = {}
        for stats in self.snapshot():
            for level in range(1, len(stats.handlers)):
                key = (stats.agent, level, stats.handlers[level])
                answered[key] = answered.get(key, 0) + stats.answered[level]
            failed[stats.agent] = failed.get(stats.agent, 0) + stats.exhausted
        for (agent, level, handler), count in sorted(answered.items()):
            used.add_metric([agent, str(level), handler], count)
        for agent, count in sorted(failed.items()):
            exhausted.add_metric([agent], count)
        yield from (used, exhausted)


class FallbackAttempt(BaseModel):
    """One level's failure: which level, which handler, what it raised."""

    level: int
    handler: str
    error_class: str
    error: str
    tries: int = 1


class FallbackEvent(BaseModel):
    """``fallback_used`` (a level > 0 answered) or ``fallback_failed`` (all failed)."""

    kind: Literal["fallback_used", "fallback_failed"]
    agent: str
    correlation_id: str
    event_id: str
    fallback_level: int | None = None
    handler: str | None = None
    attempts: list[FallbackAttempt] = Field(default_factory=list)


class FallbacksExhausted(HandlerError):
    """Every level failed; ``attempts`` lists each level's error. Never retried.

    Example:
        >>> err = FallbacksExhausted("answer", [])
        >>> err.retriable
        False
    """

    def __init__(self, agent: str, attempts: Sequence[FallbackAttempt]) -> None:
        summary = "; ".join(f"level {a.level} {a.handler}: {a.error_class}: {a.error}"
                            for a in attempts)
        super().__init__(f"Agent {agent!r}: all {len(attempts)} levels failed ({summary}). "
                         "Fix a level or replay the dead letter.", retriable=False)
        self.attempts = list(attempts)


def fallback_result(model: type[BaseModel]) -> type[BaseModel]:
    """The result model saying which level answered, wrapping ``model`` (cached).

    Example:
        >>> class A(BaseModel):
        ...     text: str
        >>> sorted(fallback_result(A).model_fields)
        ['fallback_level', 'handler', 'result', 'success', 'used_fallback']
    """
    found = _RESULT_MODELS.get(model)
    if found is None:
        found = create_model(f"{model.__name__}Fallback", __doc__=f"A {model.__name__} "
                             "and the fallback level that produced it.",
                             success=(bool, True), used_fallback=(bool, False),
                             fallback_level=(int, 0), handler=(str, ""), result=(model, ...))
        found.__fallback_of__ = model  # type: ignore[attr-defined]
        _RESULT_MODELS[model] = found
    return found


@dataclass(frozen=True, slots=True)
class _Level:
    """One level: its name, what it runs, and the agent it comes from (if any)."""

    name: str
    handler: Handler
    agent: Agent[Any] | None = None


def events_topic(name: str, partitions: int = 3) -> Topic[FallbackEvent]:
    """The topic of an agent's fallback events (``mesh tap <name>.fallback-events``)."""
    return Topic(f"{name}.fallback-events", FallbackEvent, key="correlation_id",
                 partitions=partitions)


class Fallbacks(Agent[Any]):
    """An agent consuming what ``primary`` consumes that answers with the first level that
    succeeds (see the module docstring). Fallback agents' produced topics are added.

    Args:
        primary: level 0; its name, group, inputs and outputs are the new agent's.
        fallbacks: levels 1.. in order: handlers ``(payload, ctx)`` or agents.
        retries_per_level: attempts per level for retriable errors (>= 1).
        name: the new agent's name (default: the primary's).
        events: where fallback events go (default ``<name>.fallback-events``).
        backoff_s: the pause between a level's retries.
        metrics: where :attr:`stats` are served (default: the host's, from
            :meth:`on_start`).
    """

    def __init__(self, primary: Agent[Any], *fallbacks: Agent[Any] | Handler,
                 retries_per_level: int = 1, name: str | None = None,
                 events: Topic[FallbackEvent] | None = None, backoff_s: float = 0.05,
                 metrics: MeshMetrics | None = None) -> None:
        if retries_per_level < 1:
            raise ConfigError(f"retries_per_level={retries_per_level} must be at least 1.")
        if not fallbacks:
            raise ConfigError(f"Agent {primary.name!r}: with_fallbacks needs at least one "
                              "fallback handler or agent.")
        agent_name = name or primary.name
        self.primary = primary
        self.levels = _levels(primary, fallbacks)
        self.events = events or events_topic(agent_name)
        produced = [*_produced(primary, fallbacks), self.events]
        super().__init__(agent_name, consumes=primary.consumes, produces=produced,
                         group=primary.group if name is None else None,
                         description=primary.description or f"{agent_name} with fallbacks",
                         state=primary.state)
        self.retries_per_level, self.backoff_s = retries_per_level, backoff_s
        self.stats = FallbackStats(agent_name, [level.name for level in self.levels])
        self._wrapped: dict[type[BaseModel], Topic[Any]] = {
            t.model.__fallback_of__: t for t in produced if hasattr(t.model, "__fallback_of__")}
        self._metrics = metrics
        if metrics is not None:
            metrics.part(FallbackMetrics).add(self.stats)

    async def on_start(self, settings: Any) -> None:
        """Report :attr:`stats` (to the host's metrics unless given others) and start
        every level that is an agent (an LLM agent resolves its model)."""
        metrics = self._metrics or host_metrics()
        if metrics is not None:
            metrics.part(FallbackMetrics).add(self.stats)
        for level in self.levels:
            if level.agent is not None:
                await level.agent.on_start(settings)

    async def handle(self, payload: Any, ctx: Context) -> Any:
        """Try each level in order; the first that answers gives the outputs."""
        failed: list[FallbackAttempt] = []
        for level, entry in enumerate(self.levels):
            answered, result = await self._attempt(level, entry, payload, ctx, failed)
            if answered:
                answer = self._answer(ctx, result, level, entry.name, failed)
                self.stats.answered[level] += 1
                return answer
        self.stats.exhausted += 1
        raise FallbacksExhausted(self.name, failed)

    async def _attempt(self, level: int, entry: _Level, payload: Any, ctx: Context,
                       failed: list[FallbackAttempt]) -> tuple[bool, Any]:
        """Run one level, retrying retriable errors in place: ``(True, result)`` if it
        answered, else ``(False, None)`` with its failure added to ``failed`` and its
        emits and state writes dropped."""
        outputs, staged = len(ctx.outputs), len(ctx.staged)
        for tries in range(1, self.retries_per_level + 1):
            try:
                return True, await entry.handler(payload, ctx)
            except InputError:  # bad for every level (a forged task): no fallback
                raise
            except Exception as exc:  # user code: this level failed (or its breaker)
                del ctx.outputs[outputs:], ctx.staged[staged:]
                if (is_retriable(exc) and not isinstance(exc, BreakerOpen)
                        and tries < self.retries_per_level):
                    await asyncio.sleep(self.backoff_s * tries)
                    continue
                failed.append(FallbackAttempt(level=level, handler=entry.name,
                                              error_class=type(exc).__name__,
                                              error=(str(exc) or type(exc).__name__)[:1000],
                                              tries=tries))
                logger.info("agent %s: level %d (%s) failed: %s", self.name, level,
                            entry.name, exc)
                break
        return False, None

    def _answer(self, ctx: Context, result: Any, level: int, handler: str,
                failed: list[FallbackAttempt]) -> list[BaseModel]:
        """The answering level's outputs, wrapped in the result model where the produced
        topic carries one; a ``fallback_used`` event when a fallback answered."""
        if level > 0:
            ctx.emit(self.events, FallbackEvent(
                kind="fallback_used", agent=self.name, correlation_id=ctx.correlation_id,
                event_id=ctx.event_id, fallback_level=level, handler=handler,
                attempts=failed))
        items = [] if result is None else (
            list(result) if isinstance(result, (list, tuple)) else [result])
        out = []
        for item in items:
            topic = self._wrapped.get(type(item))
            if topic is not None:
                item = topic.model(used_fallback=level > 0, fallback_level=level,
                                   handler=handler, result=item)
            out.append(item)
        return out

    async def on_failure(self, payload: Any, ctx: Context, error: BaseException) -> None:
        """Emit one ``fallback_failed`` event listing each level's error, then run the
        primary's failure handler."""
        attempts = error.attempts if isinstance(error, FallbacksExhausted) else [
            FallbackAttempt(level=-1, handler=self.name, error_class=type(error).__name__,
                            error=str(error)[:1000])]
        ctx.emit(self.events, FallbackEvent(kind="fallback_failed", agent=self.name,
                                            correlation_id=ctx.correlation_id,
                                            event_id=ctx.event_id, attempts=attempts))
        try:
            await self.primary.on_failure(payload, ctx, error)
        except Exception:  # the primary's own failure handler must not lose this event
            logger.exception("agent %s: the primary's on_failure raised", self.name)


def _levels(primary: Agent[Any], fallbacks: Sequence[Agent[Any] | Handler]
            ) -> tuple[_Level, ...]:
    levels = [_Level(primary.name, primary.handle, primary)]
    for index, item in enumerate(fallbacks, start=1):
        if isinstance(item, Agent):
            levels.append(_Level(item.name, item.handle, item))
        else:
            levels.append(_Level(getattr(item, "__name__", f"fallback{index}"), item))
    return tuple(levels)


def _produced(primary: Agent[Any], fallbacks: Sequence[Agent[Any] | Handler]
              ) -> list[Topic[Any]]:
    """The primary's produced topics, then those of fallback agents it lacks."""
    produced = list(primary.produces)
    for item in fallbacks:
        if isinstance(item, Agent):
            produced += [t for t in item.produces if t not in produced]
    return produced


def with_fallbacks(primary: Agent[Any], *fallbacks: Agent[Any] | Handler,
                   retries_per_level: int = 1, name: str | None = None,
                   events: Topic[FallbackEvent] | None = None, backoff_s: float = 0.05,
                   metrics: MeshMetrics | None = None) -> Fallbacks:
    """``primary`` with ``fallbacks``: a :class:`Fallbacks` agent (see it for every
    argument and the module docstring for what it does)."""
    return Fallbacks(primary, *fallbacks, retries_per_level=retries_per_level, name=name,
                     events=events, backoff_s=backoff_s, metrics=metrics)
