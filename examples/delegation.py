"""Hierarchical delegation: a coordinator plans "write a report", specialists do it.

The plan: two researchers in parallel (web and papers) -> analysis, a checkpoint where
the reviewer sees claims and adds a fact-check step -> writing. The coordinator
publishes every plan version to the compacted plans topic, dispatches ready steps to
the specialists' task topics, and publishes the synthesised report with every step's
result (``step_results``) and the plan executed (``plan_executed``). The plan declares
its dependencies, so the two researches (which declare none) run in parallel; a plan
in which no step declares ``depends_on`` runs its steps in order, each with every
earlier result as context (the seed's semantics). Everything runs on the embedded
broker, in this process.

    .venv/bin/python -m examples.delegation
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rich.console import Console

from mesh import Codec, Context, EmbeddedBroker, Emitter, Mesh, MeshSettings, apply_topics
from mesh.kafka.reader import TopicReader
from mesh.patterns.delegation.coordinator import (
    Coordinator,
    Specialist,
    WorkflowEvent,
    WorkflowOutcome,
)
from mesh.patterns.delegation.plan import (
    Plan,
    PlanStep,
    Review,
    Revision,
    Rule,
    RulesPlanner,
    StepTask,
    Synthesis,
)
from topics.delegation import ReportRequest, delegation

SUBJECTS = {"report-1": "event streaming for AI agents", "report-2": "compacted topics as state"}
console = Console()


def plan_report(request: ReportRequest) -> list[PlanStep]:
    """Research from two sources in parallel, analyse (a checkpoint), then write."""
    about = {"subject": request.subject}
    return [
        PlanStep(id="research-web", specialist="researcher", input={**about, "source": "web"}),
        PlanStep(id="research-papers", specialist="researcher",
                 input={**about, "source": "papers"}),
        PlanStep(id="analyse", specialist="analyst", checkpoint=True,
                 depends_on=["research-web", "research-papers"], input=about),
        PlanStep(id="write", specialist="writer", depends_on=["analyse"],
                 input={**about, "audience": request.audience}),
    ]


async def review(review: Review) -> Revision | None:
    """After the analysis: claims must be fact-checked before anyone writes them up."""
    claims = review.results.get("analyse", {}).get("claims", [])
    if review.step.id != "analyse" or not claims:
        return None
    write = review.plan.step("write")
    assert write is not None
    return Revision([
        PlanStep(id="fact-check", specialist="fact-checker", depends_on=["analyse"],
                 input={"claims": claims}),
        write.model_copy(update={"depends_on": ["analyse", "fact-check"]}),
    ], reason=f"the analysis makes {len(claims)} claims: fact-check them before writing")


async def research(task: StepTask, ctx: Context) -> dict[str, Any]:
    source, subject = task.input["source"], task.input["subject"]
    return {"source": source, "facts": [f"{subject}: finding {n} from the {source}"
                                        for n in (1, 2)]}


async def analyse(task: StepTask, ctx: Context) -> dict[str, Any]:
    facts = [f for found in task.context.values() for f in found["facts"]]
    return {"claims": [f.replace("finding", "claim") for f in facts[::2]],
            "sources": sorted(r["source"] for r in task.context.values())}


async def fact_check(task: StepTask, ctx: Context) -> dict[str, Any]:
    return {"checked": len(task.input["claims"]), "disputed": []}


async def write(task: StepTask, ctx: Context) -> dict[str, Any]:
    analysis, check = task.context["analyse"], task.context.get("fact-check")
    verified = f", {check['checked']} claims verified" if check else ""
    return {"title": f"Report: {task.input['subject']}",
            "body": f"For {task.input['audience']}: "
                    + "; ".join(analysis["claims"]) + f" (sources: "
                    f"{', '.join(analysis['sources'])}{verified})."}


async def synthesize(synthesis: Synthesis) -> dict[str, Any]:
    """The final result: the written report."""
    return dict(synthesis.results["write"])


def agents() -> list[Any]:
    coordinator = Coordinator("delegation-coordinator", topics=delegation,
                              planner=RulesPlanner(Rule("report", plan_report)),
                              reviewer=review, synthesizer=synthesize)
    work = {"researcher": research, "analyst": analyse, "fact-checker": fact_check,
            "writer": write}
    return [coordinator, *(Specialist(name, topics=delegation, handler=handler)
                           for name, handler in work.items())]


async def emit(settings: MeshSettings, codec: Codec) -> None:
    async with Emitter(settings, source="example") as emitter:
        for wf, subject in SUBJECTS.items():
            request = ReportRequest(workflow_id=wf, subject=subject, audience="engineers")
            await emitter.emit(delegation.requests, [request], key=wf.encode())


async def collect(settings: MeshSettings, codec: Codec, timeout: float = 60.0
                  ) -> dict[str, WorkflowOutcome]:
    found: dict[str, WorkflowOutcome] = {}
    deadline = time.monotonic() + timeout
    async with TopicReader(settings.kafka, [delegation.outcomes.name]) as reader:
        async for record in reader.follow(idle_timeout=timeout):
            outcome = await codec.decode(delegation.outcomes, record.value or b"")
            assert isinstance(outcome, WorkflowOutcome)
            found[outcome.workflow_id] = outcome
            if found.keys() >= SUBJECTS.keys() or time.monotonic() > deadline:
                break
    return found


async def read(settings: MeshSettings, codec: Codec, topic: Any) -> list[tuple[Any, str]]:
    """Every payload of ``topic`` in order, with the event that caused it."""
    async with TopicReader(settings.kafka, [topic.name]) as reader:
        records = await reader.read_to_end(timeout=30)
    return [(await codec.decode(topic, r.value or b""),
             dict(r.headers).get("mesh-causation", b"").decode())
            for r in sorted(records, key=lambda r: (r.partition, r.offset))]


def rounds(events: list[tuple[WorkflowEvent, str]], wf: str) -> list[list[str]]:
    """The steps dispatched together (by one input: they run in parallel)."""
    by_cause: dict[str, list[str]] = {}
    for event, cause in events:
        if event.workflow_id == wf and event.kind == "StepDispatched" and event.step_id:
            by_cause.setdefault(cause, []).append(event.step_id)
    return list(by_cause.values())


def show(outcomes: dict[str, WorkflowOutcome], plans: list[Plan],
         events: list[tuple[WorkflowEvent, str]]) -> None:
    for wf in SUBJECTS:
        console.rule(f"[bold]{wf}[/bold]: {SUBJECTS[wf]}")
        for plan in (p for p in plans if p.workflow_id == wf):
            console.print(f"plan v{plan.version} by {plan.author} ({plan.reason}):")
            for step in plan.steps:
                after = f" after {', '.join(step.depends_on)}" if step.depends_on else ""
                mark = " [checkpoint]" if step.checkpoint else ""
                console.print(f"  {step.id} -> {step.specialist}{after}{mark}", markup=False)
        outcome = outcomes.get(wf)
        if outcome is None:
            console.print("[red]no result[/red]")
            continue
        if not outcome.success:
            console.print(f"[red]failed at {outcome.failed_step}: {outcome.error}[/red]")
            continue
        console.print("dispatched: " + " -> ".join(" + ".join(r) for r in rounds(events, wf)))
        executed = outcome.plan_executed.version if outcome.plan_executed else "?"
        console.print(f"step_results: {', '.join(outcome.step_results)}; "
                      f"plan_executed: v{executed}", markup=False)
        console.print(f"[bold]{outcome.final_output['title']}[/bold]")
        console.print(outcome.final_output["body"], markup=False)


async def run(bootstrap: str) -> int:
    settings = MeshSettings().with_bootstrap(bootstrap, embedded=True)
    codec = Codec()
    await apply_topics(settings.kafka, delegation.all())
    async with Mesh(settings, agents()) as mesh:
        await mesh.wait_assigned()
        console.print(f"coordinator and {len(mesh.runners) - 1} specialists running")
        await emit(settings, codec)
        outcomes = await collect(settings, codec)
    plans = [plan for plan, _ in await read(settings, codec, delegation.plans)]
    show(outcomes, plans, await read(settings, codec, delegation.events))
    ok = outcomes.keys() >= SUBJECTS.keys() and all(o.success for o in outcomes.values())
    return 0 if ok else 1


def main() -> int:
    with EmbeddedBroker() as broker:
        console.print(f"embedded broker on {broker.bootstrap}")
        return asyncio.run(run(broker.bootstrap))


if __name__ == "__main__":
    raise SystemExit(main())
