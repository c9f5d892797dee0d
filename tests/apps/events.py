"""The event-driven example's bus and listeners on this test's topics (``<prefix>.events.*``).

``MESH_TEST_PREFIX`` names the topics and agents at import, so a subprocess (``mesh tap
... -t tests.apps.events``, ``mesh run tests.apps.events:writer``) uses the test's own;
in-process tests call :func:`build` with their prefix.
"""

from __future__ import annotations

import os
from typing import Any

from examples.events import MAX_REVISIONS, build_agents
from mesh import Agent
from mesh.patterns.events import EventBus
from topics.events import build_bus


def build(prefix: str, *, max_revisions: int = MAX_REVISIONS
          ) -> tuple[EventBus, list[Agent[Any]]]:
    """A fresh content bus under ``<prefix>.events`` and its four listeners."""
    bus = build_bus(f"{prefix}.events", agent_prefix=f"{prefix}-")
    return bus, build_agents(bus, max_revisions=max_revisions)


PREFIX = os.environ.get("MESH_TEST_PREFIX", "content")
bus, (writer, reviewer, editor, publisher) = build(PREFIX)
app = bus.app
