"""Event-driven agents: listeners react to event types and emit events of other types.

An :class:`EventBus` declares the event types (name -> pydantic model); ``bus.on(...)``
turns an async handler into a listener agent; ``bus.publish`` (or an
:class:`EventPublisher`) lets an existing system emit from outside any agent, and a
handler emits with ``ctx.emit("type", payload)``. Nothing routes events centrally: the
emitter never knows who listens, and any service, audit sink or dashboard can subscribe.

The choice: **one topic per event type** (``<namespace>.<type>``), not one bus topic
with the type in a header and a union payload. Why:

* *Typed schemas.* A mesh topic is ``Topic[Model]``: one Avro schema, one
  ``schemas/<topic>.avsc``, one fingerprint, decoded by the topic's model. Per-type
  topics keep that exactly: an outside producer needs only its type's ``.avsc``, and
  each type evolves on its own. A union topic would put every type in one schema that
  changes whenever any type does, and an old reader cannot resolve a union branch added
  after it was built.
* *Subscription is done by the broker.* Each listener is its own agent, so its own
  consumer group, subscribed to the topics of its types only: it never fetches, decodes
  or skips another type's events, its lag counts only its own work, and partitions,
  retention and dead letters (``<type topic>.dlq``) are per type. On a bus topic every
  listener would read all traffic and filter in the handler.
* *Taps.* ``mesh tap events.content_published`` follows one type, decoded with its own
  schema; ``mesh tap`` with several topic names follows several.
* *The cost: no total order across types.* Kafka orders per partition. Every type topic
  of a bus has the same partition count and the same key (the bus's key field, else the
  correlation id), so one workflow's events sit in the same partition number of each
  type topic and are in order *within* a type. Across types, a listener of two types
  can see them interleaved otherwise than produced. Within one workflow causality
  orders them anyway (an event is emitted only after the one that caused it was
  consumed); a sink that needs one order for independent events of several types sorts
  by the ``mesh-causation`` chain or ``mesh-produced-at``. Strict cross-type order per
  id is the one reason to use a single topic with a union model: a plain ``Topic`` does
  that, outside this module.

Delivery is the runtime's: at-least-once, deterministic output ids (a replayed handler
emits the same event ids), so listeners must be idempotent. Publishing waits for the
broker's acknowledgement, never for listeners. A listener that fails for good (after
the runtime's retries) emits a ``listener_failed`` event naming itself, the event type
and the error, and its input goes to the type topic's dead-letter topic.

Example:
    >>> from pydantic import BaseModel, ValidationError
    >>> class Asked(BaseModel):
    ...     question: str
    >>> class Answered(BaseModel):
    ...     answer: str
    >>> bus = EventBus("qa", {"asked": Asked, "answered": Answered})
    >>> @bus.on("asked", emits=["answered"])
    ... async def answerer(event: Asked, ctx: EventContext) -> Answered:
    ...     return Answered(answer=event.question.upper())
    >>> answerer.name, [t.name for t in answerer.consumes], bus.topic("answered").name
    ('answerer', ['qa.asked'], 'qa.answered')
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ValidationError

from mesh.agent import Agent, App, Context
from mesh.config import MeshSettings
from mesh.envelope import Envelope
from mesh.errors import ConfigError, PayloadInvalid
from mesh.kafka.base import OutRecord
from mesh.kafka.transport import Producer
from mesh.runtime.retry import origin_of
from mesh.serde.codec import Codec
from mesh.topic import Topic, TopicBundle

logger = logging.getLogger(__name__)

FAILED = "listener_failed"
_TYPE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")

Listener = Callable[[Any, "EventContext"], Awaitable[Any]]
FailureListener = Callable[[Any, "EventContext", BaseException], Awaitable[None]]


class ListenerFailed(BaseModel):
    """A listener gave up on an event (after retries); the event is in ``<topic>.dlq``."""

    listener: str
    event_type: str
    event_id: str
    error_class: str
    error: str


class EventBus(TopicBundle):
    """The event types of a domain, their topics, and the listeners built on them.

    A topic bundle (discovery declares every type topic of a bus bound at module level),
    but not an ``XTopics.named`` one: its members are the user's event types, so they
    are looked up by type name (:meth:`topic`) rather than fixed attributes, and the bus
    is not frozen: ``on()`` adds listeners to it and to its ``app``.

    Args:
        namespace: topic name prefix; type ``t`` lives on topic ``<namespace>.t``.
        types: event type name -> payload model (``listener_failed`` is added).
        key: a field every model has, to key (and order) records by; ``None`` keys
            every event by its correlation id.
        partitions: partitions of every type topic (equal, so keys co-partition).
        retention_ms: ``retention.ms`` of every type topic (broker default if None).
        agent_prefix: prefix of listener agent names (= consumer groups).

    Example:
        >>> bus = EventBus("shop", {"ordered": Order}, key="order_id")  # doctest: +SKIP
        >>> await bus.publish("ordered", Order(order_id="o1"),
        ...                   producer=producer, codec=Codec())  # doctest: +SKIP
    """

    def __init__(self, namespace: str, types: Mapping[str, type[BaseModel]], *,
                 key: str | None = None, partitions: int = 3, retention_ms: int | None = None,
                 agent_prefix: str = "") -> None:
        if FAILED in types:
            raise ConfigError(f"Event type {FAILED!r} is reserved by the bus for listener "
                              "failures. Name your type differently.")
        self.namespace, self.key, self.agent_prefix = namespace, key, agent_prefix
        declared: dict[str, type[BaseModel]] = {**types, FAILED: ListenerFailed}
        self.types: Mapping[str, type[BaseModel]] = MappingProxyType(declared)
        self.listeners: list[Agent[Any]] = []
        topics: dict[str, Topic[Any]] = {}
        for name, model in self.types.items():
            if not _TYPE_NAME.match(name):
                raise ConfigError(f"Event type name {name!r} is not valid: use 1-100 letters, "
                                  "digits, '_' or '-' (it becomes a topic name suffix).")
            field = key if name != FAILED else None
            if field is not None and field not in model.model_fields:
                raise ConfigError(f"Event type {name!r}: {model.__name__} has no field "
                                  f"{field!r}, the bus's key. Add the field, or build the bus "
                                  "with key=None to key events by correlation id.")
            topics[name] = Topic(f"{namespace}.{name}", model, key=field,
                                 partitions=partitions, retention_ms=retention_ms)
        self.topics: Mapping[str, Topic[Any]] = MappingProxyType(topics)
        self._by_topic = {t.name: name for name, t in topics.items()}
        # Every listener and every type topic, for ``mesh dev module:app`` (an attribute,
        # as on every pattern object; ``on()`` adds each listener to it).
        self.app = App(namespace, topics=self.topics.values())

    def topic(self, event_type: str) -> Topic[Any]:
        """The topic of ``event_type``; unknown names raise ``ConfigError``."""
        found = self.topics.get(event_type)
        if found is None:
            known = ", ".join(sorted(self.topics))
            raise ConfigError(f"Unknown event type {event_type!r} on bus {self.namespace!r}: "
                              f"known are {known}. Declare it in the bus's types or fix the name.")
        return found

    def all(self) -> list[Topic[Any]]:
        """Every type topic (``listener_failed`` included), for ``apply_topics``."""
        return list(self.topics.values())

    def type_of(self, topic_name: str | None) -> str | None:
        """The event type carried by the topic called ``topic_name``, or by the topic a
        retry topic of that name retries (None if not ours)."""
        return self._by_topic.get(origin_of(topic_name or ""))

    def key_of(self, event_type: str, payload: BaseModel, correlation_id: str) -> bytes:
        """The record key: the bus's key field, else the correlation id."""
        topic = self.topic(event_type)
        return topic.key_of(payload) or correlation_id.encode()

    def payload(self, event_type: str, payload: BaseModel | Mapping[str, Any]) -> BaseModel:
        """``payload`` as the type's model (a mapping is validated into it)."""
        model: type[BaseModel] = self.topic(event_type).model
        if isinstance(payload, Mapping):
            try:
                return model.model_validate(payload)
            except ValidationError as exc:
                raise PayloadInvalid(f"Event type {event_type!r}: the mapping is not a valid "
                                     f"{model.__name__}: {exc}. Fix the fields.") from exc
        if not isinstance(payload, model):
            raise ConfigError(f"Event type {event_type!r} carries {model.__name__}, but a "
                              f"{type(payload).__name__} was given. Build a {model.__name__}.")
        return payload

    def on(self, *event_types: str, emits: Iterable[str] = (), name: str | None = None,
           state: Iterable[Topic[Any]] = (), on_failure: FailureListener | None = None
           ) -> Callable[[Listener], Agent[Any]]:
        """Build a listener agent for ``event_types`` from ``async (event, ctx)``.

        The agent (own consumer group, named ``agent_prefix + name``) consumes the
        topics of ``event_types`` only; it may emit the types in ``emits``, with
        ``ctx.emit(type, payload)`` or by returning payloads (routed by model).

        Example:
            >>> @bus.on("content_created", emits=["content_reviewed"])  # doctest: +SKIP
            ... async def reviewer(event: ContentCreated, ctx: EventContext) -> ContentReviewed:
            ...     ...
        """
        if not event_types:
            raise ConfigError("bus.on() needs at least one event type to listen to.")
        consumes = [self.topic(t) for t in event_types]
        allowed = tuple(dict.fromkeys(emits))
        produces = [self.topic(t) for t in (*allowed, FAILED)]

        def build(handler: Listener) -> Agent[Any]:
            agent_name = self.agent_prefix + (name or handler.__name__)
            if any(a.name == agent_name for a in self.listeners):
                raise ConfigError(f"Bus {self.namespace!r} already has a listener named "
                                  f"{agent_name!r}. Pass name= to tell them apart.")

            async def handle(payload: Any, ctx: Context) -> None:
                events = EventContext(self, ctx, allowed)
                events.emit_all(await handler(payload, events))

            async def failed(payload: Any, ctx: Context, error: BaseException) -> None:
                events = EventContext(self, ctx, (*allowed, FAILED))
                events.emit(FAILED, ListenerFailed(
                    listener=agent_name, event_type=events.event_type or "?",
                    event_id=ctx.event_id, error_class=type(error).__name__,
                    error=str(error)[:2000] or type(error).__name__))
                if on_failure is not None:
                    await on_failure(payload, events, error)

            listener: Agent[Any] = Agent(
                agent_name, consumes=consumes, produces=produces, handler=handle,
                description=(handler.__doc__ or "").strip(), state=tuple(state),
                on_failure=failed)
            self.listeners.append(listener)
            self.app.add(listener)
            return listener

        return build

    def record(self, event_type: str, payload: BaseModel | Mapping[str, Any], *, codec: Codec,
               correlation_id: str | None = None, key: bytes | str | None = None,
               source: str = "external") -> tuple[OutRecord, Envelope[BaseModel]]:
        """The record an outside producer sends for one event, and its envelope."""
        item = self.payload(event_type, payload)
        topic = self.topic(event_type)
        env: Envelope[BaseModel] = Envelope.new(item, source=source,
                                                correlation_id=correlation_id)
        raw = key.encode() if isinstance(key, str) else key
        env = replace(env, key=raw or self.key_of(event_type, item, env.correlation_id))
        value, fingerprint = codec.encode(topic, item)
        headers = env.with_payload(item, schema=fingerprint).headers()
        return OutRecord(topic.name, value, env.key, tuple(headers)), env

    async def publish(self, event_type: str, payload: BaseModel | Mapping[str, Any], *,
                      producer: Producer, codec: Codec, correlation_id: str | None = None,
                      key: bytes | str | None = None, source: str = "external"
                      ) -> Envelope[BaseModel]:
        """Emit one event from outside any agent; returns once the broker has it.

        Listeners are never waited for. A new correlation id (= the event id) is made
        unless one is given; the record is keyed like the bus's other events.

        Example:
            >>> async with Producer(settings.kafka) as producer:  # doctest: +SKIP
            ...     env = await bus.publish("content_requested", request,
            ...                             producer=producer, codec=Codec())
        """
        await codec.prepare([self.topic(event_type)])
        record, env = self.record(event_type, payload, codec=codec,
                                  correlation_id=correlation_id, key=key, source=source)
        await producer.send_all([record])
        logger.debug("published %s %s (correlation %s)", event_type, env.event_id,
                     env.correlation_id)
        return env

    def publisher(self, settings: MeshSettings, *, source: str = "external") -> EventPublisher:
        """An :class:`EventPublisher` with its own producer and codec."""
        return EventPublisher(self, settings, source=source)

    def __repr__(self) -> str:
        return f"EventBus({self.namespace!r}, types={sorted(self.types)})"


