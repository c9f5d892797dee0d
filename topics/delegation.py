"""Topics of the delegation example: a coordinator plans reports, specialists write them.

``examples/delegation.py`` runs it: a request is planned into research (two
researchers in parallel) -> analysis (a checkpoint, where the reviewer adds a fact
check) -> writing. Every topic is keyed by workflow id except the task topics, which
are keyed by ``<workflow>/<step>`` so parallel steps spread over partitions.
"""

from __future__ import annotations

from pydantic import BaseModel

from mesh.patterns.delegation.coordinator import DelegationTopics


class ReportRequest(BaseModel):
    """Someone wants a report on ``subject``; ``workflow_id`` names the workflow."""

    workflow_id: str
    subject: str
    audience: str = "general"


SPECIALISTS = ("researcher", "analyst", "fact-checker", "writer")

delegation = DelegationTopics.named("delegation", ReportRequest, specialists=SPECIALISTS)
