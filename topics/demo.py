"""Topics of the demo mesh: a research -> write -> edit chain with a fact-check fan-out."""

from __future__ import annotations

from pydantic import BaseModel, Field

from mesh import Topic


class ResearchRequest(BaseModel):
    """A question someone wants an article about."""

    request_id: str
    subject: str
    audience: str = "general"


class Findings(BaseModel):
    """What the researcher found for one request."""

    request_id: str
    subject: str
    facts: list[str]
    sources: list[str] = Field(default_factory=list)


class Draft(BaseModel):
    """A first draft written from the findings."""

    request_id: str
    title: str
    body: str


class Article(BaseModel):
    """The edited, final article."""

    request_id: str
    title: str
    body: str
    word_count: int


class FactCheck(BaseModel):
    """The fact checker's verdict on the findings (fan-out branch)."""

    request_id: str
    checked: int
    flagged: list[str] = Field(default_factory=list)


requests = Topic("demo.requests", ResearchRequest, key="request_id", partitions=3)
findings = Topic("demo.findings", Findings, key="request_id", partitions=3)
drafts = Topic("demo.drafts", Draft, key="request_id", partitions=3)
articles = Topic("demo.articles", Article, key="request_id", partitions=3)
fact_checks = Topic("demo.fact-checks", FactCheck, key="request_id", partitions=3)
