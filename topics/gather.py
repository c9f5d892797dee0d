"""Topics of the research fan-out (examples/gather.py): a question goes to three
researchers (web, database, documents); a gather merges their parts per question."""

from __future__ import annotations

from pydantic import BaseModel

from mesh.patterns.gather import GatherTopics


class ResearchQuestion(BaseModel):
    """A question to research; ``deadline_s`` overrides the gather's default deadline."""

    question_id: str
    text: str
    deadline_s: float | None = None


research = GatherTopics.named("research", ResearchQuestion, key="question_id")
