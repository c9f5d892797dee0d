"""The writing mesh (agents/) as six `mesh run` services, driven by `mesh submit`: the
seed's request gives a document that meets its requirements; a forced rejection is
exactly one re-plan; a term the corpus lacks is re-planned at most MAX_REVISIONS times,
then fails the workflow; a budget stops a workflow; a publish step waits for `mesh
approve` (through a coordinator restart) or fails on `mesh reject`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agents.app import AGENTS, app
from agents.coordinator import MAX_REVISIONS
from agents.document import citations, code_blocks, count_words, references, sections
from agents.sample import run
from mesh.kafka.provision import apply_topics
from tests.conftest import ROOT, BrokerUnderTest
from tests.support import AgentProcess

SEED = {"task": "Create a technical blog post about MCP servers",
        "requirements": {"word_count": 2000, "include_code": True, "audience": "developers"}}


@pytest.fixture(scope="module")
def services(broker: BrokerUnderTest, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[dict[str, AgentProcess]]:
    """Every agent of the mesh as its own `mesh run agents.<name>:agent` process."""
    with ThreadPoolExecutor(1) as pool:  # the tests' event loop must not be replaced
        pool.submit(asyncio.run, apply_topics(broker.settings().kafka,
                                              app.topics.values())).result()
    logs = tmp_path_factory.mktemp("writing")
    started = {name: AgentProcess(broker, f"{module.__name__}:agent", prefix="writing",
                                  log=(logs / f"{name}.log").open("wb")).start()
               for name, module in AGENTS.items()}
    yield started
    codes = {name: proc.terminate() for name, proc in started.items()}
    assert codes == dict.fromkeys(started, 0), {
        name: (logs / f"{name}.log").read_text()[-2000:] for name, c in codes.items() if c}


def submit(broker: BrokerUnderTest, request: dict[str, Any], timeout: float = 150.0
           ) -> tuple[int, dict[str, Any], str]:
    """`mesh submit writing.requests JSON --follow`: exit code, outcome, events."""
    done = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "submit", "writing.requests", json.dumps(request),
         "--follow", "--timeout", str(timeout)],
        cwd=ROOT, env=broker.env(), capture_output=True, text=True, timeout=timeout + 60)
    lines = done.stdout.strip().splitlines()
    outcome = json.loads(lines[-1]) if len(lines) > 1 else {}
    return done.returncode, outcome, done.stderr


def test_seed_request_gives_a_document_that_meets_its_requirements(
        broker: BrokerUnderTest, services: dict[str, AgentProcess], tmp_path: Path) -> None:
    """Pass: `mesh submit --follow` exits 0 with the outcome of the seed's request: a
    Markdown document of 2000 words +-10 %, at least three sections and references, every
    citation listed, and a Python block that runs and prints the MCP exchange; the
    reviewer approved it; the events went to stderr."""
    code, outcome, events = submit(broker, {**SEED, "workflow_id": "wf-seed"})
    assert code == 0, events[-3000:]
    final = outcome["final_output"]
    doc = final["markdown"]
    assert final["approved"] and final["review_rounds"] == 1, final["checks"]
    assert 1800 <= count_words(doc) <= 2200
    assert len([s for s in sections(doc) if s != "References"]) >= 3
    assert "References" in sections(doc)
    assert len(citations(doc)) >= 3 and citations(doc) <= references(doc)
    python = [b for b in code_blocks(doc) if b.language == "python"]
    assert python, doc
    ran = run(python[0].code)
    assert ran.exit_code == 0 and "id 3: result 5" in ran.stdout, ran
    assert list(outcome["step_results"]) == ["research", "research-practice", "analyse",
                                             "code", "write", "review"]
    assert "StepDispatched write" in events and "WorkflowCompleted" in events


def test_a_forced_rejection_makes_exactly_one_replan(
        broker: BrokerUnderTest, services: dict[str, AgentProcess]) -> None:
    """Pass: a request asking for two review rounds (min_review_rounds=1) is rejected
    once by the reviewer with its feedback, re-planned once (plan v2: write-2, review-2)
    and approved at the second review."""
    request = {"workflow_id": "wf-forced", "task": "Write an overview on MCP servers",
               "requirements": {"word_count": 600, "min_review_rounds": 1}}
    code, outcome, events = submit(broker, request)
    assert code == 0, events[-3000:]
    assert outcome["plan"]["version"] == 2, outcome["plan"]
    assert list(outcome["step_results"]) == ["research", "analyse", "write", "review",
                                             "write-2", "review-2"]
    assert outcome["step_results"]["review"]["approved"] is False
    assert outcome["step_results"]["review-2"]["approved"] is True
    assert outcome["final_output"]["review_rounds"] == 2
    assert events.count("PlanPublished") == 2 and "review 1 sent the draft back" in events


def test_a_draft_never_approved_fails_the_workflow_with_the_last_feedback(
        broker: BrokerUnderTest, services: dict[str, AgentProcess]) -> None:
    """Pass: a term no corpus passage has fails every review; the coordinator re-plans
    MAX_REVISIONS times (more research, a new analysis, a rewrite each time), then the
    workflow fails: `mesh submit --follow` exits 1 with an outcome whose error is the
    last review's feedback, every draft and review kept in its step results."""
    request = {"workflow_id": "wf-uncoverable", "task": "Write an overview on MCP servers",
               "requirements": {"word_count": 600, "must_cover": ["quantum annealing"]}}
    code, outcome, events = submit(broker, request)
    assert code == 1, events[-3000:]
    assert outcome["success"] is False and outcome["final_output"] is None
    last = f"review-{1 + MAX_REVISIONS}"
    assert outcome["failed_step"] == last and outcome["plan"]["version"] == 1 + MAX_REVISIONS
    assert f"Review {1 + MAX_REVISIONS} did not approve the draft" in outcome["error"]
    assert "'quantum annealing'" in outcome["error"]
    assert outcome["step_results"][last]["approved"] is False
    assert outcome["error"].endswith(" ".join(outcome["step_results"][last]["feedback"]))
    assert f"write-{1 + MAX_REVISIONS}" in outcome["step_results"]
    assert "WorkflowFailed" in events and "WorkflowCompleted" not in events


