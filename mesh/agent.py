"""Agent declarations: what an agent consumes, what it produces, and its handler.

An agent is a stream processor. It consumes one or more typed topics in its own
consumer group (so two agents on one topic each see every event: fan-out by wiring),
and its outputs go to the topics it declares it produces. Chains emerge from wiring:
A produces to the topic B consumes.

Example:
    >>> from pydantic import BaseModel
    >>> class Question(BaseModel):
    ...     qid: str
    ...     text: str
    >>> class Answer(BaseModel):
    ...     qid: str
    ...     text: str
    >>> questions = Topic("qa.questions", Question, key="qid")
    >>> answers = Topic("qa.answers", Answer, key="qid")
    >>> @agent(consumes=questions, produces=answers)
    ... async def answerer(question: Question, ctx: Context) -> Answer:
    ...     return Answer(qid=question.qid, text=question.text.upper())
    >>> answerer.name, answerer.group
    ('answerer', 'answerer')
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from mesh.envelope import MESH_PREFIX, TRACEPARENT, TRACESTATE, Envelope, ExtraHeaders
from mesh.errors import ConfigError
from mesh.policy import RetryPolicy
from mesh.topic import Topic, collect_topics

P = TypeVar("P", bound=BaseModel)
M = TypeVar("M", bound=BaseModel)

Handler = Callable[[Any, "Context"], Awaitable[Any]]
Ordering = Literal["key", "partition", "none"]


@dataclass(frozen=True, slots=True)
class Emitted:
    """One output a handler asked for: a payload for a topic, with an optional key and
    a correlation id and trace other than the input's (a timer or a gather answering
    for one)."""

    topic: Topic[Any]
    payload: BaseModel
    key: bytes | None
    correlation_id: str | None = None
    traceparent: str | None = None
    causation_id: str | None = None
    headers: ExtraHeaders = ()
    carried: ExtraHeaders | None = None  # a kept event's carried headers, tracestate too


FailureHandler = Callable[[Any, "Context", BaseException], Awaitable[None]]
Timer = Callable[["Context"], Awaitable[None]]


class Context:
    """What a handler gets beside its payload: the event's metadata, ``emit``, a logger.

    Outputs are buffered and produced after the handler returns; the input's offset is
    committed only once the broker has acknowledged all of them (at-least-once).
    """

    def __init__(self, agent: Agent[Any], event: Envelope[Any], *,
                 tables: Mapping[str, Any] | None = None,
                 assigned: frozenset[tuple[str, int]] = frozenset(),
                 runner: Any = None) -> None:
        self.agent = agent
        self.runner = runner  # the AgentRunner running this agent (quarantine, observers)
        self.event = event
        self.outputs: list[Emitted] = []
        self.staged: list[tuple[str, str, Any, Any]] = []  # (table, key, value, record)
        self.assigned = assigned
        self._tables = tables or {}
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None
        self.details: dict[str, str] | None = None  # see annotate()

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger named after the agent, with the agent and correlation id as extras."""
        if self._logger is None:  # built on first use: most handlers never log
            self._logger = logging.LoggerAdapter(
                logging.getLogger(f"mesh.agent.{self.agent.name}"),
                {"agent": self.agent.name, "correlation_id": self.event.correlation_id})
        return self._logger

    @property
    def correlation_id(self) -> str:
        """The workflow the input belongs to; outputs carry it on."""
        return self.event.correlation_id

    @property
    def event_id(self) -> str:
        return self.event.event_id

    @property
    def traceparent(self) -> str:
        """The input's W3C trace context; keep it (e.g. in state) to emit later in the
        same trace with ``emit(..., traceparent=)``, with :attr:`carried` beside it."""
        return self.event.traceparent

    @property
    def carried(self) -> dict[str, bytes]:
        """What the input's outputs carry besides the mesh's ids: its W3C
        ``tracestate`` and the headers this agent propagates (a tenant id). Keep it with
        :attr:`traceparent` to emit later for this input, from a timer too, with the
        same trace state and headers: ``emit(..., traceparent=kept, carried=kept)``."""
        found = self.agent.propagated(self.event.extra_headers)
        state = self.event.tracestate
        return dict(((TRACESTATE, state.encode()), *found) if state is not None else found)

    @property
    def headers(self) -> dict[str, bytes]:
        """The input's headers that the mesh does not own (a tenant id, a producer's own
        tags); by default every output carries them on (``Agent(propagate_headers=)``)."""
        return dict(self.event.extra_headers)

    @property
    def attempt(self) -> int:
        """The delivery attempt of the input, 1-based."""
        return self.event.attempt

    def annotate(self, **details: object) -> None:
        """Add ``details`` to this input's audit record (its ``details`` map, beside the
        replica): what the handling cost or decided, for ``mesh.audit``'s readers. The
        values are written as strings; set again, a name takes the last value.

        Example:
            >>> ctx.annotate(tokens=1200, calls=2, cost=0.0018)  # doctest: +SKIP
        """
        if self.details is None:
            self.details = {}
        self.details.update((name, str(value)) for name, value in details.items())

    def table(self, topic: Topic[M]) -> Any:
        """The agent's state table for ``topic`` (a :class:`mesh.state.CompactedTable`),
        rebuilt from the topic before any input of a newly assigned partition."""
        found = self._tables.get(topic.name)
        if found is None:
            raise ConfigError(f"Agent {self.agent.name!r} has no state table {topic.name!r}:"
                              " add the topic to state=.")
        return found

    def get(self, topic: Topic[M], key: str) -> M | None:
        """``key`` in the state table, seeing this handler's own staged writes."""
        for name, staged_key, value, _ in reversed(self.staged):
            if name == topic.name and staged_key == key:
                return value  # type: ignore[no-any-return]
        return self.table(topic).get(key)  # type: ignore[no-any-return]

    def put(self, topic: Topic[M], key: str, value: M) -> None:
        """Stage ``key`` = ``value`` in the state table. Applied and persisted only if the
        handler succeeds, with its outputs (before them with :attr:`Agent.state_first`;
        acknowledged before the input's offset is committed); a failed attempt's writes
        are dropped."""
        self.staged.append((topic.name, key, value, self.table(topic).record_of(key, value)))

    def delete(self, topic: Topic[M], key: str) -> None:
        """Stage the removal of ``key`` (a tombstone), like :meth:`put`."""
        self.staged.append((topic.name, key, None, self.table(topic).record_of(key, None)))

    def commit_state(self) -> list[Any]:
        """Apply the staged writes to the tables; returns their records to produce: the
        last per table and key (a key written twice by one input would go in two
        records, which may land in two produce requests: a crash between their acks
        would keep the first, and the input's redelivery may judge it applied)."""
        last = {}
        for name, key, value, record in self.staged:
            self._tables[name].apply(key, value)
            last[name, key] = record
        return list(last.values())

    def owns(self, topic: Topic[Any], partition: int) -> bool:
        """Whether this replica currently holds ``partition`` of the consumed ``topic``."""
        return (topic.name, partition) in self.assigned

    def emit(self, topic: Topic[M], payload: M, *, key: bytes | str | None = None,
             correlation_id: str | None = None, traceparent: str | None = None,
             causation_id: str | None = None,
             headers: Mapping[str, bytes | str] | None = None,
             carried: Mapping[str, bytes] | None = None) -> None:
        """Produce ``payload`` to ``topic`` once the handler succeeds.

        ``topic`` must be one the agent declares it produces. The key defaults to the
        topic's key field, else the input's key (so per-key order carries on). The
        output carries the input's correlation id unless ``correlation_id`` is given,
        continues the input's trace unless ``traceparent`` names another, and names the
        input as its cause unless ``causation_id`` names another event (a timer
        answering for a request it kept: the request's ids, kept in state). ``headers``
        are set on this output over the ones propagated from the input (names starting
        with ``mesh-`` and the trace headers are the mesh's own and refused).
        ``carried`` is a kept event's :attr:`carried`: the output carries its headers
        instead of the input's (``headers`` still set over them) and, with
        ``traceparent``, its ``tracestate``.
        """
        if topic not in self.agent.produces:
            known = ", ".join(t.name for t in self.agent.produces) or "none"
            raise ConfigError(f"Agent {self.agent.name!r} emits to {topic.name!r}, which it "
                              f"does not declare (produces: {known}). Add it to produces=.")
        if not isinstance(payload, topic.model):
            raise ConfigError(f"Topic {topic.name!r} carries {topic.model.__name__}, but "
                              f"{type(payload).__name__} was emitted to it.")
        raw_key = key.encode() if isinstance(key, str) else key
        if raw_key is None:
            raw_key = topic.key_of(payload) if topic.key else self.event.key
        kept = None if carried is None else tuple((k, bytes(v)) for k, v in carried.items())
        self.outputs.append(Emitted(topic, payload, raw_key, correlation_id, traceparent,
                                    causation_id, _own_headers(headers or {}), kept))