class EventContext:
    """What a listener gets beside its event: ``emit`` by type name, the event's type,
    and everything of :class:`mesh.agent.Context` (``correlation_id``, ``event``,
    ``logger``, ``get``/``put`` state, ...), which it wraps.

    Emitted events are produced after the handler returns and carry its correlation id
    (unless another is given); the input's offset is committed once they are acked.
    """

    def __init__(self, bus: EventBus, ctx: Context, emits: tuple[str, ...]) -> None:
        self.bus, self.context, self.emits = bus, ctx, emits

    def __getattr__(self, name: str) -> Any:
        return getattr(self.context, name)

    @property
    def event_type(self) -> str | None:
        """The type of the event being handled."""
        return self.bus.type_of(self.context.event.topic)

    @property
    def correlation_id(self) -> str:
        return self.context.correlation_id

    def emit(self, event_type: str, payload: BaseModel | Mapping[str, Any], *,
             correlation_id: str | None = None, key: bytes | str | None = None,
             traceparent: str | None = None, carried: Mapping[str, bytes] | None = None
             ) -> None:
        """Emit ``payload`` as ``event_type`` (one of this listener's ``emits``). Like
        :meth:`mesh.agent.Context.emit`, it continues the input's trace unless
        ``traceparent`` names another (one the listener kept in its state, with its
        ``carried`` headers).

        Example:
            >>> ctx.emit("content_created", ContentCreated(...))  # doctest: +SKIP
        """
        topic = self.bus.topic(event_type)
        if event_type not in self.emits:
            listed = ", ".join(t for t in self.emits if t != FAILED) or "none"
            raise ConfigError(f"Listener {self.context.agent.name!r} emits {event_type!r}, "
                              f"which it does not declare (emits: {listed}). Add it to "
                              "emits= in bus.on().")
        item = self.bus.payload(event_type, payload)
        if key is None:
            key = self.bus.key_of(event_type, item, correlation_id or self.correlation_id)
        self.context.emit(topic, item, key=key, correlation_id=correlation_id,
                          traceparent=traceparent, carried=carried)

    def emit_all(self, result: Any) -> None:
        """Emit a handler's return value (None, a payload or a list), routed by model."""
        items = [] if result is None else (
            list(result) if isinstance(result, (list, tuple)) else [result])
        declared = [t for t in self.emits if t != FAILED]
        for item in items:
            matches = [t for t in declared if isinstance(item, self.bus.topic(t).model)]
            if len(matches) != 1:
                why = "none of its emits carries" if not matches else "several emits carry"
                raise ConfigError(f"Listener {self.context.agent.name!r} returned a "
                                  f"{type(item).__name__}, but {why} it "
                                  f"(emits: {', '.join(matches or declared) or 'none'}). "
                                  "Declare its type in emits=, or use ctx.emit(type, payload).")
            self.emit(matches[0], item)


class EventPublisher:
    """Publishes events from an existing system: its own producer and codec.

    Example:
        >>> async with bus.publisher(settings) as events:  # doctest: +SKIP
        ...     env = await events.publish("content_requested", {"request_id": "r1", ...})
    """

    def __init__(self, bus: EventBus, settings: MeshSettings, *,
                 source: str = "external") -> None:
        self.bus, self.source = bus, source
        self.producer = Producer(settings.kafka)
        self.codec = Codec(settings.schema_registry)

    async def start(self) -> None:
        await self.codec.prepare(list(self.bus.topics.values()))
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    async def publish(self, event_type: str, payload: BaseModel | Mapping[str, Any], *,
                      correlation_id: str | None = None, key: bytes | str | None = None
                      ) -> Envelope[BaseModel]:
        """See :meth:`EventBus.publish`."""
        return await self.bus.publish(event_type, payload, producer=self.producer,
                                      codec=self.codec, correlation_id=correlation_id,
                                      key=key, source=self.source)

    async def __aenter__(self) -> EventPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