def test_a_budget_below_what_the_workflow_needs_stops_it_with_partial_results(
        broker: BrokerUnderTest, services: dict[str, AgentProcess]) -> None:
    """Pass: a request whose budget allows 4 s of wall time and whose draft then waits
    for a person's approval (nobody decides) is stopped by the coordinator's timer: a
    BudgetExceeded event, `mesh submit` exits 1, the outcome names the wall-time limit
    and keeps the steps done so far, the publish step not among them."""
    request = {"workflow_id": "wf-budget", "task": "Write an overview on MCP servers",
               "requirements": {"word_count": 600, "approval": True},
               "budget": {"wall_time_s": 4}}
    code, outcome, events = submit(broker, request)
    assert code == 1, events[-3000:]
    assert outcome["success"] is False
    exceeded = outcome["budget_exceeded"]
    assert exceeded["limit"] == "wall_time_s" and exceeded["allowed"] == 4
    assert exceeded["used"] > 4
    assert outcome["error"].startswith("Budget exceeded: wall time budget exceeded")
    assert "BudgetExceeded" in events and "WorkflowCompleted" not in events
    assert "research" in outcome["step_results"]
    assert "publish" not in outcome["step_results"]


def follow(broker: BrokerUnderTest, request: dict[str, Any], timeout: float = 150.0
           ) -> subprocess.Popen[str]:
    """`mesh submit writing.requests JSON --follow` in the background, once it printed
    that the approval was requested (its stderr read up to there)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "submit", "writing.requests", json.dumps(request),
         "--follow", "--timeout", str(timeout)],
        cwd=ROOT, env=broker.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # ends when submit exits (at the latest on its timeout)
        seen.append(line)
        if line.startswith("ApprovalRequested publish"):
            return proc
    proc.wait(timeout=30)
    raise AssertionError("no ApprovalRequested event: " + "".join(seen)[-3000:])


def finish(proc: subprocess.Popen[str]) -> tuple[int, dict[str, Any], str]:
    out, rest = proc.communicate(timeout=180)
    lines = out.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if len(lines) > 1 else {}, rest


def decide(broker: BrokerUnderTest, *args: str, topic: bool = True) -> dict[str, Any]:
    """`mesh approve/reject ARGS` (--topic writing, or none: found from the workflow)."""
    named = ["--topic", "writing"] if topic else []
    done = subprocess.run([sys.executable, "-m", "mesh.cli", *args, *named],
                          cwd=ROOT, env=broker.env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_approval_waits_through_a_coordinator_restart_and_mesh_approve_publishes(
        broker: BrokerUnderTest, services: dict[str, AgentProcess],
        tmp_path: Path) -> None:
    """Pass: with requirements.approval the reviewed draft waits at the publish step; the
    coordinator killed -9 and restarted still waits; `mesh approve WORKFLOW publish
    --topic writing` makes the writer publish it and `mesh submit` exits 0 with the
    approved document."""
    request = {"workflow_id": "wf-approve", "task": "Write an overview on MCP servers",
               "requirements": {"word_count": 600, "approval": True}}
    proc = follow(broker, request)
    services["coordinator"].kill9()
    services["coordinator"] = AgentProcess(
        broker, "agents.coordinator:agent", prefix="writing",
        log=(tmp_path / "coordinator-restarted.log").open("wb")).start()
    assert proc.poll() is None  # still following: no outcome yet
    sent = decide(broker, "approve", "wf-approve", "publish", "--by", "ana")
    assert sent["approved"] is True and sent["by"] == "ana"
    code, outcome, events = finish(proc)
    assert code == 0, events[-3000:]
    assert list(outcome["step_results"]) == ["research", "analyse", "write", "review",
                                             "publish"]
    published = outcome["step_results"]["publish"]
    assert published["published"] is True
    assert published["markdown"] == outcome["step_results"]["write"]["markdown"]
    assert outcome["final_output"]["markdown"] == published["markdown"]
    assert outcome["final_output"]["approved"] is True
    assert "StepApproved publish" in events and "approved by ana" in events


def test_mesh_reject_fails_the_workflow_waiting_for_approval(
        broker: BrokerUnderTest, services: dict[str, AgentProcess]) -> None:
    """Pass: `mesh reject WORKFLOW publish --reason TEXT`, without --topic though the
    repository declares two decisions topics (delegation's and writing's), goes to the
    writing mesh's (the one whose workflows table holds the workflow) and fails the
    waiting workflow: `mesh submit` exits 1, the outcome names the step, who rejected it
    and why, and keeps the reviewed draft; the publish step never ran."""
    request = {"workflow_id": "wf-reject", "task": "Write an overview on MCP servers",
               "requirements": {"word_count": 600, "approval": True}}
    proc = follow(broker, request)
    sent = decide(broker, "reject", "wf-reject", "publish", "--reason",
                  "not for this audience", "--by", "bo", topic=False)
    assert sent["topic"] == "writing.decisions"
    code, outcome, events = finish(proc)
    assert code == 1, events[-3000:]
    assert outcome["success"] is False and outcome["failed_step"] == "publish"
    assert "rejected by bo: not for this audience" in outcome["error"]
    assert outcome["step_results"]["review"]["approved"] is True
    assert "publish" not in outcome["step_results"]
    assert "StepRejected publish" in events


def test_an_approval_left_past_its_deadline_is_rejected(
        broker: BrokerUnderTest, services: dict[str, AgentProcess]) -> None:
    """Pass: nobody decides within requirements.approval_timeout_s (2 s): the
    coordinator's timer rejects the publish step by default and `mesh submit` exits 1
    with an outcome saying so."""
    request = {"workflow_id": "wf-deadline", "task": "Write an overview on MCP servers",
               "requirements": {"word_count": 600, "approval": True,
                                "approval_timeout_s": 2}}
    code, outcome, events = finish(follow(broker, request))
    assert code == 1, events[-3000:]
    assert outcome["failed_step"] == "publish"
    assert "rejected by deadline: no decision within 2 s" in outcome["error"]
    assert "publish" not in outcome["step_results"]
