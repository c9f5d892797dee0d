"""Event-driven content: writer, reviewer, editor and publisher react to events.

requested -> created -> reviewed -> approved -> published, and a bounded rejection loop:
a rejected draft goes back to the writer with the reviewer's notes, at most
``MAX_REVISIONS`` times; then it is rejected for good (``content_rejected_final``).

The agents are rules, no network: the writer covers at most two of the requested
points per draft (the first ones, then the ones the reviewer says are missing), each from
the best passage of the reference mesh's corpus (``agents/corpus/``, searched with the
researcher's BM25 index), cited; the reviewer approves a draft that covers every point.
So a request with 1-2 points is published first time, 3-4 after one revision, 5-6 after
two, 7+ is rejected for good.

Run it: ``.venv/bin/python -m examples.events`` (embedded broker, agents in this
process, requests published as an existing system would, results printed).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agents.retriever import Corpus
from mesh import Agent, Codec, EmbeddedBroker, Mesh, MeshSettings, apply_topics
from mesh.kafka.reader import TopicReader
from mesh.patterns.events import EventBus, EventContext
from topics.events import (
    ContentApproved,
    ContentCreated,
    ContentPublished,
    ContentRejected,
    ContentRejectedFinal,
    ContentRequested,
    ContentReviewed,
    Draft,
    build_bus,
)

MAX_REVISIONS = 2
POINTS_PER_DRAFT = 2

REQUESTS = [
    ContentRequested(request_id="r1", subject="Kafka consumer groups",
                     must_cover=["partitions", "rebalancing"]),
    ContentRequested(request_id="r2", subject="Dead-letter topics",
                     must_cover=["retries", "headers", "replay"]),
    ContentRequested(request_id="r3", subject="Compacted topics as state",
                     must_cover=["keys", "tombstones", "restore", "compaction", "offsets"]),
    ContentRequested(request_id="r4", subject="Everything about Kafka",
                     must_cover=["brokers", "topics", "producers", "consumers", "streams",
                                 "connect", "security"]),
    ContentRequested(request_id="r5", subject="Trace context in headers",
                     must_cover=["traceparent"]),
]
# request id -> (outcome, revisions): what the rules above must produce.
EXPECTED = {"r1": ("published", 0), "r2": ("published", 1), "r3": ("published", 2),
            "r4": ("rejected", MAX_REVISIONS), "r5": ("published", 0)}


def write(request: ContentRequested, revision: int, covered: list[str],
          missing: list[str]) -> Draft:
    """A draft covering what was covered plus up to two more points, notes first."""
    todo = [p for p in [*missing, *request.must_cover] if p not in covered]
    points = [*covered, *list(dict.fromkeys(todo))[:POINTS_PER_DRAFT]]
    return Draft(revision=revision, title=f"{request.subject}: a practical guide",
                 body="\n\n".join([request.subject, *(paragraph(request, p) for p in points)]),
                 covered=points)


def paragraph(request: ContentRequested, point: str) -> str:
    """The point, from the passage of the reference mesh's corpus (``agents/corpus/``,
    the researcher's BM25 search) that best matches the subject and the point, cited."""
    found = Corpus.default().search(f"{request.subject} {point}", k=1)
    if not found:
        return f"On {point}: nothing in the corpus yet."
    best = found[0]
    return f"On {point}: {best.text} ({best.title}, \u201c{best.section}\u201d)"


def review(request: ContentRequested, draft: Draft) -> list[str]:
    """The points the draft does not cover."""
    return [p for p in request.must_cover if p not in draft.covered]


def build_agents(bus: EventBus, *, max_revisions: int = MAX_REVISIONS) -> list[Agent[Any]]:
    """The four listeners of the content flow, on ``bus``."""

    @bus.on("content_requested", "content_rejected", emits=["content_created"])
    async def writer(event: ContentRequested | ContentRejected,
                     ctx: EventContext) -> ContentCreated:
        """Writes a first draft, or revises a rejected one with the reviewer's notes."""
        if isinstance(event, ContentRequested):
            draft = write(event, 0, [], [])
            return ContentCreated(request_id=event.request_id, request=event, draft=draft)
        draft = write(event.request, event.draft.revision + 1, event.draft.covered,
                      event.missing)
        ctx.logger.info("revision %d of %s", draft.revision, event.request_id)
        return ContentCreated(request_id=event.request_id, request=event.request, draft=draft)

    @bus.on("content_created", emits=["content_reviewed"])
    async def reviewer(event: ContentCreated, ctx: EventContext) -> ContentReviewed:
        """Checks that the draft covers every requested point."""
        missing = review(event.request, event.draft)
        return ContentReviewed(
            request_id=event.request_id, request=event.request, draft=event.draft,
            approved=not missing, missing=missing,
            notes=[f"cover {p!r}" for p in missing])

    @bus.on("content_reviewed",
            emits=["content_approved", "content_rejected", "content_rejected_final"])
    async def editor(event: ContentReviewed, ctx: EventContext) -> Any:
        """Approves, sends back for a revision, or (after the last one) rejects for good."""
        if event.approved:
            return ContentApproved(request_id=event.request_id, draft=event.draft)
        if event.draft.revision < max_revisions:
            return ContentRejected(request_id=event.request_id, request=event.request,
                                   draft=event.draft, missing=event.missing, notes=event.notes)
        return ContentRejectedFinal(
            request_id=event.request_id, revisions=event.draft.revision, notes=event.notes,
            reason=f"still failing review after {event.draft.revision} revision(s) "
                   f"(limit {max_revisions})")

    @bus.on("content_approved", emits=["content_published"])
    async def publisher(event: ContentApproved, ctx: EventContext) -> ContentPublished:
        """Publishes an approved draft."""
        return ContentPublished(
            request_id=event.request_id, title=event.draft.title,
            url=f"https://blog.example/{event.request_id}", revisions=event.draft.revision,
            words=len(event.draft.body.split()))

    return [writer, reviewer, editor, publisher]


