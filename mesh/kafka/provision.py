"""Creating declared topics on the broker, idempotently, and reporting drift.

``mesh topics apply`` calls :func:`apply_topics`: a missing topic is created with its
declared partitions and configs (and its ``.dlq`` companion); an existing one is
compared and any difference is reported as drift, never changed silently (partition
counts cannot shrink, and changing them moves keys between partitions).

On a cluster a created topic reaches each broker's metadata a moment after the
controller accepted it, and a client asks whichever broker it likes: ``apply_topics``
returns only once every broker answers with every created topic, all its partitions and
a leader for each, so the next step (an agent's start check, a producer, a reader)
does not race the metadata, whichever broker it asks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mesh.config import KafkaSettings
from mesh.errors import TopicDrift, TransportError
from mesh.kafka.admin import Admin
from mesh.kafka.base import TopicSpec
from mesh.kafka.transport import MAX_REQUEST_BYTES
from mesh.topic import Topic

Action = Literal["created", "unchanged", "drift"]

# Dead letters keep records the mesh refused for their size: let them be that large.
DLQ_CONFIGS = {"max.message.bytes": str(MAX_REQUEST_BYTES)}

VISIBLE_TIMEOUT_S = 30.0  # leader election for new partitions takes milliseconds
VISIBLE_POLL_S = 0.02


@dataclass(frozen=True, slots=True)
class TopicChange:
    """What ``apply`` did to one topic; ``detail`` names each drifting setting."""

    name: str
    action: Action
    detail: str = ""


def specs_of(topics: Iterable[Topic[Any]]) -> list[TopicSpec]:
    """The broker specs of the declared topics and of their dead-letter topics."""
    specs: dict[str, TopicSpec] = {}
    for topic in topics:
        specs[topic.name] = TopicSpec(topic.name, topic.partitions, topic.replication,
                                      topic.broker_configs())
        if topic.dead_letters and topic.dlq_name not in specs:
            specs[topic.dlq_name] = TopicSpec(topic.dlq_name, topic.partitions,
                                              topic.replication, DLQ_CONFIGS)
    return [specs[name] for name in sorted(specs)]


async def apply_topics(settings: KafkaSettings, topics: Iterable[Topic[Any]]) -> list[TopicChange]:
    """Create what is missing; report what differs. Running it twice changes nothing.

    Example:
        >>> changes = await apply_topics(settings.kafka, [orders])  # doctest: +SKIP
        >>> [(c.name, c.action) for c in changes]  # doctest: +SKIP
        [('shop.orders', 'created'), ('shop.orders.dlq', 'created')]
    """
    specs = specs_of(topics)
    changes = []
    created: list[TopicSpec] = []
    async with Admin(settings) as admin:
        existing = await admin.describe([s.name for s in specs])
        for spec in specs:
            found = existing.get(spec.name)
            if found is None:
                if await admin.create_topic(spec):
                    created.append(spec)
                    changes.append(TopicChange(spec.name, "created",
                                               f"{spec.partitions} partitions"))
                    continue
                # Created meanwhile by someone else (another replica applying the same
                # topics, or a broker auto-creating it for a first write): compare
                # with what is there instead of waiting for our spec to appear.
                found = await _described(admin, spec.name)
            drift = _drift(spec, found)
            changes.append(TopicChange(spec.name, "drift" if drift else "unchanged",
                                       "; ".join(drift)))
        await wait_visible(admin, created)
    return changes


async def _described(admin: Admin, name: str, *,
                     timeout: float = VISIBLE_TIMEOUT_S) -> TopicSpec:
    """``name`` as described, once the metadata of the broker asked shows it (a topic
    just created elsewhere may not be listed yet)."""
    deadline = time.monotonic() + timeout
    while (found := (await admin.describe([name])).get(name)) is None:
        if time.monotonic() >= deadline:
            raise TransportError(f"Topic {name!r} exists, the broker says, but no metadata "
                                 f"showed it within {timeout:.0f} s.")
        await asyncio.sleep(0.2)
    return found


async def wait_visible(admin: Admin, specs: Sequence[TopicSpec], *,
                       timeout: float = VISIBLE_TIMEOUT_S) -> None:
    """Wait until every broker's metadata shows each of ``specs`` with all its
    partitions and a leader for each (a client asks any one broker, so one broker that
    has not learned a topic yet makes the next reader find none); raise
    :class:`~mesh.errors.TransportError` naming what is still missing, and where,
    after ``timeout`` seconds.

    Example:
        >>> await wait_visible(admin, [TopicSpec("shop.orders", 6)])  # doctest: +SKIP
    """
    deadline = time.monotonic() + timeout
    while specs:
        missing = await _not_led(admin, specs)
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise TransportError(
                f"Created topic(s) but the brokers' metadata did not show them with a "
                f"leader for every partition within {timeout:.0f} s: {'; '.join(missing)}. "
                "Check that every broker is up (its log names the partition), then run "
                "`mesh topics apply` again: it creates nothing twice.")
        await asyncio.sleep(VISIBLE_POLL_S)  # poll interval; the deadline bounds the loop


async def _not_led(admin: Admin, specs: Sequence[TopicSpec]) -> list[str]:
    """Each spec some broker does not show with a leader for every partition."""
    views = await admin.leaders_per_broker([spec.name for spec in specs])
    missing = []
    for spec in specs:
        short = {node: len(view.get(spec.name, {})) for node, view in sorted(views.items())
                 if sorted(view.get(spec.name, {})) != list(range(spec.partitions))}
        if short or not views:
            seen = ", ".join(f"{count} of {spec.partitions} on broker {node}"
                             for node, count in short.items())
            missing.append(f"{spec.name} (partitions led: {seen or 'no broker answered'})")
    return missing


async def check_topics(settings: KafkaSettings, topics: Iterable[Topic[Any]]) -> None:
    """Raise :class:`~mesh.errors.TopicDrift` unless every declared topic (and its
    ``.dlq``) exists with its declared partition count. Creates nothing: an agent that
    subscribed to or produced to a missing topic would have the broker auto-create it
    with the broker's default partitions, which splits keys from their co-partitioned
    state silently.

    Example:
        >>> await check_topics(settings.kafka, agent.all_topics)  # doctest: +SKIP
    """
    specs = specs_of(topics)
    async with Admin(settings) as admin:
        existing = await admin.describe([s.name for s in specs])
    missing = [s.name for s in specs if s.name not in existing]
    wrong = [f"{s.name} (declared {s.partitions} partitions, broker has "
             f"{existing[s.name].partitions})" for s in specs
             if s.name in existing and existing[s.name].partitions != s.partitions]
    if not missing and not wrong:
        return
    problems = []
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    if wrong:
        problems.append(f"partitions differ: {', '.join(wrong)}")
    raise TopicDrift(f"The agent's topics are not as declared ({'; '.join(problems)}). "
                     "Create them with `mesh topics apply` (or start with `mesh run --apply`); "
                     "a partition count that differs needs a new topic or a new declaration. "
                     "Agents never let the broker create a topic implicitly.")


def _drift(declared: TopicSpec, found: TopicSpec) -> list[str]:
    drift = []
    if declared.partitions != found.partitions:
        drift.append(f"partitions: declared {declared.partitions}, broker {found.partitions}")
    for key, value in (declared.configs or {}).items():
        actual = (found.configs or {}).get(key)
        if actual != value:
            drift.append(f"{key}: declared {value}, broker {actual}")
    return drift
