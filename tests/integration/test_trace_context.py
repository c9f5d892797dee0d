"""W3C trace context through every kind of hop, on a real broker, read as a user would:
every record of one workflow (its ``mesh-correlation`` header) carries a ``traceparent``
header with the trace id of the first event, and its ``mesh-causation`` names an event
of the same workflow.

One test per hop kind: fan-out then gather (completed, and decided by the deadline
timer), the coordinator's plan steps, retry topics and dead letters, the checkpointed
pipeline (including what its retention timer emits), the event bus, the chain (and its
``ChainFailed``), the supervisor's requeue of a failed task by its timer, and the
supervisor's timer finding a worker dead with a task in hand.

What a timer emits on behalf of a workflow is in the workflow's trace and its
``mesh-causation`` names the record it acts for (kept in the pattern's state), never
the timer's tick: no record is exempt from the causation check.

The first events come as a traced system with tenants sends them, with a W3C
``tracestate`` and a header of its own (``tenant``): every record of the workflow
carries both on, what a timer emits included.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from mesh import Codec, Context, Emitter, Envelope, Mesh, MeshSettings, Topic, apply_topics
from mesh.kafka.base import OutRecord, Record
from mesh.patterns.chain import Chain, ChainFailed
from mesh.patterns.events import EventBus, EventContext
from mesh.patterns.gather import Gather, Part, branch
from mesh.patterns.pipeline import StageEvent
from mesh.patterns.supervision.supervisor import (
    Supervisor,
    SupervisorEvent,
    SupervisorPolicy,
    WorkerStatus,
)
from mesh.policy import retry_topic
from tests.apps import delegation, gather, pipeline, retry, supervision
from tests.apps.stages import Item
from tests.conftest import BrokerUnderTest
from tests.integration.test_supervision import holding, until
from tests.support import AgentProcess, Follower, encode, inject, read_all, wait_for_count
from topics.supervision import Job

pytestmark = pytest.mark.broker_agnostic


@dataclass(frozen=True)
class Seen:
    """One record as a user reads it: its topic and its mesh headers."""

    topic: str
    event_id: str
    correlation: str
    causation: str | None
    traceparent: str
    source: str
    attempt: str
    baggage: tuple[tuple[str, str], ...] = ()  # its tracestate and tenant headers

    @property
    def trace_id(self) -> str:
        return trace_id(self.traceparent)

    @classmethod
    def of(cls, record: Record) -> Seen:
        h = {k: v.decode() for k, v in record.headers}
        return cls(record.topic, h["mesh-event-id"], h["mesh-correlation"],
                   h.get("mesh-causation"), h["traceparent"], h.get("mesh-source", ""),
                   h.get("mesh-attempt", ""), tuple((k, h[k]) for k in BAGGAGE if k in h))


# What the first events carry besides the mesh's headers: every record of their
# workflows carries it on.
BAGGAGE = {"tracestate": "mesh=00f067aa0ba902b7,vendor=t61rcWkgMzE", "tenant": "acme"}


def with_baggage(records: Sequence[OutRecord]) -> list[OutRecord]:
    """``records`` as a traced system with tenants sends them (see BAGGAGE)."""
    extra = tuple((k, v.encode()) for k, v in BAGGAGE.items())
    return [r._replace(headers=(*r.headers, *extra)) for r in records]


def trace_id(traceparent: str) -> str:
    return traceparent.split("-")[1]


def header(record: OutRecord | Record, name: str) -> str:
    return dict(record.headers)[name].decode()


async def workflow(settings: MeshSettings, topics: Iterable[str], correlation: str
                   ) -> list[Seen]:
    """Every record of ``topics`` (to their end as of now) in workflow ``correlation``
    (records without mesh headers, such as state-table rows, are not events)."""
    records = await read_all(settings, sorted(set(topics)))
    return [Seen.of(r) for r in sorted(records, key=lambda r: (r.topic, r.partition, r.offset))
            if r.value is not None and any(k == "mesh-correlation" for k, _ in r.headers)
            and header(r, "mesh-correlation") == correlation]


def assert_one_trace(seen: Sequence[Seen], root: str,
                     baggage: dict[str, str] | None = None) -> None:
    """Every record is in the trace of ``root`` (a traceparent) and carries ``baggage``
    (by default BAGGAGE: the tracestate and tenant the first event came with)."""
    assert seen, "no records of the workflow"
    strays = [(s.topic, s.source, s.trace_id) for s in seen if s.trace_id != trace_id(root)]
    assert not strays, f"records outside trace {trace_id(root)}: {strays}"
    expected = tuple((BAGGAGE if baggage is None else baggage).items())
    bare = [(s.topic, s.source, s.baggage) for s in seen if s.baggage != expected]
    assert not bare, f"records without the first event's {dict(expected)}: {bare}"


def assert_caused_within(seen: Sequence[Seen], roots: Iterable[str]) -> None:
    """Every record's causation is an event of the workflow present in the topics read
    (or a root), what a timer emitted included."""
    known = {s.event_id for s in seen} | set(roots)
    orphans = [(s.topic, s.source, s.causation) for s in seen
               if s.event_id not in set(roots) and s.causation not in known]
    assert not orphans, f"causation outside the workflow: {orphans}"


async def emit_first(settings: MeshSettings, topic: Topic[Any], payloads: Sequence[BaseModel]
                     ) -> list[Envelope[Any]]:
    """The first events of workflows, as an existing system emits them (a new trace
    each, with BAGGAGE); their envelopes name the ids and traceparents to check
    against."""
    async with Emitter(settings, source="test") as emitter:
        await emitter.codec.prepare([topic])
        built = [emitter.record(topic, p) for p in payloads]
    await inject(settings, with_baggage([record for record, _ in built]))
    return [env for _, env in built]


class StageEvents(Follower):
    """Follows a pipeline's events topic; keeps the records of ``deleted`` events."""

    def __init__(self, settings: MeshSettings, topic: Topic[StageEvent]) -> None:
        super().__init__(settings, [topic.name])
        self.topic, self.codec = topic, Codec()
        self.deleted: dict[str, Seen] = {}  # workflow id -> its deleted event

    async def apply(self, record: Record) -> None:
        event = await self.codec.decode(self.topic, record.value or b"")
        assert isinstance(event, StageEvent)
        if event.status == "deleted":
            self.deleted[event.workflow_id] = Seen.of(record)


