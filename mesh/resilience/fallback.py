"""Fallback agents: when the primary handler fails for good, the next one answers.

:func:`with_fallbacks` wraps a primary agent and an ordered list of fallbacks (plain
handlers or other agents, whose ``handle`` is used) into one :class:`~mesh.agent.Agent`.
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
inputs exhausted) that :func:`fallback_stats` lists for the process, read at scrape time
(``mesh_fallbacks_total{agent,level,handler}``, ``mesh_fallbacks_exhausted_total``).
Counts are of handler runs: an input handled again after a crash counts again.

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
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, create_model

from mesh.agent import Agent, Context, Handler
from mesh.errors import BreakerOpen, ConfigError, HandlerError, InputError, is_retriable
from mesh.topic import Topic

logger = logging.getLogger(__name__)

_RESULT_MODELS: dict[type[BaseModel], type[BaseModel]] = {}
_STATS: weakref.WeakSet[FallbackStats] = weakref.WeakSet()
_STATS_LOCK = threading.Lock()  # /metrics reads the set from the HTTP server's thread


class FallbackStats:
    """What one fallback-wrapped agent answered with, for ``/metrics``.

    ``answered[level]`` counts the inputs answered by ``level`` (0 = the primary, so
    ``answered[1:]`` are the fallbacks used); ``exhausted`` the inputs every level failed.

    Example:
        >>> stats = FallbackStats("answer", ["answer", "cheap"])
        >>> stats.answered, stats in fallback_stats()
        ([0, 0], True)
    """

    def __init__(self, agent: str, handlers: Sequence[str]) -> None:
        self.agent = agent
        self.handlers = tuple(handlers)  # by level
        self.answered = [0] * len(self.handlers)
        self.exhausted = 0
        with _STATS_LOCK:
            _STATS.add(self)


def fallback_stats() -> list[FallbackStats]:
    """The stats of every fallback-wrapped agent alive in this process (read by
    :class:`~mesh.runtime.metrics.MeshMetrics` at scrape time)."""
    with _STATS_LOCK:
        return list(_STATS)


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
    name: str
    handler: Handler


def events_topic(name: str, partitions: int = 3) -> Topic[FallbackEvent]:
    """The topic of an agent's fallback events (``mesh tap <name>.fallback-events``)."""
    return Topic(f"{name}.fallback-events", FallbackEvent, key="correlation_id",
                 partitions=partitions)


def with_fallbacks(primary: Agent[Any], *fallbacks: Agent[Any] | Handler,
                   retries_per_level: int = 1, name: str | None = None,
                   events: Topic[FallbackEvent] | None = None,
                   backoff_s: float = 0.05) -> Agent[Any]:
    """An agent consuming what ``primary`` consumes that answers with the first level that
    succeeds (see the module docstring). Fallback agents' produced topics are added.

    Args:
        primary: level 0; its name, group, inputs and outputs are the new agent's.
        fallbacks: levels 1.. in order: handlers ``(payload, ctx)`` or agents.
        retries_per_level: attempts per level for retriable errors (>= 1).
        name: the new agent's name (default: the primary's).
        events: where fallback events go (default ``<name>.fallback-events``).
        backoff_s: the pause between a level's retries.
    """
    if retries_per_level < 1:
        raise ConfigError(f"retries_per_level={retries_per_level} must be at least 1.")
    if not fallbacks:
        raise ConfigError(f"Agent {primary.name!r}: with_fallbacks needs at least one "
                          "fallback handler or agent.")
    agent_name = name or primary.name
    levels = [_Level(primary.name, primary.handle)]
    produced = list(primary.produces)
    for index, item in enumerate(fallbacks, start=1):
        if isinstance(item, Agent):
            levels.append(_Level(item.name, item.handle))
            produced += [t for t in item.produces if t not in produced]
        else:
            levels.append(_Level(getattr(item, "__name__", f"fallback{index}"), item))
    events = events or events_topic(agent_name)
    produced.append(events)
    stats = FallbackStats(agent_name, [level.name for level in levels])
    wrapped: dict[type[BaseModel], Topic[Any]] = {
        t.model.__fallback_of__: t for t in produced
        if hasattr(t.model, "__fallback_of__")}

    async def handle(payload: Any, ctx: Context) -> Any:
        failed: list[FallbackAttempt] = []
        for level, entry in enumerate(levels):
            outputs, staged = len(ctx.outputs), len(ctx.staged)
            for tries in range(1, retries_per_level + 1):
                try:
                    result = await entry.handler(payload, ctx)
                except InputError:  # bad for every level (a forged task): no fallback
                    raise
                except Exception as exc:  # user code: this level failed (or its breaker)
                    del ctx.outputs[outputs:], ctx.staged[staged:]
                    again = (is_retriable(exc) and not isinstance(exc, BreakerOpen)
                             and tries < retries_per_level)
                    if again:
                        await asyncio.sleep(backoff_s * tries)
                        continue
                    failed.append(FallbackAttempt(level=level, handler=entry.name,
                                                  error_class=type(exc).__name__,
                                                  error=(str(exc) or type(exc).__name__)[:1000],
                                                  tries=tries))
                    logger.info("agent %s: level %d (%s) failed: %s", agent_name, level,
                                entry.name, exc)
                    break
                answer = _answer(ctx, result, level, entry.name, failed)
                stats.answered[level] += 1
                return answer
        stats.exhausted += 1
        raise FallbacksExhausted(agent_name, failed)

    def _answer(ctx: Context, result: Any, level: int, handler: str,
                failed: list[FallbackAttempt]) -> list[BaseModel]:
        if level > 0:
            ctx.emit(events, FallbackEvent(
                kind="fallback_used", agent=agent_name, correlation_id=ctx.correlation_id,
                event_id=ctx.event_id, fallback_level=level, handler=handler,
                attempts=failed))
        items = [] if result is None else (
            list(result) if isinstance(result, (list, tuple)) else [result])
        out = []
        for item in items:
            topic = wrapped.get(type(item))
            if topic is not None:
                item = topic.model(used_fallback=level > 0, fallback_level=level,
                                   handler=handler, result=item)
            out.append(item)
        return out

    async def on_failure(payload: Any, ctx: Context, error: BaseException) -> None:
        attempts = error.attempts if isinstance(error, FallbacksExhausted) else [
            FallbackAttempt(level=-1, handler=agent_name, error_class=type(error).__name__,
                            error=str(error)[:1000])]
        ctx.emit(events, FallbackEvent(kind="fallback_failed", agent=agent_name,
                                       correlation_id=ctx.correlation_id,
                                       event_id=ctx.event_id, attempts=attempts))
        try:
            await primary.on_failure(payload, ctx, error)
        except Exception:  # the primary's own failure handler must not lose this event
            logger.exception("agent %s: the primary's on_failure raised", agent_name)

    return Agent(agent_name, consumes=primary.consumes, produces=produced, handler=handle,
                 group=primary.group if name is None else None,
                 description=primary.description or f"{agent_name} with fallbacks",
                 state=primary.state, on_failure=on_failure)
