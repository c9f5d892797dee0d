"""The researcher: finds passages in the corpus for the step's queries.

    mesh run agents.researcher:agent
"""

from __future__ import annotations

from typing import Any

from agents.retriever import Corpus
from agents.step import brain_for, report, think
from mesh.agent import Context
from mesh.patterns.delegation.coordinator import Specialist
from mesh.patterns.delegation.plan import StepTask
from topics.writing import writing


async def research(task: StepTask, ctx: Context) -> dict[str, Any]:
    """Searches the shipped corpus (BM25; a tool call for a model)."""
    corpus, about = Corpus.default(), str(task.input.get("about", ""))
    exclude = frozenset(task.input.get("exclude", []))

    def search(query: str, k: int) -> list[Any]:
        return corpus.search(query, k=k, about=about, exclude=exclude)

    await think(task)
    found = await brain_for(ctx).research(list(task.input["queries"]),
                                          k=int(task.input.get("k", 8)), search=search,
                                          exclude=exclude)
    report(found.usage)
    ctx.logger.info("step %s: %d passages for %s", task.step_id, len(found.passages),
                    found.queries)
    return found.model_dump()


agent = Specialist("researcher", topics=writing, handler=research, group="writing-researcher",
                   description="finds passages in the corpus (BM25) for a query")
