"""A delegation mesh for tests: a coordinator and four specialists.

``kind`` on the request picks the plan: ``report`` (research-a and research-b in
parallel -> analyse, a checkpoint where the reviewer adds fact-check -> write),
``sequence`` (research, analyse, write written the seed's way: an ordered list without
``depends_on``, so they run in order), ``unknown`` (a step for an unregistered
'coder'), ``cycle`` and ``replan`` (a report whose failing step the reviewer replaces).
``fail_step`` makes that step's specialist raise (not retriable), ``flaky_step`` raises
a retriable error on its first attempt, ``sleep_ms`` makes every step slow, ``tokens``
makes every step report that many tokens and one model call, ``approval_step`` makes
that step of a report wait for approval (``approval_timeout_s``), ``budget`` is the
request's own budget.
`mesh run tests.apps.delegation:coordinator` with ``MESH_TEST_PREFIX`` runs the
coordinator on the test's topics.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from mesh import Codec, Context, Envelope, MeshSettings
from mesh.kafka.base import OutRecord
from mesh.kafka.reader import TopicReader
from mesh.patterns.delegation.budget import Budget
from mesh.patterns.delegation.coordinator import (
    Coordinator,
    DelegationTopics,
    Specialist,
    WorkflowOutcome,
)
from mesh.patterns.delegation.plan import PlanStep, Review, Revision, Rule, RulesPlanner, StepTask
from mesh.patterns.delegation.specialist import record_usage

SPECIALISTS = ("researcher", "analyst", "fact-checker", "writer")


class Job(BaseModel):
    """A test request."""

    workflow_id: str
    subject: str = "kafka"
    kind: str = "report"
    sleep_ms: int = 0
    fail_step: str | None = None
    flaky_step: str | None = None
    tokens: int = 0
    approval_step: str | None = None
    approval_timeout_s: float | None = None
    budget: Budget | None = None


def report_steps(job: Job) -> list[PlanStep]:
    def step(sid: str, specialist: str, *deps: str, checkpoint: bool = False) -> PlanStep:
        knobs = {"sleep_ms": job.sleep_ms, "fail": sid == job.fail_step,
                 "flaky": sid == job.flaky_step, "tokens": job.tokens}
        return PlanStep(id=sid, specialist=specialist, depends_on=list(deps),
                        checkpoint=checkpoint, input={"subject": job.subject, **knobs},
                        approval=sid == job.approval_step,
                        approval_timeout_s=job.approval_timeout_s)

    return [step("research-a", "researcher"), step("research-b", "researcher"),
            step("analyse", "analyst", "research-a", "research-b", checkpoint=True),
            step("write", "writer", "analyse")]


def odd_steps(job: Job) -> list[PlanStep]:
    if job.kind == "unknown":
        return [PlanStep(id="research", specialist="researcher"),
                PlanStep(id="write-code", specialist="coder", depends_on=["research"])]
    return [PlanStep(id="a", specialist="researcher", depends_on=["b"]),
            PlanStep(id="b", specialist="writer", depends_on=["a"])]


def sequence_steps(job: Job) -> list[PlanStep]:
    """The seed's plan: an ordered list, no step naming a dependency."""
    knobs = {"subject": job.subject, "sleep_ms": job.sleep_ms}
    return [PlanStep(id="research", specialist="researcher", input=knobs),
            PlanStep(id="analyse", specialist="analyst", input=knobs),
            PlanStep(id="write", specialist="writer", input=knobs)]


planner = RulesPlanner(Rule("odd", odd_steps, when=lambda j: j.kind in ("unknown", "cycle")),
                       Rule("sequence", sequence_steps, when=lambda j: j.kind == "sequence"),
                       Rule("report", report_steps))


