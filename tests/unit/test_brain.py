"""The writing mesh's brain and reviewer without a broker: the offline brain is
deterministic and its document passes the reviewer; settings choose the model brain."""

from __future__ import annotations

from agents.brain import brain
from agents.offline import OfflineBrain
from agents.retriever import Corpus
from agents.reviewer import review_draft
from agents.sample import run
from mesh.config import LlmSettings
from topics.writing import WritingRequest

SEED = WritingRequest.model_validate({
    "workflow_id": "wf-unit", "task": "Create a technical blog post about MCP servers",
    "requirements": {"word_count": 2000, "include_code": True, "audience": "developers"}})


def search(query: str, k: int) -> list:
    return Corpus.default().search(query, k=k, about="MCP servers")


async def document(request: WritingRequest) -> str:
    offline = OfflineBrain()
    found = await offline.research(["MCP servers"], k=25, search=search)
    analysis = await offline.analyse(request, found.passages)
    sample = await offline.code(request, analysis)
    sample = sample.model_copy(update={"stdout": run(sample.code).stdout})
    return (await offline.write(request, analysis, sample, [])).markdown


async def test_offline_document_is_deterministic_and_passes_the_reviewer() -> None:
    first, second = await document(SEED), await document(SEED)
    assert first == second
    verdict = await review_draft(SEED, first, round_=1)
    assert verdict.approved, verdict.feedback


async def test_reviewer_sends_a_short_draft_back_for_research_with_the_numbers() -> None:
    markdown = "# T\n\n## A\n\nMCP links tools [1].\n\n## References\n\n[1] x\n"
    verdict = await review_draft(SEED, markdown, round_=1)
    assert not verdict.approved and "research" in verdict.needs
    assert any("1800-2200" in f and "short" in f for f in verdict.feedback)
    assert "code" in verdict.needs  # no python block


def test_settings_choose_the_brain() -> None:
    class Settings:
        llm = LlmSettings(model="test")

    assert brain(None).label == "offline"
    assert brain(Settings()).label.startswith("model")
