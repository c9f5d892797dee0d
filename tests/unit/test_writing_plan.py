"""The writing coordinator's rules without a broker: the publish step that waits for
approval, the failure when the re-plans are used up, the budget from the settings; and
the live views of the steps (the demo's, `mesh submit --follow`'s)."""

from __future__ import annotations

import pytest
from rich.console import Console

from agents.coordinator import MAX_REVISIONS, WritingSettings, plan, review
from agents.reviewer import Verdict
from examples.writing import Progress
from mesh.cli.workflows import _FollowView
from mesh.patterns.delegation.coordinator import Budget, WorkflowEvent
from mesh.patterns.delegation.plan import Review, ReviewRejected
from topics.writing import WritingRequest


def request(**requirements: object) -> WritingRequest:
    return WritingRequest.model_validate({"workflow_id": "wf-unit",
                                          "task": "Write an overview on MCP servers",
                                          "requirements": {"word_count": 600,
                                                           **requirements}})


def verdict(round_: int, approved: bool = False) -> dict[str, object]:
    return Verdict(approved=approved, round=round_, words=300, checks=[],
                   feedback=["The draft has 300 words, 240 short."],
                   needs=["research", "write"]).model_dump()


async def test_approval_adds_a_publish_step_after_every_review() -> None:
    """Pass: with requirements.approval the plan ends in a publish step for the writer
    that waits for approval (with the request's timeout) after the write and the review;
    a re-plan ends in a new one after the new review; without approval there is none."""
    asked = request(approval=True, approval_timeout_s=30)
    first = await plan(asked)
    publish = first.steps[-1]
    assert (publish.id, publish.specialist, publish.approval) == ("publish", "writer", True)
    assert publish.depends_on == ["write", "review"] and publish.approval_timeout_s == 30
    assert publish.input["publish"] is True
    done = {s.id: verdict(1) for s in first.steps if s.id != "publish"}
    revision = await review(Review("wf-unit", asked, first, first.step("review"), done))
    assert revision is not None
    assert [(s.id, s.depends_on) for s in revision.steps if s.approval] == [
        ("publish", ["write-2", "review-2"])]
    assert not any(s.approval for s in (await plan(request())).steps)


async def test_a_draft_still_rejected_after_the_last_replan_fails_with_the_feedback() -> None:
    """Pass: the review after MAX_REVISIONS re-plans raises ReviewRejected carrying the
    reviewer's feedback; an approved review keeps the plan."""
    first = await plan(request())
    last = first.step("review")
    assert last is not None
    rejected = Review("wf-unit", request(), first, last,
                      {"review": verdict(MAX_REVISIONS + 1)})
    with pytest.raises(ReviewRejected, match="240 short") as raised:
        await review(rejected)
    assert f"after {MAX_REVISIONS} re-plans" in str(raised.value)
    approved = Review("wf-unit", request(), first, last, {"review": verdict(3, True)})
    assert await review(approved) is None


def test_the_budget_comes_from_writing_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRITING_BUDGET__TOKENS", "5000")
    monkeypatch.setenv("WRITING_BUDGET__WALL_TIME_S", "90")
    monkeypatch.setenv("WRITING_APPROVAL", "true")
    settings = WritingSettings()
    assert settings.budget == Budget(tokens=5000, wall_time_s=90) and settings.approval
    assert WritingRequest.model_validate({"task": "Write about MCP", "budget": {
        "calls": 3}}).budget == Budget(calls=3)


def test_the_live_view_shows_running_and_done_steps() -> None:
    """Pass: on a terminal the demo's progress keeps its lines for the live view (none
    printed) and renders every step with its agent and status."""
    progress = Progress("wf-unit", live=True)
    for kind, step in (("StepDispatched", "research"), ("StepDispatched", "analyse"),
                       ("StepCompleted", "research")):
        progress.on_event(WorkflowEvent(workflow_id="wf-unit", kind=kind, message="",
                                        step_id=step, specialist="researcher"))
    console = Console(record=True, width=120)
    console.print(progress.render())
    shown = console.export_text()
    assert "research " in shown and "done" in shown and "running" in shown
    assert "analyse" in shown and "-> researcher" in shown


def test_mesh_submit_follows_in_a_live_table_on_a_terminal() -> None:
    """Pass: on a terminal `mesh submit --follow` keeps each step's specialist and status
    (a step waiting for approval says so) and the latest events for its live table."""
    view = _FollowView(live=True)
    for kind, step, who in (("StepDispatched", "write", "writer"),
                            ("StepCompleted", "write", None),
                            ("ApprovalRequested", "publish", "writer")):
        view.show(WorkflowEvent(workflow_id="wf-unit", kind=kind, message=f"{kind}!",
                                step_id=step, specialist=who))
    console = Console(record=True, width=120)
    console.print(view.render())
    shown = console.export_text()
    assert "write " in shown and "done" in shown and "waiting for approval" in shown
    assert shown.count("writer") == 2 and "ApprovalRequested publish: ApprovalRequested!" in shown