async def reviewer(review: Review) -> Revision | None:
    """At the analysis checkpoint: add a fact check before writing. On a failure of a
    ``replan`` job: replace the failed step by a retry without the fault."""
    job: Job = review.request
    if review.failure is not None:
        if job.kind != "replan":
            return None
        retry = review.step.model_copy(update={
            "id": f"{review.step.id}-retry", "input": {**review.step.input, "fail": False}})
        rest = [s.model_copy(update={"depends_on": [
                    retry.id if d == review.step.id else d for d in s.depends_on]})
                for s in review.plan.steps
                if s.id not in review.results and s.id != review.step.id]
        return Revision([retry, *rest], reason=f"retry {review.step.id} after: "
                                               f"{review.failure}")
    if review.step.id != "analyse":
        return None
    knobs = {k: v for k, v in review.step.input.items() if k in ("sleep_ms", "tokens")}
    return Revision([
        PlanStep(id="fact-check", specialist="fact-checker", depends_on=["analyse"],
                 input={"subject": job.subject, **knobs}),
        PlanStep(id="write", specialist="writer", depends_on=["analyse", "fact-check"],
                 input={"subject": job.subject, **knobs}),
    ], reason="the analysis makes claims: fact-check them before writing")


async def work(task: StepTask, ctx: Context) -> dict[str, Any]:
    """Every specialist: sleep, fail or flake as asked, else say what it got."""
    if task.input.get("fail"):
        raise ValueError(f"{task.specialist} cannot do {task.step_id}")
    if task.input.get("flaky") and ctx.attempt == 1:
        raise TimeoutError(f"{task.specialist} timed out on {task.step_id}")
    if task.input.get("tokens"):
        record_usage(tokens=task.input["tokens"], calls=1)
    if task.input.get("sleep_ms"):
        await asyncio.sleep(task.input["sleep_ms"] / 1000)
    return {"by": task.specialist, "step": task.step_id, "context": sorted(task.context)}


@dataclass(frozen=True)
class DelegationApp:
    topics: DelegationTopics
    coordinator: Coordinator
    specialists: list[Specialist]


def build(prefix: str) -> DelegationApp:
    """The app with topics named ``<prefix>.*`` and groups ``<prefix>-*``."""
    topics = DelegationTopics.named(prefix, Job, specialists=SPECIALISTS)
    coordinator = Coordinator(f"{prefix}-coordinator", topics=topics, planner=planner,
                              reviewer=reviewer, check_every_s=0.5)
    specialists = [Specialist(name, topics=topics, handler=work, group=f"{prefix}-{name}")
                   for name in SPECIALISTS]
    return DelegationApp(topics, coordinator, specialists)


def request_records(codec: Codec, topics: DelegationTopics, jobs: Sequence[Job]
                    ) -> tuple[list[OutRecord], dict[str, str]]:
    """The records a requester produces, and each workflow's correlation id."""
    records, correlations = [], {}
    for job in jobs:
        env = Envelope.new(job, source="test", key=topics.requests.key_of(job))
        value, fingerprint = codec.encode(topics.requests, job)
        headers = tuple(env.with_payload(job, schema=fingerprint).headers())
        records.append(OutRecord(topics.requests.name, value, env.key, headers))
        correlations[job.workflow_id] = env.correlation_id
    return records, correlations


async def outcomes_of(settings: MeshSettings, codec: Codec, topics: DelegationTopics,
                      workflows: set[str], timeout: float = 120.0) -> dict[str, WorkflowOutcome]:
    """Follow the outcomes topic until every workflow in ``workflows`` has one."""
    found: dict[str, WorkflowOutcome] = {}
    deadline = time.monotonic() + timeout
    async with TopicReader(settings.kafka, [topics.outcomes.name]) as reader:
        async for record in reader.follow(idle_timeout=timeout):
            outcome = await codec.decode(topics.outcomes, record.value or b"")
            assert isinstance(outcome, WorkflowOutcome)
            found[outcome.workflow_id] = outcome
            if workflows <= found.keys() or time.monotonic() > deadline:
                break
    assert workflows <= found.keys(), f"no outcome for {sorted(workflows - found.keys())}"
    return found


app = build(os.environ.get("MESH_TEST_PREFIX", "delegation-test"))
coordinator = app.coordinator
approvals, decisions = app.topics.approvals, app.topics.decisions  # for `mesh approve -t`
