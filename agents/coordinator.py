"""The coordinator of the writing mesh: plans, reviews at checkpoints, synthesises.

The plan (:func:`plan`): research the subject (each of its parts, for a subject joined
by "and", "or" or commas: :func:`agents.retriever.parts_of`; and, for code, how to build
with it; and each ``must_cover`` term) in parallel -> analyse -> code -> write -> review, the
review a checkpoint. At the checkpoint :func:`review` reads the reviewer's verdict;
a rejected draft is re-planned from its feedback (:func:`replan`: more research and
a new analysis when material is missing, a new sample when the code failed, then a
rewrite with the feedback and another review), at most :data:`MAX_REVISIONS` times;
a draft still rejected after that fails the workflow, the reviewer's last feedback as
its error (the drafts stay in the outcome's step results). :func:`synthesize` makes
the final output: the approved draft, the verdict, the usage (brains, calls, tokens,
cost in USD, fallbacks).

With ``requirements.approval`` (or ``WRITING_APPROVAL=true``) the approved draft waits
for a person before it is published: a ``publish`` step (the writer hands over the
final copy) asks for approval (`mesh approve WORKFLOW publish`, `mesh reject WORKFLOW
publish --reason TEXT`; rejected by default after its timeout). Every workflow keeps
to a budget: :class:`WritingSettings` (``WRITING_BUDGET__TOKENS``, ``__CALLS``,
``__COST``, ``__WALL_TIME_S``), each limit replaced by the request's own ``budget``.

    mesh run agents.coordinator:agent
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from agents.brain import Usage, subject_of
from agents.retriever import parts_of
from agents.reviewer import Verdict
from mesh.patterns.delegation.approval import DEFAULT_TIMEOUT_S
from mesh.patterns.delegation.coordinator import Budget, Coordinator
from mesh.patterns.delegation.plan import (
    Plan,
    PlanStep,
    Review,
    ReviewRejected,
    Revision,
    Synthesis,
)
from topics.writing import WritingRequest, writing

MAX_REVISIONS = 2
WORDS_PER_PASSAGE = 80  # about: the corpus is cut into passages of 25-140 words


class WritingSettings(BaseSettings):
    """The coordinator's settings (``WRITING_*``): every workflow's budget (a request's
    ``budget`` replaces its limits one by one), whether every document waits for a
    person's approval before it is published, and how long by default."""

    model_config = SettingsConfigDict(env_prefix="WRITING_", env_nested_delimiter="__")

    budget: Budget = Field(default_factory=Budget)
    approval: bool = False
    approval_timeout_s: float = Field(default=DEFAULT_TIMEOUT_S, gt=0)


settings = WritingSettings()


def _base(request: WritingRequest) -> dict[str, Any]:
    return {"request": request.model_dump(mode="json")}