async def outcomes(settings: MeshSettings, bus: EventBus, ids: set[str],
                   timeout: float = 120.0) -> dict[str, Any]:
    """The final event of each request (published or rejected for good), as it arrives."""
    found: dict[str, Any] = {}
    codec = Codec()
    final = [bus.topic("content_published"), bus.topic("content_rejected_final")]
    deadline = time.monotonic() + timeout
    async with TopicReader(settings.kafka, [t.name for t in final]) as reader:
        async for record in reader.follow(idle_timeout=timeout):
            topic = final[0] if record.topic == final[0].name else final[1]
            payload = await codec.decode(topic, record.value or b"")
            found[payload.request_id] = payload  # type: ignore[attr-defined]
            if ids <= found.keys() or time.monotonic() > deadline:
                break
    return found


async def trails(settings: MeshSettings, bus: EventBus) -> dict[str, list[str]]:
    """Every event on the bus, grouped by correlation id, in production order."""
    async with TopicReader(settings.kafka, [t.name for t in bus.topics.values()]) as reader:
        records = await reader.read_to_end()
    by_id: dict[str, list[tuple[int, str]]] = {}
    for record in records:
        headers = dict(record.headers)
        by_id.setdefault(headers["mesh-correlation"].decode(), []).append(
            (int(headers["mesh-produced-at"]), bus.type_of(record.topic) or record.topic))
    return {cid: [t.removeprefix("content_") for _, t in sorted(events)]
            for cid, events in by_id.items()}


def show(found: dict[str, Any], trail: dict[str, list[str]]) -> bool:
    """Print each request's outcome and event trail; True if all are as expected."""
    ok = True
    for request in REQUESTS:
        result = found.get(request.request_id)
        if isinstance(result, ContentPublished):
            got = ("published", result.revisions)
            detail = f"{result.url} ({result.words} words)"
        elif isinstance(result, ContentRejectedFinal):
            got = ("rejected", result.revisions)
            detail = f"{result.reason}; notes: {'; '.join(result.notes)}"
        else:
            got, detail = ("missing", -1), "no final event"
        good = got == EXPECTED[request.request_id]
        ok &= good
        print(f"\n{request.request_id} {request.subject!r} ({len(request.must_cover)} points):"
              f" {got[0]} after {got[1]} revision(s){'' if good else '  <-- NOT AS EXPECTED'}"
              f"\n    {detail}"
              f"\n    events (correlation cms-{request.request_id}): "
              + " -> ".join(trail.get(f"cms-{request.request_id}", [])))
    return ok


async def run(bootstrap: str) -> int:
    settings = MeshSettings().with_bootstrap(bootstrap, embedded=True)
    bus = build_bus()
    agents = build_agents(bus)
    await apply_topics(settings.kafka, bus.topics.values())
    async with Mesh(settings, agents) as mesh:
        await mesh.wait_assigned()
        async with bus.publisher(settings, source="cms") as events:
            for request in REQUESTS:  # as an existing system (a CMS) would
                await events.publish("content_requested", request,
                                     correlation_id=f"cms-{request.request_id}")
        print(f"published {len(REQUESTS)} content_requested events; listeners: "
              + ", ".join(a.name for a in agents))
        found = await outcomes(settings, bus, {r.request_id for r in REQUESTS})
    return 0 if show(found, await trails(settings, bus)) else 1


def main() -> int:
    with EmbeddedBroker() as broker:
        print(f"embedded broker on {broker.bootstrap}")
        return asyncio.run(run(broker.bootstrap))


if __name__ == "__main__":
    raise SystemExit(main())
