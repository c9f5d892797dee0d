"""The reviewer: checks a draft against the request's requirements and says what to
change; the coordinator re-plans on its feedback (agents/coordinator.py).

Checks: the word count within 10 % of the requirement (a short draft that already
cites every passage found is told the corpus has too little on the subject); at least
three sections and a references list; at least three citations, each listed in the
references; with ``include_code``, a Python block that runs (exit 0, printing
something); every term of ``must_cover``; and ``min_review_rounds`` (an editor's
second look: drafts before that round are sent back with the notes even when every
check passes).

    mesh run agents.reviewer:agent
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from agents.brain import subject_of
from agents.document import citations, code_blocks, count_words, references, sections
from agents.sample import run_async
from agents.step import latest, request_of, think
from mesh.agent import Context
from mesh.errors import HandlerError
from mesh.patterns.delegation.coordinator import Specialist
from mesh.patterns.delegation.plan import StepTask
from topics.writing import WritingRequest, writing

TOLERANCE = 0.10


class Check(BaseModel):
    name: str
    ok: bool
    detail: str


class Verdict(BaseModel):
    """The reviewer's answer. ``needs`` says what a re-plan must redo: ``research``
    (more or other material), ``code`` (a sample that runs), ``write`` (a rewrite)."""

    approved: bool
    round: int
    words: int
    checks: list[Check]
    feedback: list[str] = Field(default_factory=list)
    needs: list[str] = Field(default_factory=list)
    missing_terms: list[str] = Field(default_factory=list)


async def review_draft(request: WritingRequest, markdown: str, *, round_: int,
                       material: dict[str, int] | None = None) -> Verdict:
    """Every check on ``markdown`` and the feedback for each that fails; ``material``
    (the writer's: passages found, their words, passages cited) lets the feedback on a
    short draft say when the corpus has too little on the subject."""
    req = request.requirements
    checks, feedback, needs = [], [], set()
    words, target = count_words(markdown), req.word_count
    low, high = int(target * (1 - TOLERANCE)), int(target * (1 + TOLERANCE))
    ok = low <= words <= high
    checks.append(Check(name="word count", ok=ok, detail=f"{words} words, {low}-{high} asked"))
    found = material or {}
    short = f"The draft has {words} words, {low - words} short of the {low}-{high} asked"
    if words < low and found.get("passages") and found.get("cited", 0) >= found["passages"]:
        feedback.append(f"{short}, and it already draws on "
                        f"{_all(found['passages'])} the research found on "
                        f"{subject_of(request.task)!r} ({found.get('words', 0)} words of "
                        "source text): the corpus has too little on it for this length. "
                        "Research other terms of the subject, add documents on it to "
                        f"agents/corpus/, or ask for about {words // 50 * 50 or words} words.")
        needs.update({"research", "write"})
    elif words < low:
        feedback.append(f"{short}: research more material and write it in.")
        needs.update({"research", "write"})
    elif words > high:
        feedback.append(f"The draft has {words} words, {words - high} over the {low}-{high} "
                        "asked: the draft is too long, cut the weakest paragraphs.")
        needs.add("write")
    titles = [t for t in sections(markdown) if t != "References"]
    ok = len(titles) >= 3 and "References" in sections(markdown)
    checks.append(Check(name="sections", ok=ok, detail=f"{len(titles)} sections"
                        + ("" if "References" in sections(markdown) else ", no references")))
    if not ok:
        feedback.append("Structure the draft in at least three sections (## headings) for "
                        f"{req.audience}, and end with a ## References section.")
        needs.add("write")
    cited, listed = citations(markdown), references(markdown)
    ok = len(cited) >= 3 and cited <= listed
    unlisted = f", unlisted {sorted(cited - listed)}" if cited - listed else ""
    checks.append(Check(name="citations", ok=ok,
                        detail=f"{len(cited)} cited, {len(listed)} listed{unlisted}"))
    if not ok:
        feedback.append("Cite at least three retrieved passages as [n] and list every cited "
                        "number in the references.")
        needs.add("write")
    if req.include_code:
        checks.append(await _code_check(markdown, feedback, needs))
    text = markdown.lower()
    missing = [t for t in req.must_cover if t.lower() not in text]
    checks.append(Check(name="coverage", ok=not missing,
                        detail=f"missing {', '.join(missing)}" if missing else "all terms"))
    if missing:
        feedback.append(f"The draft does not cover {', '.join(repr(t) for t in missing)}: "
                        "research these terms and write them in, with citations.")
        needs.update({"research", "write"})
    approved = all(c.ok for c in checks)
    if approved and round_ <= req.min_review_rounds:
        approved = False
        feedback.append(f"Review round {round_}: every check passes, but the request asks "
                        f"for {req.min_review_rounds + 1} review rounds at least: a second "
                        "look at the same material.")
        needs.add("write")
    return Verdict(approved=approved, round=round_, words=words, checks=checks,
                   feedback=feedback, needs=sorted(needs), missing_terms=missing)


def _all(n: int) -> str:
    return "the one passage" if n == 1 else f"all {n} passages"


async def _code_check(markdown: str, feedback: list[str], needs: set[str]) -> Check:
    blocks = [b for b in code_blocks(markdown) if b.language in ("python", "py")]
    if not blocks:
        feedback.append("The request asks for code: include a ```python block that runs.")
        needs.update({"code", "write"})
        return Check(name="code", ok=False, detail="no python block")
    ran = await run_async(blocks[0].code)
    if ran.exit_code != 0 or not ran.stdout.strip():
        feedback.append(f"The code sample exits with {ran.exit_code} and prints "
                        f"{len(ran.stdout.splitlines())} lines ({ran.stderr.strip()[-200:]}): "
                        "fix it so it runs and prints its result.")
        needs.update({"code", "write"})
        return Check(name="code", ok=False, detail=f"exit {ran.exit_code}")
    return Check(name="code", ok=True,
                 detail=f"runs, prints {len(ran.stdout.splitlines())} lines")


async def review(task: StepTask, ctx: Context) -> dict[str, Any]:
    """Checks the latest draft it depends on."""
    draft = latest(task, "markdown")
    if draft is None:
        raise HandlerError(f"Step {task.step_id!r} of {task.workflow_id!r} has no draft to "
                           f"review in its context ({', '.join(task.context)}): make it "
                           "depend on a writer step.")
    await think(task)
    verdict = await review_draft(request_of(task), draft["markdown"],
                                 round_=int(task.input.get("round", 1)),
                                 material=draft.get("material"))
    ctx.logger.info("step %s: %s", task.step_id,
                    "approved" if verdict.approved else "; ".join(verdict.feedback))
    return verdict.model_dump()


agent = Specialist("reviewer", topics=writing, handler=review, group="writing-reviewer",
                   description="checks a draft against the requirements")
