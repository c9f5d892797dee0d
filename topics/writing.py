"""Topics of the writing mesh (agents/): a coordinator plans a document, specialists
research, analyse, code, write and review it, on the delegation pattern.

A request is the seed's: ``{"task": "Create a technical blog post about MCP servers",
"requirements": {"word_count": 2000, "include_code": true, "audience": "developers"}}``;
``workflow_id`` is made up when the sender leaves it out. Every topic is keyed by
workflow id except the task topics (keyed ``<workflow>/<step>``). A request may carry
its own ``budget`` (tokens, model calls, cost, wall time: the coordinator's limits
replaced one by one) and ask for a person's approval before the document is published
(``requirements.approval``).
"""

from __future__ import annotations

import uuid

from pydantic import BaseModel, Field

from mesh.patterns.delegation.coordinator import Budget, DelegationTopics


class Requirements(BaseModel):
    """What the document must be: its length in words (within 10 %), whether it
    carries a code sample that runs, who reads it, terms it must cover, and how many
    review rounds at least (``min_review_rounds=1``: the first draft goes back for a
    second look even when it passes), and whether a person approves the reviewed draft
    before it is published (``approval``; rejected by default after
    ``approval_timeout_s``, else the coordinator's timeout)."""

    word_count: int = Field(default=1000, ge=100, le=20_000)
    include_code: bool = False
    audience: str = "general readers"
    must_cover: list[str] = Field(default_factory=list)
    min_review_rounds: int = Field(default=0, ge=0, le=3)
    approval: bool = False
    approval_timeout_s: float | None = Field(default=None, gt=0)


class WritingRequest(BaseModel):
    """Someone wants a document: ``task`` says what, ``requirements`` how, ``budget``
    (optional) at what cost at most."""

    task: str = Field(min_length=3)
    requirements: Requirements = Field(default_factory=Requirements)
    workflow_id: str = Field(default_factory=lambda: f"wf-{uuid.uuid4().hex[:10]}")
    budget: Budget | None = None


SPECIALISTS = ("researcher", "analyst", "coder", "writer", "reviewer")

writing = DelegationTopics.named("writing", WritingRequest, specialists=SPECIALISTS)
