"""Drawing a mesh topology: Mermaid and Graphviz DOT text, and SVG/PNG pictures.

The picture of a :class:`~mesh.views.graph.Topology` (usually its
:meth:`~mesh.views.graph.Topology.view`): agents as rounded boxes labelled with their
consumer group, topics as cylinders (model, partitions, ``compacted``, ``+ .dlq``),
consume edges topic -> agent, produce edges agent -> topic, state tables as two-way
dotted edges, and every flagged topic with a red dashed border. Mermaid and DOT are plain
text; SVG and PNG are laid out by a Graphviz program run as a subprocess:
``graphviz-pure`` (the ``graph`` extra, a static ``dot`` in a wheel) or a system
Graphviz ``dot``. Nothing here reads a broker or imports the agents: that is
:mod:`mesh.views.graph`, whose :func:`~mesh.views.graph.draw` does both for
``mesh graph``.

Example:
    >>> from mesh.views.graph import AgentNode, Edge, TopicNode, Topology
    >>> topology = Topology(
    ...     agents=(AgentNode("answerer", "qa-answerer"),),
    ...     topics=(TopicNode("qa.asks", "Question", 3), TopicNode("qa.answers", "Answer", 3)),
    ...     edges=(Edge("answerer", "qa.asks", "consumes"),
    ...            Edge("answerer", "qa.answers", "produces")))
    >>> print(to_mermaid(topology))  # doctest: +ELLIPSIS
    flowchart LR
        %% mesh graph: 1 agent, 2 topics
        t_qa_asks[("qa.asks<br/>Question<br/>3 partitions")]:::topic
        t_qa_answers[("qa.answers<br/>Answer<br/>3 partitions")]:::topic
        a_answerer("answerer<br/>group: qa-answerer"):::agent
        t_qa_asks --> a_answerer
        a_answerer --> t_qa_answers
        classDef agent fill:#e3ecfa,stroke:#3367d6,color:#1a1a1a
    ...
    >>> to_dot(topology).splitlines()[-3]
    '    t_qa_asks -> a_answerer;'
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sysconfig
from typing import TYPE_CHECKING, Literal

from mesh.errors import ConfigError

if TYPE_CHECKING:  # the model imports this module to draw itself: no import at run time
    from mesh.views.graph import AgentNode, TopicNode, Topology

logger = logging.getLogger(__name__)

FORMATS = ("mermaid", "dot", "svg", "png")
RENDERERS = ("graphviz-pure", "dot")  # graphviz-pure first: the `graph` extra installs it
RENDER_TIMEOUT_S = 60.0
EXTRA_HINT = "pip install 'kafka-agent-mesh[graph]'"


def _ids(topology: Topology) -> dict[tuple[str, str], str]:
    """Stable, readable node ids (``a_writer``, ``t_demo_drafts``), unique even when an
    agent and a topic share a name."""
    ids: dict[tuple[str, str], str] = {}
    taken: set[str] = set()
    keys = [("agent", a.name) for a in topology.agents] + [("topic", t.name)
                                                            for t in topology.topics]
    for kind, name in keys:
        base = f"{kind[0]}_" + re.sub(r"[^A-Za-z0-9_]", "_", name)
        candidate, n = base, 1
        while candidate in taken:
            n += 1
            candidate = f"{base}_{n}"
        taken.add(candidate)
        ids[(kind, name)] = candidate
    return ids


def _topic_lines(t: TopicNode) -> list[str]:
    if t.kind == "dead_letter":
        return [t.name, f"dead letters of {t.origin}"]
    if t.kind == "retry":
        return [t.name, f"retry tier of {t.origin}"]
    extras = [_count(t.partitions, "partition")]
    extras += ["compacted"] * t.compacted + ["+ .dlq"] * t.dead_letters
    lines = [t.name, t.model, ", ".join(extras)]
    lines += ["fed from outside"] * t.source + ["read outside"] * t.sink
    return lines


def _agent_lines(a: AgentNode) -> list[str]:
    lines = [a.name, f"group: {a.group}"]
    return lines + ([f"{a.replicas} replicas"] if a.replicas > 1 else [])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _flagged(topology: Topology) -> set[str]:
    return {f.topic for f in topology.flags}


_MERMAID_ARROWS = {"consumes": "-->", "produces": "-->", "state": "<-.->", "retry": "-.->",
                   "dead_letter": "-.->", "audit": "-.->"}
_EDGE_LABELS = {"state": "state", "retry": "retry", "dead_letter": "dead letter"}
_COLOURS = {"agent": ("#e3ecfa", "#3367d6"), "topic": ("#fff5d6", "#b58900"),
            "retry": ("#f3f3f3", "#888888"), "dead_letter": ("#fde7e7", "#b3261e"),
            "audit": ("#eeeeee", "#666666")}


def _mermaid_text(text: str) -> str:
    return (text.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;")
            .replace(">", "#gt;"))


def to_mermaid(topology: Topology) -> str:
    """A Mermaid ``flowchart LR``: agents as rounded boxes, topics as cylinders, flagged
    topics with a red border. Paste it in a ```` ```mermaid ```` block."""
    ids = _ids(topology)
    counts = f"{_count(len(topology.agents), 'agent')}, {_count(len(topology.topics), 'topic')}"
    out = ["flowchart LR", f"    %% mesh graph: {counts}"]
    for t in topology.topics:
        label = "<br/>".join(_mermaid_text(x) for x in _topic_lines(t))
        out.append(f'    {ids[("topic", t.name)]}[("{label}")]:::{t.kind}')
    for a in topology.agents:
        label = "<br/>".join(_mermaid_text(x) for x in _agent_lines(a))
        out.append(f'    {ids[("agent", a.name)]}("{label}"):::agent')
    for e in topology.edges:
        agent_id, topic_id = ids[("agent", e.agent)], ids[("topic", e.topic)]
        first, second = (topic_id, agent_id) if e.kind == "consumes" else (agent_id, topic_id)
        text = e.label or _EDGE_LABELS.get(e.kind, "")
        label = f'|"{_mermaid_text(text)}"|' if text else ""
        out.append(f"    {first} {_MERMAID_ARROWS[e.kind]}{label} {second}")
    for kind, (fill, stroke) in _COLOURS.items():
        out.append(f"    classDef {kind} fill:{fill},stroke:{stroke},color:#1a1a1a")
    out.append("    classDef flagged stroke:#d93025,stroke-width:3px,stroke-dasharray:6 3")
    flagged = [ids[("topic", name)] for name in sorted(_flagged(topology))
               if ("topic", name) in ids]
    if flagged:
        out.append(f"    class {','.join(flagged)} flagged")
    return "\n".join(out) + "\n"


def _dot_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def to_dot(topology: Topology) -> str:
    """Graphviz DOT source for the same picture (``dot -Tsvg``, or ``--format svg``)."""
    ids = _ids(topology)
    flagged = _flagged(topology)
    out = ["digraph mesh {", "    rankdir=LR;",
           '    graph [fontname="Helvetica", fontsize=10, nodesep=0.3, ranksep=0.6];',
           '    node [fontname="Helvetica", fontsize=10];',
           '    edge [fontname="Helvetica", fontsize=9, color="#555555"];']
    for t in topology.topics:
        fill, stroke = _COLOURS[t.kind]
        style = "filled,dashed" if t.name in flagged else "filled"
        stroke, width = ("#d93025", 2.5) if t.name in flagged else (stroke, 1.0)
        out.append(f'    {ids[("topic", t.name)]} [shape=cylinder, style="{style}", '
                   f'fillcolor="{fill}", color="{stroke}", penwidth={width}, '
                   f'label="{_dot_text(chr(10).join(_topic_lines(t)))}"];')
    for a in topology.agents:
        fill, stroke = _COLOURS["agent"]
        out.append(f'    {ids[("agent", a.name)]} [shape=box, style="rounded,filled", '
                   f'fillcolor="{fill}", color="{stroke}", '
                   f'label="{_dot_text(chr(10).join(_agent_lines(a)))}", '
                   f'tooltip="{_dot_text(a.description or a.name)}"];')
    for e in topology.edges:
        agent_id, topic_id = ids[("agent", e.agent)], ids[("topic", e.topic)]
        first, second = (topic_id, agent_id) if e.kind == "consumes" else (agent_id, topic_id)
        attrs = []
        if e.kind not in ("consumes", "produces"):
            attrs.append("style=dashed")
        if e.kind == "state":
            attrs.append("dir=both")
        text = e.label or _EDGE_LABELS.get(e.kind, "")
        if text:
            attrs.append(f'label="{_dot_text(text)}"')
        out.append(f"    {first} -> {second}" + (f" [{', '.join(attrs)}]" if attrs else "") + ";")
    out.append("}")
    return "\n".join(out) + "\n"


def find_renderer() -> str | None:
    """The Graphviz program to lay out DOT: ``graphviz-pure`` (the ``graph`` extra; looked
    for beside this Python too, so an unactivated venv works), else Graphviz's ``dot``."""
    search = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    for name in RENDERERS:
        found = shutil.which(name, path=search)
        if found:
            return found
    return None


def render_image(dot: str, fmt: Literal["svg", "png"]) -> bytes:
    """Lay out ``dot`` with Graphviz and return the SVG or PNG bytes."""
    program = find_renderer()
    if program is None:
        raise ConfigError(f"--format {fmt} needs a Graphviz renderer, and none was found "
                          f"({' or '.join(RENDERERS)} beside Python or on PATH). Install the "
                          f"graph extra ({EXTRA_HINT}), or use --format mermaid or dot.")
    logger.debug("rendering %s with %s", fmt, program)
    try:
        done = subprocess.run([program, f"-T{fmt}"], input=dot.encode(), capture_output=True,
                              timeout=RENDER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"{program} did not lay out the graph within {RENDER_TIMEOUT_S:.0f}"
                          " s. Use --format dot and render it yourself.") from exc
    if done.returncode != 0 or not done.stdout:
        raise ConfigError(f"{program} -T{fmt} failed (exit {done.returncode}): "
                          f"{done.stderr.decode(errors='replace').strip()[:500]}. "
                          "Use --format dot to see the source it was given.")
    return done.stdout


def render(topology: Topology, fmt: str) -> bytes:
    """``topology`` in ``fmt`` (mermaid, dot, svg or png), as bytes to write."""
    if fmt == "mermaid":
        return to_mermaid(topology).encode()
    if fmt == "dot":
        return to_dot(topology).encode()
    if fmt in ("svg", "png"):
        return render_image(to_dot(topology), "svg" if fmt == "svg" else "png")
    raise ConfigError(f"Unknown --format {fmt!r}: use one of {', '.join(FORMATS)}.")