# -- fan-out and gather ------------------------------------------------------------------


async def test_fan_out_branches_and_the_merged_event_are_in_the_request_trace(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: a request answered by two branches (each its own group on the requests
    topic): both parts, the gather's request marker, the merged event and the gather
    events carry the request's trace id; each branch's part is caused by the request,
    the merged event by a record on the parts topic."""
    app = gather.build(prefix)
    topics = gather.topics_for(prefix)
    settings, codec = broker.settings(), Codec()
    await apply_topics(settings.kafka, topics.all())
    cid = f"req-{uuid.uuid4().hex[:8]}"
    request = gather.request_record(codec, topics, gather.Ask(request_id=cid, question="q"))
    async with Mesh(settings, app.agents) as mesh, \
            gather.GatherWatch(settings, topics) as watch:
        await mesh.wait_assigned()
        await inject(settings, with_baggage([request]))
        merged = await watch.merged_of("gather", cid)
        await watch.event("gather", cid, "completed")
    assert merged.outcome == "completed" and sorted(merged.successes) == ["alpha", "beta"]
    seen = await workflow(settings, [t.name for t in topics.all()], cid)
    root = header(request, "traceparent")
    assert_one_trace(seen, root)
    assert_caused_within(seen, [header(request, "mesh-event-id")])
    parts = {s.source: s for s in seen if s.topic == topics.parts.name}
    request_id = header(request, "mesh-event-id")
    assert parts["alpha"].causation == parts["beta"].causation == request_id
    [out] = [s for s in seen if s.topic == topics.merged.name]
    assert out.causation in {s.event_id for s in seen if s.topic == topics.parts.name}
    assert {s.topic for s in seen} == {t.name for t in topics.all() if not t.compacted}


async def test_merged_event_decided_by_the_deadline_and_the_expiry_stay_in_the_trace(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: a request one branch never answers ends at its 2 s deadline; the
    gather's timer appends the deadline marker (and, after the 1 s retention, the
    expire marker) in the request's trace, caused by the gather's request marker (the
    record its row keeps), so the timed-out merged event (caused by the deadline
    marker) and the expired event carry the request's trace id too and every record's
    causation is in the workflow."""
    topics = gather.topics_for(prefix)
    alpha = branch("alpha", gather.answer("alpha"), topics=topics, group=f"{prefix}-alpha")
    timed = Gather("timed", topics=topics, branches=[alpha, "silent"], deadline_s=2.0,
                   retention_s=1.0, check_every_s=0.2, group=f"{prefix}-timed")
    settings, codec = broker.settings(), Codec()
    await apply_topics(settings.kafka, topics.all())
    cid = f"req-{uuid.uuid4().hex[:8]}"
    request = gather.request_record(codec, topics, gather.Ask(request_id=cid))
    async with Mesh(settings, [alpha, timed]) as mesh, \
            gather.GatherWatch(settings, topics) as watch:
        await mesh.wait_assigned()
        await inject(settings, with_baggage([request]))
        merged = await watch.merged_of("timed", cid)
        await watch.event("timed", cid, "expired")
    assert merged.outcome == "timed_out" and merged.timed_out == ["silent"]
    seen = await workflow(settings, [t.name for t in topics.all()], cid)
    assert_one_trace(seen, header(request, "traceparent"))
    markers = {}
    for record in await read_all(settings, [topics.parts.name]):
        part = await codec.decode(topics.parts, record.value or b"")
        assert isinstance(part, Part)
        if part.correlation_id == cid and part.kind in ("request", "deadline", "expire"):
            markers[part.kind] = Seen.of(record)
    assert set(markers) == {"request", "deadline", "expire"}
    assert markers["request"].causation == header(request, "mesh-event-id")
    assert markers["deadline"].causation == markers["expire"].causation \
        == markers["request"].event_id
    [out] = [s for s in seen if s.topic == topics.merged.name]
    assert out.causation == markers["deadline"].event_id
    assert_caused_within(seen, [header(request, "mesh-event-id")])


# -- plan steps --------------------------------------------------------------------------


async def test_plan_tasks_results_and_outcome_of_a_workflow_are_in_the_request_trace(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: for a report (5 steps, revised at a checkpoint) and a report whose first
    research step fails: both plan versions, every dispatched task, every step result,
    the workflow events, the outcome and the failed task's dead letter carry the
    request's trace id; each workflow is its own trace; tasks are caused by the request
    or a result, results by a task, the outcome by a result; the dead letter carries
    the failed task's traceparent unchanged."""
    app = delegation.build(prefix)
    settings, codec = broker.settings(), Codec()
    await apply_topics(settings.kafka, app.topics.all())
    jobs = [delegation.Job(workflow_id="ok"),
            delegation.Job(workflow_id="broken", fail_step="research-a")]
    records, correlations = delegation.request_records(codec, app.topics, jobs)
    failing_tasks = app.topics.tasks["researcher"]
    async with Mesh(settings, [app.coordinator, *app.specialists]) as mesh:
        await mesh.wait_assigned()
        await inject(settings, with_baggage(records))
        outcomes = await delegation.outcomes_of(settings, codec, app.topics, set(correlations))
        [letter] = await wait_for_count(settings, [failing_tasks.dlq_name], 1)
    assert outcomes["ok"].success and not outcomes["broken"].success
    names = [t.name for t in app.topics.all()] + [failing_tasks.dlq_name]
    traces = set()
    for request in records:
        seen = await workflow(settings, names, header(request, "mesh-correlation"))
        assert_one_trace(seen, header(request, "traceparent"))
        assert_caused_within(seen, [header(request, "mesh-event-id")])
        traces.add(trace_id(header(request, "traceparent")))
        by_topic: dict[str, list[Seen]] = {}
        for s in seen:
            by_topic.setdefault(s.topic, []).append(s)
        tasks = [s for name, found in by_topic.items() if ".tasks." in name
                 and not name.endswith(".dlq") for s in found]
        results = by_topic[app.topics.results.name]
        [outcome] = by_topic[app.topics.outcomes.name]
        assert {s.causation for s in results} <= {s.event_id for s in tasks}
        assert {s.causation for s in tasks} <= {header(request, "mesh-event-id"),
                                               *(s.event_id for s in results)}
        assert outcome.causation in {s.event_id for s in results}
        if request.key == b"ok":
            assert len(by_topic[app.topics.plans.name]) == 2  # v1 and the reviewer's v2
            assert len(tasks) == len(results) == 5
    assert len(traces) == 2
    dead = Seen.of(letter)
    task = next(s for s in await workflow(settings, [failing_tasks.name], dead.correlation)
                if s.event_id == dead.event_id)
    assert dead.traceparent == task.traceparent


# -- retries and dead letters ------------------------------------------------------------


async def test_retry_records_and_dead_letters_carry_the_input_traceparent_unchanged(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: a flaky input (fails once) goes to <in>.retry.1 and a failing one through
    .retry.1 and .retry.2 to <in>.dlq; each of those records carries the input's
    traceparent byte for byte (same event id, attempt counted up); the output of the
    successful retry is in the input's trace, caused by the input, with its own span."""
    agent = retry.build(prefix, base_ms=100)
    inbox, out = agent.consumes[0], agent.produces[0]
    settings, codec = broker.settings(), Codec()
    await apply_topics(settings.kafka, [inbox, out])
    flaky, down = (Item(key=f"k-{text}", seq=0, source_id=str(uuid.uuid4()), text=text)
                   for text in ("flaky", "down"))
    inputs = {item.text: encode(codec, inbox, item) for item in (flaky, down)}
    async with Mesh(settings, [agent]) as mesh:
        await mesh.wait_assigned()
        await inject(settings, with_baggage(list(inputs.values())))
        [output] = await wait_for_count(settings, [out.name], 1)
        [letter] = await wait_for_count(settings, [inbox.dlq_name], 1)
    tiers = [retry_topic(inbox.name, 1), retry_topic(inbox.name, 2)]
    retried = [Seen.of(r) for r in await read_all(settings, tiers)]
    expected = {(tiers[0], "flaky", "2"), (tiers[0], "down", "2"), (tiers[1], "down", "3")}
    by_id = {header(r, "mesh-event-id"): text for text, r in inputs.items()}
    assert {(s.topic, by_id[s.event_id], s.attempt) for s in retried} == expected
    for s in [*retried, Seen.of(letter)]:
        assert s.traceparent == header(inputs[by_id[s.event_id]], "traceparent")
        assert s.baggage == tuple(BAGGAGE.items())
    assert Seen.of(letter).event_id == header(inputs["down"], "mesh-event-id")
    done = Seen.of(output)
    assert done.baggage == tuple(BAGGAGE.items())
    assert done.trace_id == trace_id(header(inputs["flaky"], "traceparent"))
    assert done.causation == header(inputs["flaky"], "mesh-event-id")
    assert done.traceparent != header(inputs["flaky"], "traceparent")  # a span of its own


# -- pipeline with checkpoints -----------------------------------------------------------


async def test_pipeline_stages_failure_and_retention_deletion_are_in_the_request_trace(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: a document through four checkpointed stages and one failing at its second
    stage: every stage task, stage event, result and the dead-lettered task carry the
    request's trace id; each stage's task is caused by the previous one; the `deleted`
    event the retention timer emits after 0.5 s is in the workflow's trace too, caused
    by the task that finished the workflow (the last stage's, or the failing one)."""
    pipe = pipeline.build(prefix, retention_s=0.5, sweep_every_s=0.2)
    topics = pipe.topics
    settings = broker.settings()
    await apply_topics(settings.kafka, topics.all())
    docs = [pipeline.Doc(doc_id="fine", text="a b c"),
            pipeline.Doc(doc_id="bad", text="a b", fail_at="classify")]
    async with Mesh(settings, [pipe.agent]) as mesh, \
            StageEvents(settings, topics.events) as events:
        await mesh.wait_assigned()
        sent = await emit_first(settings, topics.source, docs)
        requests = {d.doc_id: env for d, env in zip(docs, sent, strict=True)}
        await events.until(lambda: set(events.deleted) >= set(requests),
                           "deleted events of both workflows")
    names = [topics.source.name, topics.tasks.name, topics.events.name, topics.results.name,
             topics.tasks.dlq_name]
    for doc_id, request in requests.items():
        seen = await workflow(settings, names, request.correlation_id)
        assert_one_trace(seen, request.traceparent)
        assert events.deleted[doc_id] in seen
        assert_caused_within(seen, [request.event_id])
        tasks = [s for s in seen if s.topic == topics.tasks.name]
        chain = [request.event_id, *(t.event_id for t in tasks)]
        assert [t.causation for t in tasks] == chain[:len(tasks)]
        assert len(tasks) == (4 if doc_id == "fine" else 2)
        assert events.deleted[doc_id].causation == tasks[-1].event_id
        assert len([s for s in seen if s.topic == topics.results.name]) == 1
        letters = [s for s in seen if s.topic == topics.tasks.dlq_name]
        assert len(letters) == (0 if doc_id == "fine" else 1)


# -- event bus ---------------------------------------------------------------------------


class Asked(BaseModel):
    question: str


class Answered(BaseModel):
    answer: str


class Filed(BaseModel):
    shelf: str


async def test_event_bus_listeners_and_a_listener_failure_are_in_the_published_trace(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: an event published from outside flows asked -> answered -> filed through
    two listeners, each in the published event's trace and caused by the one before;
    an event a listener fails on gives a listener_failed event and a dead letter in
    that event's own trace."""
    bus = EventBus(f"{prefix}.ev", {"asked": Asked, "answered": Answered, "filed": Filed},
                   partitions=2, agent_prefix=f"{prefix}-")

    @bus.on("asked", emits=["answered"])
    async def answerer(event: Asked, ctx: EventContext) -> Answered:
        if event.question == "boom":
            raise ValueError("cannot answer boom")
        return Answered(answer=event.question.upper())

    @bus.on("answered", emits=["filed"])
    async def filer(event: Answered, ctx: EventContext) -> Filed:
        return Filed(shelf=event.answer[:1])

    settings = broker.settings()
    await apply_topics(settings.kafka, bus.topics.values())
    async with Mesh(settings, bus.listeners) as mesh:
        await mesh.wait_assigned()
        async with bus.publisher(settings) as publisher:
            good = await publisher.publish("asked", Asked(question="why"))
            bad = await publisher.publish("asked", Asked(question="boom"))
        await wait_for_count(settings, [bus.topic("filed").name], 1)
        await wait_for_count(settings, [bus.topic("listener_failed").name], 1)
        await wait_for_count(settings, [bus.topic("asked").dlq_name], 1)
    names = [t.name for t in bus.topics.values()] + [bus.topic("asked").dlq_name]
    flow = await workflow(settings, names, good.correlation_id)
    assert_one_trace(flow, good.traceparent, {})  # published without tracestate or tenant
    assert_caused_within(flow, [good.event_id])
    by_topic = {s.topic: s for s in flow}
    assert by_topic[bus.topic("answered").name].causation == good.event_id
    assert (by_topic[bus.topic("filed").name].causation
            == by_topic[bus.topic("answered").name].event_id)
    failed = await workflow(settings, names, bad.correlation_id)
    assert {s.topic for s in failed} == {bus.topic("asked").name,
                                         bus.topic("listener_failed").name,
                                         bus.topic("asked").dlq_name}
    assert_one_trace(failed, bad.traceparent, {})


# -- chain -------------------------------------------------------------------------------


class Question(BaseModel):
    request_id: str
    text: str


class Draft(BaseModel):
    request_id: str
    text: str


class Answer(BaseModel):
    request_id: str
    text: str


async def draft(question: Question, ctx: Context) -> Draft:
    return Draft(request_id=question.request_id, text=f"draft of {question.text}")


async def polish(found: Draft, ctx: Context) -> Answer:
    if "poison" in found.text:
        raise ValueError(f"cannot polish {found.request_id}")
    return Answer(request_id=found.request_id, text=found.text.upper())


async def test_chain_hops_completion_and_chain_failed_are_in_the_request_trace(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: a two-step chain: the hop, step events and ChainCompleted of a request are
    in its trace, caused within it; a request whose second step fails for good gets its
    ChainFailed, its step events and the hop's dead letter in its own trace."""
    chain = Chain(prefix, [draft, polish], key="request_id", partitions=2)
    settings, codec = broker.settings(), Codec()
    await apply_topics(settings.kafka, chain.topics)
    requests = [Question(request_id="fine", text="tides"),
                Question(request_id="bad", text="poison")]
    async with Mesh(settings, chain.agents) as mesh:
        await mesh.wait_assigned()
        sent = await emit_first(settings, chain.source, requests)
        envs = {q.request_id: env for q, env in zip(requests, sent, strict=True)}
        await wait_for_count(settings, [chain.completed.name], 1)
        [failure] = await wait_for_count(settings, [chain.failed.name], 1)
        await wait_for_count(settings, [chain.hops[0].dlq_name], 1)
    failed = await codec.decode(chain.failed, failure.value or b"")
    assert isinstance(failed, ChainFailed) and failed.failed_step_name == "polish"
    names = [t.name for t in chain.topics] + [chain.hops[0].dlq_name]
    for request_id, env in envs.items():
        seen = await workflow(settings, names, env.correlation_id)
        assert_one_trace(seen, env.traceparent)
        end = chain.completed if request_id == "fine" else chain.failed
        assert [s.topic for s in seen].count(end.name) == 1
        assert_caused_within(seen, [env.event_id])
        letters = [s for s in seen if s.topic == chain.hops[0].dlq_name]
        assert len(letters) == (1 if request_id == "bad" else 0)


# -- supervisor --------------------------------------------------------------------------


async def test_task_requeued_by_the_supervisor_timer_stays_in_the_task_trace(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: a job that fails on the only worker is requeued by the supervisor's timer
    (max 2 attempts), fails again and goes to the dead-task topic: the requeued task,
    both outcomes, the supervisor's events and the dead task carry the submitted job's
    trace id; causation reads job -> failed outcome -> requeued job (the timer acts for
    the outcome) -> failed outcome -> dead task."""
    topics, results = supervision.build(prefix)
    settings, codec = broker.settings(), Codec()
    await apply_topics(settings.kafka, [*topics.all(), results])
    supervisor = Supervisor(topics, SupervisorPolicy(
        dead_after_s=60, check_every_s=0.2, requeue_delay_s=0.2, max_task_attempts=2))
    worker = supervision.service(prefix, worker_id="a", heartbeat_s=0.3)
    async with Mesh(settings, [supervisor.agent, *worker.app.agents]) as mesh:
        await mesh.wait_assigned()
        [env] = await emit_first(settings, topics.tasks, [Job(job_id="j", prompt="poison")])
        await wait_for_count(settings, [topics.dead.name], 1)
    seen = await workflow(settings, [t.name for t in topics.all()], env.correlation_id)
    assert_one_trace(seen, env.traceparent)
    tasks = [s for s in seen if s.topic == topics.tasks.name]
    assert [s.source for s in tasks] == ["test", supervisor.agent.name]
    assert len([s for s in seen if s.topic == topics.outcomes.name]) == 2
    kinds = set()
    for record in await read_all(settings, [topics.events.name]):
        if header(record, "mesh-correlation") == env.correlation_id:
            event = await codec.decode(topics.events, record.value or b"")
            assert isinstance(event, SupervisorEvent)
            kinds.add(event.kind)
    assert {"task_requeued", "task_dead_lettered"} <= kinds
    assert_caused_within(seen, [env.event_id])
    outcomes = [s for s in seen if s.topic == topics.outcomes.name]
    [dead] = [s for s in seen if s.topic == topics.dead.name]
    assert [s.causation for s in outcomes] == [s.event_id for s in tasks]
    assert tasks[1].causation == outcomes[0].event_id
    assert dead.causation == outcomes[1].event_id


async def test_worker_found_dead_with_a_task_in_hand_is_reported_in_that_task_trace(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: a `mesh run` worker killed -9 while a 60 s job is in its hands: the
    supervisor's timer reports worker_dead in the job's workflow and trace, caused by
    the job's event (the row names the task in hand); the row it marks dead is caused by
    the last status record the worker wrote."""
    topics, results = supervision.build(prefix)
    settings, codec = broker.settings(), Codec()
    await apply_topics(settings.kafka, [*topics.all(), results])
    supervisor = Supervisor(topics, SupervisorPolicy(dead_after_s=2, check_every_s=0.2))
    log = (tmp_path / "worker.log").open("wb")
    proc = AgentProcess(broker, "tests.apps.supervision:app", prefix=prefix, log=log,
                        env={"MESH_WORKER_ID": "w", "MESH_TEST_HEARTBEAT_S": "0.3"}).start()
    try:
        async with Mesh(settings, [supervisor.agent]) as mesh:
            await mesh.wait_assigned()
            await until(lambda: holding(supervisor, ["w"], 3), "w holding the task partitions",
                        timeout=120)
            [env] = await emit_first(settings, topics.tasks,
                                     [Job(job_id="long", prompt="slow", effort_ms=60_000)])
            await until(lambda: supervisor.latest["w"].current_task == "long", "the job in hand")
            proc.kill9()
            await until(lambda: supervisor.latest["w"].status == "dead", "w reported dead")
    finally:
        if proc.alive():  # the test failed before the kill
            proc.terminate()
        log.close()
    seen = await workflow(settings, [t.name for t in topics.all()], env.correlation_id)
    assert_one_trace(seen, env.traceparent)
    assert_caused_within(seen, [env.event_id])
    [dead] = [s for s in seen if s.topic == topics.events.name]
    assert dead.causation == env.event_id
    rows = []
    for record in sorted(await read_all(settings, [topics.status.name]),
                         key=lambda r: (r.partition, r.offset)):
        row = await codec.decode(topics.status, record.value or b"")
        assert isinstance(row, WorkerStatus)
        if row.worker_id == "w":
            rows.append((row, Seen.of(record)))
    *alive, (marked, mark) = rows
    assert marked.status == "dead" and marked.current_event_id == env.event_id
    assert mark.causation == alive[-1][1].event_id
