"""Event types of the event-driven example (examples/events.py): requested -> created ->
reviewed -> approved or rejected (back to the writer, a bounded number of times) ->
published, or rejected for good. One topic per type (``events.<type>``, see
:mod:`mesh.patterns.events`), all keyed by ``request_id`` so one request's events share
a partition number.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from mesh.patterns.events import EventBus


class ContentRequested(BaseModel):
    """Someone (an existing system) wants an article covering ``must_cover``."""

    request_id: str
    subject: str
    must_cover: list[str] = Field(default_factory=list)
    audience: str = "general"


class Draft(BaseModel):
    """One version of the article; ``revision`` 0 is the first draft."""

    revision: int
    title: str
    body: str
    covered: list[str] = Field(default_factory=list)


class ContentCreated(BaseModel):
    """The writer produced a draft (a first one, or a revision answering notes)."""

    request_id: str
    request: ContentRequested
    draft: Draft


class ContentReviewed(BaseModel):
    """The reviewer's verdict on one draft; ``missing`` lists uncovered points."""

    request_id: str
    request: ContentRequested
    draft: Draft
    approved: bool
    missing: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class ContentApproved(BaseModel):
    """The editor accepted the draft for publication."""

    request_id: str
    draft: Draft


class ContentRejected(BaseModel):
    """The editor sent the draft back to the writer with the reviewer's notes."""

    request_id: str
    request: ContentRequested
    draft: Draft
    missing: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class ContentRejectedFinal(BaseModel):
    """Rejected for good: the draft still failed review after the last revision."""

    request_id: str
    revisions: int
    reason: str
    notes: list[str] = Field(default_factory=list)


class ContentPublished(BaseModel):
    """The article is out."""

    request_id: str
    title: str
    url: str
    revisions: int
    words: int


TYPES: dict[str, type[BaseModel]] = {
    "content_requested": ContentRequested,
    "content_created": ContentCreated,
    "content_reviewed": ContentReviewed,
    "content_approved": ContentApproved,
    "content_rejected": ContentRejected,
    "content_rejected_final": ContentRejectedFinal,
    "content_published": ContentPublished,
}


def build_bus(namespace: str = "events", *, agent_prefix: str = "") -> EventBus:
    """The content bus with its topics under ``namespace`` (tests use their own)."""
    return EventBus(namespace, TYPES, key="request_id", partitions=3,
                    agent_prefix=agent_prefix)


bus = build_bus()