class Agent(Generic[P]):
    """A declared agent. Build one with :func:`agent`, or subclass and override
    :meth:`handle`.

    Args:
        name: unique in the mesh; the default consumer group and ``mesh-source``.
        consumes: the topic(s) it reads.
        produces: the topics it may write; a handler's return value goes to the one
            whose model matches.
        handler: ``async (payload, ctx) -> None | payload | list[payload]``.
        group: consumer group id (default: ``name``). Replicas share it.
        description: shown by ``mesh graph`` and ``mesh topics list``.
        state: compacted topics the agent keeps tables in (restored on assignment).
        on_failure: called once when an input fails for good, before its dead letter.
        retry: how failures are retried. Default ``RetryPolicy()``: any exception but an
            input error, 3 attempts through retry topics ``<topic>.retry.<n>`` (the
            partition is not blocked; per-key order is not kept for the retried input).
            ``RetryPolicy(blocking=True)`` retries in place and keeps order;
            ``RetryPolicy(attempts=1)`` never retries.
        propagate_headers: which of an input's headers that the mesh does not own (not
            ``mesh-*``, not ``traceparent``/``tracestate``, which follow their own rules)
            its outputs carry: ``True`` (the default: all, so a tenant id or a
            producer's tags follow a request through the mesh), ``False`` (none), or
            the names to carry. ``ctx.emit(..., headers=)`` sets or overrides one output's.
        exactly_once: run consume-transform-produce in Kafka transactions: an input's
            outputs, state writes, audit records, retry or dead letter and its offset
            are committed together or not at all, and the agent reads its inputs
            ``read_committed``. ``None`` (the default) follows
            ``MESH_RUNTIME__EXACTLY_ONCE`` (off unless set). Needs a broker with
            transactions (Apache Kafka): refused at start on the embedded broker. See
            :mod:`mesh.runtime.transactions`.
        concurrency: how many inputs this replica handles at once, across its partitions
            (default ``MESH_RUNTIME__CONCURRENCY``, 16): an agent waiting seconds on an
            LLM or an API keeps that many calls in flight instead of one per partition.
        ordering: which inputs must wait for each other. ``"key"`` (the default): inputs
            with the same key are handled one at a time, in order, and inputs with
            other keys concurrently, within a partition too; keyed state (``ctx.get/
            put``) stays consistent because one key's inputs never overlap.
            ``"partition"``: one input at a time per partition (the order Kafka gives).
            ``"none"``: any input any time (stateless work). Offsets are committed only
            up to the lowest input not finished, whatever the ordering.
        rate_limit: at most this many handler calls per second for the agent (all its
            replicas together: each takes the share of its partitions), so a wide
            concurrency does not trip a provider's rate limit. None: no limit.
    """

    #: Send an input's outputs only once its state writes (``ctx.put``) are acknowledged.
    #: At least once, a crash can otherwise keep an output and lose the state that
    #: caused it, and whoever acts on that output meets a restarted replica whose state
    #: lags until the input is redelivered. Costs one more produce round trip per input
    #: that writes state and emits; exactly-once commits both together anyway. The
    #: coordinator sets it (people act on its approval requests).
    state_first: bool = False

    def __init__(self, name: str, *, consumes: Topic[P] | Sequence[Topic[Any]],
                 produces: Topic[Any] | Sequence[Topic[Any]] = (),
                 handler: Handler | None = None, group: str | None = None,
                 description: str = "", state: Sequence[Topic[Any]] = (),
                 on_failure: FailureHandler | None = None,
                 retry: RetryPolicy | None = None,
                 propagate_headers: bool | Collection[str] = True,
                 exactly_once: bool | None = None,
                 concurrency: int | None = None, ordering: Ordering = "key",
                 rate_limit: float | None = None) -> None:
        self.name = name
        self.concurrency = concurrency
        self.ordering: Ordering = ordering
        self.rate_limit = rate_limit
        if concurrency is not None and concurrency < 1:
            raise ConfigError(f"Agent {name!r}: concurrency={concurrency} must be >= 1.")
        if ordering not in ("key", "partition", "none"):
            raise ConfigError(f"Agent {name!r}: ordering={ordering!r} is not one of 'key', "
                              "'partition', 'none'.")
        if rate_limit is not None and rate_limit <= 0:
            raise ConfigError(f"Agent {name!r}: rate_limit={rate_limit} calls/s must be > 0 "
                              "(None: no limit).")
        self.exactly_once = exactly_once
        self.consumes: tuple[Topic[Any], ...] = _topics(consumes)
        self.produces: tuple[Topic[Any], ...] = _topics(produces)
        self.state: tuple[Topic[Any], ...] = tuple(state)
        self.group = group or name
        self.description = description
        self.timers: list[tuple[float, Timer]] = []
        self.retry = retry if retry is not None else RetryPolicy()
        self.propagate_headers: bool | frozenset[str] = (
            propagate_headers if isinstance(propagate_headers, bool)
            else frozenset(propagate_headers))
        self._handler = handler
        self._on_failure = on_failure
        if not name:
            raise ConfigError("An agent needs a name.")
        if not self.consumes:
            raise ConfigError(f"Agent {name!r} consumes nothing: pass consumes=<Topic>.")
        for topic in self.consumes:
            if not topic.dead_letters:
                raise ConfigError(f"Agent {name!r} consumes {topic.name!r}, declared with "
                                  "dead_letters=False: bad input would have nowhere to go. "
                                  "Declare it with dead letters.")
        collect_topics(self.consumes + self.produces + self.state)  # one declaration each
        for topic in self.state:
            if not topic.compacted:
                raise ConfigError(f"Agent {name!r}: state topic {topic.name!r} must be "
                                  "declared compacted=True.")

    def every(self, seconds: float) -> Callable[[Timer], Timer]:
        """Run ``timer(ctx)`` every ``seconds`` while the agent runs (deadlines,
        heartbeats). Its emits and state writes are produced and acknowledged after
        each run; a failing run is logged and the timer goes on.

        Example:
            >>> @gather.every(0.5)  # doctest: +SKIP
            ... async def expire(ctx: Context) -> None: ...
        """
        if seconds <= 0:
            raise ConfigError(f"Timer interval {seconds} must be positive.")

        def register(timer: Timer) -> Timer:
            self.timers.append((seconds, timer))
            return timer

        return register

    async def on_start(self, settings: Any) -> None:
        """Called once when a runner starts the agent, with the process's
        :class:`~mesh.config.MeshSettings`, before any input: check configuration and
        fail (or warn) at startup rather than at the first input."""

    async def on_failure(self, payload: P, ctx: Context, error: BaseException) -> None:
        """Called once when an input fails for good (after its retries), before it goes
        to the dead-letter topic; what it emits is produced (e.g. a ``ChainFailed``)."""
        if self._on_failure is not None:
            await self._on_failure(payload, ctx, error)

    async def handle(self, payload: P, ctx: Context) -> Any:
        """Process one input. Override in a subclass, or pass ``handler=``."""
        if self._handler is None:
            raise ConfigError(f"Agent {self.name!r} has no handler: pass handler= or "
                              "override handle().")
        return await self._handler(payload, ctx)

    @property
    def retry_topics(self) -> tuple[Topic[Any], ...]:
        """The retry tiers of the consumed topics (none with a blocking retry policy)."""
        return tuple(t for topic in self.consumes for t in self.retry.topics_for(topic))

    @property
    def all_topics(self) -> tuple[Topic[Any], ...]:
        """Every topic this agent touches: consumed, retry tiers, produced, state."""
        return self.consumes + self.retry_topics + self.produces + self.state

    def propagated(self, headers: ExtraHeaders) -> ExtraHeaders:
        """The input headers ``headers`` that this agent's outputs carry."""
        if self.propagate_headers is True or not headers:
            return headers
        if self.propagate_headers is False:
            return ()
        return tuple(h for h in headers if h[0] in self.propagate_headers)

    def topic_named(self, name: str) -> Topic[Any]:
        """The consumed topic called ``name`` (a retry tier maps to its topic)."""
        origin = name.rsplit(".retry.", 1)[0] if ".retry." in name else name
        for topic in self.consumes:
            if topic.name == origin:
                return topic
        raise ConfigError(f"Agent {self.name!r} does not consume {name!r}.")

    def outputs_of(self, result: Any) -> list[tuple[Topic[Any], BaseModel]]:
        """Route a handler's return value to the produced topics, by payload model."""
        if result is None:
            return []
        items = list(result) if isinstance(result, (list, tuple)) else [result]
        routed = []
        for item in items:
            matches = [t for t in self.produces if isinstance(item, t.model)]
            if len(matches) != 1:
                why = ("no produced topic carries" if not matches
                       else "several produced topics carry")
                raise ConfigError(f"Agent {self.name!r} returned a {type(item).__name__}, but "
                                  f"{why} it; use ctx.emit(topic, payload) to choose.")
            routed.append((matches[0], item))
        return routed

    def __repr__(self) -> str:
        return (f"Agent({self.name!r}, consumes={[t.name for t in self.consumes]}, "
                f"produces={[t.name for t in self.produces]})")


