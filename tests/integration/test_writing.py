"""The writing mesh (agents/) as six `mesh run` services, driven by `mesh submit`: the
seed's request gives a document that meets its requirements; a forced rejection is
exactly one re-plan; a term the corpus lacks is re-planned at most MAX_REVISIONS times."""

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


def test_an_uncoverable_term_is_replanned_at_most_max_revisions_times(
        broker: BrokerUnderTest, services: dict[str, AgentProcess]) -> None:
    """Pass: a term no corpus passage has fails every review; the coordinator re-plans
    MAX_REVISIONS times (more research, a new analysis, a rewrite each time), then
    delivers the last draft marked not approved with the open feedback."""
    request = {"workflow_id": "wf-uncoverable", "task": "Write an overview on MCP servers",
               "requirements": {"word_count": 600, "must_cover": ["quantum annealing"]}}
    code, outcome, events = submit(broker, request)
    assert code == 0, events[-3000:]  # the workflow completed; the document is flagged
    assert outcome["plan"]["version"] == 1 + MAX_REVISIONS
    final = outcome["final_output"]
    assert final["approved"] is False and final["review_rounds"] == 1 + MAX_REVISIONS
    assert any("quantum annealing" in f for f in final["open_feedback"])
    assert f"review-{1 + MAX_REVISIONS}" in outcome["step_results"]
    assert f"review-{2 + MAX_REVISIONS}" not in outcome["step_results"]
