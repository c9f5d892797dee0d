"""The writing mesh as one app: ``mesh dev agents.app:app`` runs every agent in one
process, ``mesh graph agents.app:app`` draws it; ``make demo`` runs each agent as its
own service (``mesh run agents.<name>:agent``)."""

from __future__ import annotations

from agents import analyst, coder, coordinator, researcher, reviewer, writer
from mesh import App
from topics.writing import writing

AGENTS = {m.agent.name: m for m in (coordinator, researcher, analyst, coder, writer, reviewer)}

# requests come from outside (mesh submit, an Emitter); outcomes and events are read
# outside (mesh submit --follow, a UI)
app = App("writing", agents=[m.agent for m in AGENTS.values()], sources=[writing.requests],
          sinks=[writing.outcomes, writing.events])