def _own_headers(headers: Mapping[str, bytes | str]) -> ExtraHeaders:
    for name in headers:
        if name.startswith(MESH_PREFIX) or name in (TRACEPARENT, TRACESTATE):
            raise ConfigError(f"Header {name!r} is the mesh's own (mesh-*, traceparent, "
                              "tracestate) and cannot be set by emit(headers=); use "
                              "another name, or the emit arguments for ids and trace.")
    return tuple((k, v.encode() if isinstance(v, str) else bytes(v))
                 for k, v in headers.items())


def _topics(value: Topic[Any] | Sequence[Topic[Any]]) -> tuple[Topic[Any], ...]:
    return (value,) if isinstance(value, Topic) else tuple(value)


def agent(*, consumes: Topic[Any] | Sequence[Topic[Any]],
          produces: Topic[Any] | Sequence[Topic[Any]] = (), name: str | None = None,
          group: str | None = None, description: str | None = None,
          state: Sequence[Topic[Any]] = (), on_failure: FailureHandler | None = None,
          retry: RetryPolicy | None = None,
          propagate_headers: bool | Collection[str] = True,
          exactly_once: bool | None = None, concurrency: int | None = None,
          ordering: Ordering = "key",
          rate_limit: float | None = None) -> Callable[[Handler], Agent[Any]]:
    """Declare an agent from an async handler ``(payload, ctx)``; see the module example.

    Takes every option :class:`Agent` takes; the name defaults to the handler's name and
    the description to its docstring.

    Example:
        >>> from mesh import RetryPolicy
        >>> @agent(consumes=questions, produces=answers,
        ...        retry=RetryPolicy(attempts=5, blocking=True))  # doctest: +SKIP
        ... async def careful(question: Question, ctx: Context) -> Answer: ...
    """

    def wrap(handler: Handler) -> Agent[Any]:
        return Agent(name or handler.__name__, consumes=consumes, produces=produces,
                     handler=handler, group=group,
                     description=(handler.__doc__ or "").strip() if description is None
                     else description,
                     state=state, on_failure=on_failure, retry=retry,
                     propagate_headers=propagate_headers, exactly_once=exactly_once,
                     concurrency=concurrency, ordering=ordering, rate_limit=rate_limit)

    return wrap