async def plan(request: WritingRequest) -> Plan:
    """The first plan for ``request`` (see the module docstring)."""
    req, subject, base = request.requirements, subject_of(request.task), _base(request)
    k = max(6, req.word_count // WORDS_PER_PASSAGE + 2)  # some to spare: the writer fits
    research = [PlanStep(id="research", specialist="researcher",  # each part of the subject
                         input={**base, "queries": parts_of(subject), "about": subject,
                                "k": k})]
    if req.include_code:
        research.append(PlanStep(id="research-practice", specialist="researcher", input={
            **base, "queries": [f"{subject} build python SDK example test"],
            "about": subject, "k": max(3, k // 3)}))
    for n, term in enumerate(req.must_cover, 1):
        research.append(PlanStep(id=f"research-term-{n}", specialist="researcher",
                                 input={**base, "queries": [term], "k": 3}))
    steps = [*research, PlanStep(id="analyse", specialist="analyst", input=base,
                                 depends_on=[s.id for s in research])]
    drafted_from = ["analyse"]
    if req.include_code:
        steps.append(PlanStep(id="code", specialist="coder", input=base, depends_on=["analyse"]))
        drafted_from.append("code")
    steps += [PlanStep(id="write", specialist="writer", input={**base, "feedback": []},
                       depends_on=drafted_from),
              PlanStep(id="review", specialist="reviewer", input={**base, "round": 1},
                       depends_on=["write"], checkpoint=True),
              *_publish(request, "write", "review")]
    return Plan(steps=steps, reason=f"research {subject!r} ({len(research)} searches in "
                                    f"parallel), analyse, {'code, ' if req.include_code else ''}"
                                    "write, review")


def _publish(request: WritingRequest, write: str, review: str) -> list[PlanStep]:
    """The step that publishes the reviewed draft after a person's approval, when the
    request or the settings ask for one."""
    req = request.requirements
    if not (req.approval or settings.approval):
        return []
    return [PlanStep(id="publish", specialist="writer",
                     input={**_base(request), "publish": True}, depends_on=[write, review],
                     approval=True, approval_timeout_s=req.approval_timeout_s)]


def _last(plan: Plan, specialist: str) -> str | None:
    ids = [s.id for s in plan.steps if s.specialist == specialist]
    return ids[-1] if ids else None


def replan(review: Review, verdict: Verdict) -> list[PlanStep]:
    """The steps that answer ``verdict``'s feedback (round ``verdict.round + 1``)."""
    request = WritingRequest.model_validate(review.request)
    base, n, subject = _base(request), verdict.round + 1, subject_of(request.task)
    steps: list[PlanStep] = []
    analyse, code = _last(review.plan, "analyst"), _last(review.plan, "coder")
    if "research" in verdict.needs:
        researched = [s.id for s in review.plan.steps if s.specialist == "researcher"]
        known = sorted({p["id"] for sid in researched
                        for p in (review.results.get(sid) or {}).get("passages", [])})
        short = max(0, int(request.requirements.word_count * 0.95) - verdict.words)
        queries = verdict.missing_terms or parts_of(subject)
        steps += [PlanStep(id=f"research-{n}", specialist="researcher", input={
                      **base, "queries": queries, "exclude": known,
                      "about": "" if verdict.missing_terms else subject,
                      "k": max(3, short // WORDS_PER_PASSAGE + 2)}),
                  PlanStep(id=f"analyse-{n}", specialist="analyst", input=base,
                           depends_on=[*researched, f"research-{n}"])]
        analyse = f"analyse-{n}"
    assert analyse is not None  # every plan has one
    if "code" in verdict.needs:
        steps.append(PlanStep(id=f"code-{n}", specialist="coder", input=base,
                              depends_on=[analyse]))
        code = f"code-{n}"
    steps += [PlanStep(id=f"write-{n}", specialist="writer",
                       input={**base, "feedback": verdict.feedback},
                       depends_on=[analyse, *([code] if code else [])]),
              PlanStep(id=f"review-{n}", specialist="reviewer", input={**base, "round": n},
                       depends_on=[f"write-{n}"], checkpoint=True),
              *_publish(request, f"write-{n}", f"review-{n}")]
    return steps


async def review(review: Review) -> Revision | None:
    """At a review checkpoint: keep the plan if the draft is approved; fail the
    workflow with the reviewer's feedback if the re-plans are used up; else re-plan
    from the feedback."""
    if review.failure is not None or review.step.specialist != "reviewer":
        return None
    verdict = Verdict.model_validate(review.results[review.step.id])
    if verdict.approved:
        return None
    if verdict.round > MAX_REVISIONS:
        raise ReviewRejected(f"Review {verdict.round} did not approve the draft after "
                             f"{MAX_REVISIONS} re-plans: " + " ".join(verdict.feedback))
    return Revision(replan(review, verdict),
                    reason=f"review {verdict.round} sent the draft back: "
                           + " ".join(verdict.feedback[:2]))


async def synthesize(synthesis: Synthesis) -> dict[str, Any]:
    """The final output: the approved draft (as published), the verdict and what the
    work cost."""
    write, check = _last(synthesis.plan, "writer"), _last(synthesis.plan, "reviewer")
    draft = synthesis.results[write] if write else {}
    verdict = Verdict.model_validate(synthesis.results[check]) if check else None
    usages = [Usage.model_validate(out["usage"]) for out in synthesis.results.values()
              if isinstance(out, dict) and "usage" in out]
    return {"title": draft.get("title", ""), "markdown": draft.get("markdown", ""),
            "words": draft.get("words", 0),
            "approved": bool(verdict and verdict.approved),
            "review_rounds": verdict.round if verdict else 0,
            "checks": [c.model_dump() for c in verdict.checks] if verdict else [],
            "usage": {"brains": sorted({u.brain for u in usages}),
                      "calls": sum(u.calls for u in usages),
                      "tokens": sum(u.tokens for u in usages),
                      "cost": sum(u.cost for u in usages),
                      "fallbacks": sum(u.fallback for u in usages)}}


agent = Coordinator("coordinator", topics=writing, planner=plan, reviewer=review,
                    synthesizer=synthesize, group="writing-coordinator",
                    description="plans a document, reviews drafts, synthesises",
                    budget=settings.budget, approval_timeout_s=settings.approval_timeout_s)