class App:
    """A set of agents (and extra topics) deployed together by ``mesh dev module:app``.

    Args:
        name: the app's name.
        agents: its agents (more with :meth:`add` or :meth:`agent`).
        topics: extra topics to declare (``mesh topics apply``) that no agent touches.
        sources: topics fed from outside the app (an ``Emitter``, ``mesh emit``, another
            system); ``mesh graph`` does not flag them as consumed but never produced.
        sinks: topics read outside the app; ``mesh graph`` does not flag them as
            produced but never consumed.

    Example:
        >>> app = App("qa", agents=[answerer])  # doctest: +SKIP
        >>> sorted(app.topics)  # doctest: +SKIP
        ['qa.answers', 'qa.questions']
    """

    def __init__(self, name: str, *, agents: Iterable[Agent[Any]] = (),
                 topics: Iterable[Topic[Any]] = (), sources: Iterable[Topic[Any]] = (),
                 sinks: Iterable[Topic[Any]] = ()) -> None:
        self.name = name
        self.agents: list[Agent[Any]] = []
        self.sources: tuple[Topic[Any], ...] = tuple(sources)
        self.sinks: tuple[Topic[Any], ...] = tuple(sinks)
        self._extra = [*topics, *self.sources, *self.sinks]
        for item in agents:
            self.add(item)

    def add(self, item: Agent[Any]) -> Agent[Any]:
        """Register an agent; names are unique."""
        if any(a.name == item.name for a in self.agents):
            raise ConfigError(f"App {self.name!r} already has an agent named {item.name!r}.")
        self.agents.append(item)
        return item

    def agent(self, **kwargs: Any) -> Callable[[Handler], Agent[Any]]:
        """Like :func:`agent`, and registers the result in this app."""
        return lambda handler: self.add(agent(**kwargs)(handler))

    @property
    def topics(self) -> dict[str, Topic[Any]]:
        """Every topic the app declares, consumes or produces, by name."""
        declared: list[Topic[Any]] = list(self._extra)
        for item in self.agents:
            declared.extend(item.all_topics)
        return collect_topics(declared)
