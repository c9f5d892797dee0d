"""The topology of the mesh, from its declarations: what ``mesh graph`` draws.

Nodes are the agents (labelled with their consumer group) and the topics they touch;
edges say who consumes what (topic -> agent) and who produces what (agent -> topic).
Nothing is read from a broker: the picture is what the code declares, so it can be
drawn (and checked in CI with ``mesh graph --strict``) before anything runs.

Two things are flagged, as warnings:

* **a topic nobody consumes**: an agent writes it (or it is declared) but no agent reads
  it. Final outputs that a system outside the mesh reads are legitimate: declare them
  with ``sinks=`` (``mesh graph --sink TOPIC``). Dead-letter topics (read by people,
  with ``mesh dlq``) and ``mesh.audit`` (a tap for any tool) are never flagged.
* **agents consuming a topic nobody produces**: no agent writes it, so an outside
  producer (``mesh emit``, an :class:`~mesh.runtime.emitter.Emitter`, any Kafka client) must.
  That is how requests enter the mesh, so it is a warning, not an error; declare such
  topics with ``sources=`` (``mesh graph --source TOPIC``) to say it is intended.

What the full model holds beside consumes/produces, and what :meth:`Topology.view`
shows by default:

* retry tiers (``<topic>.retry.N``, written and read by the same agent): collapsed into
  the consume edge's label (``+2 retry tiers``); ``retries=True`` draws them;
* dead-letter topics (``<topic>.dlq``): summarised in the topic's label (``+ .dlq``);
  ``dead_letters=True`` draws them with a dotted edge from each agent that may write one;
* ``mesh.audit``: every agent writes it (the runtime does), so it would connect to
  everything; hidden unless ``audit=True`` (an agent that consumes it shows it anyway);
* state tables (compacted topics an agent rebuilds from and writes): a two-way dotted
  edge, always shown, never flagged.

Drawing a topology (Mermaid, DOT, SVG/PNG) is :mod:`mesh.views.drawing`'s job; its
names stay importable from here, and :func:`draw` does both for ``mesh graph``.

Example:
    >>> from pydantic import BaseModel
    >>> from mesh.agent import agent
    >>> from mesh.topic import Topic
    >>> class Q(BaseModel):
    ...     qid: str
    >>> asks, answers = Topic("qa.asks", Q, key="qid"), Topic("qa.answers", Q, key="qid")
    >>> @agent(consumes=asks, produces=answers)
    ... async def answerer(q: Q, ctx): return q
    >>> topology = build_topology([answerer], sinks=["qa.answers"])
    >>> [flag.kind for flag in topology.flags]
    ['unproduced']
    >>> print(to_mermaid(topology.view()).splitlines()[0])
    flowchart LR
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from mesh.agent import Agent, App
from mesh.errors import ConfigError
from mesh.runtime.audit import audit_topic
from mesh.runtime.retry import is_retry_topic, origin_of
from mesh.topic import DLQ_SUFFIX, Topic, collect_topics, discover_topics
from mesh.views.drawing import (
    EXTRA_HINT,
    FORMATS,
    RENDER_TIMEOUT_S,
    RENDERERS,
    find_renderer,
    render,
    render_image,
    to_dot,
    to_mermaid,
)

__all__ = [  # the drawing names live in mesh.views.drawing; importable here as before
    "DEFAULT_TARGET", "EXTRA_HINT", "FORMATS", "RENDERERS", "RENDER_TIMEOUT_S", "AgentNode",
    "Edge", "EdgeKind", "Flag", "TopicKind", "TopicNode", "Topology", "build_topology",
    "collect", "draw", "find_renderer", "load_target", "render", "render_image", "to_dot",
    "to_mermaid"]

logger = logging.getLogger(__name__)

TopicKind = Literal["topic", "retry", "dead_letter", "audit"]
EdgeKind = Literal["consumes", "produces", "state", "retry", "dead_letter", "audit"]
DEFAULT_TARGET = "agents"


@dataclass(frozen=True, slots=True)
class TopicNode:
    """A topic in the picture. ``origin`` is the topic a retry tier or dead-letter
    topic belongs to; ``source``/``sink`` mark topics fed or read from outside."""

    name: str
    model: str
    partitions: int
    kind: TopicKind = "topic"
    compacted: bool = False
    dead_letters: bool = False
    origin: str = ""
    source: bool = False
    sink: bool = False


@dataclass(frozen=True, slots=True)
class AgentNode:
    """An agent: its name, consumer group, and how many replicas the target declares."""

    name: str
    group: str
    description: str = ""
    replicas: int = 1


@dataclass(frozen=True, slots=True)
class Edge:
    """A link between an agent and a topic. ``consumes`` points topic -> agent, ``state``
    both ways, every other kind agent -> topic."""

    agent: str
    topic: str
    kind: EdgeKind
    label: str = ""


@dataclass(frozen=True, slots=True)
class Flag:
    """A wiring warning: ``unconsumed`` (``agents`` = its producers) or ``unproduced``
    (``agents`` = its consumers)."""

    kind: Literal["unconsumed", "unproduced"]
    topic: str
    agents: tuple[str, ...]

    @property
    def message(self) -> str:
        names = ", ".join(self.agents)
        if self.kind == "unproduced":
            who = f"agent {names} consumes" if len(self.agents) == 1 else f"agents {names} consume"
            return (f"{who} {self.topic!r}, which no agent produces: an outside producer "
                    "(mesh emit, an Emitter) must feed it. If that is intended, declare it "
                    f"with --source {self.topic}.")
        if not self.agents:
            return (f"topic {self.topic!r} is declared but no agent produces or consumes it: "
                    "wire an agent to it or drop the declaration.")
        return (f"topic {self.topic!r} is produced by {names} but no agent consumes it. "
                f"If a system outside the mesh reads it, declare it with --sink {self.topic}.")


@dataclass(frozen=True, slots=True)
class Topology:
    """Agents, topics, edges and the wiring flags (computed on the full model)."""

    agents: tuple[AgentNode, ...]
    topics: tuple[TopicNode, ...]
    edges: tuple[Edge, ...]
    flags: tuple[Flag, ...] = ()

    def topic(self, name: str) -> TopicNode:
        found = next((t for t in self.topics if t.name == name), None)
        if found is None:
            raise ConfigError(f"No topic {name!r} in the graph: known are "
                              f"{', '.join(t.name for t in self.topics)}.")
        return found

    def view(self, *, retries: bool = False, dead_letters: bool = False,
             audit: bool = False) -> Topology:
        """What to draw: retry tiers collapsed, dead letters and audit hidden unless
        asked for. Flags are kept as computed on the full model."""
        kinds = {t.name: t for t in self.topics}
        hidden = {k for k, on in (("retry", retries), ("dead_letter", dead_letters),
                                  ("audit", audit)) if not on}
        tiers: dict[tuple[str, str], int] = {}
        for e in self.edges:
            if e.kind == "retry":
                key = (e.agent, kinds[e.topic].origin)
                tiers[key] = tiers.get(key, 0) + 1
        edges = []
        for e in self.edges:
            if e.kind in hidden or (not retries and kinds[e.topic].kind == "retry"):
                continue
            count = tiers.get((e.agent, e.topic), 0) if e.kind == "consumes" else 0
            if count and not retries:
                e = replace(e, label=f"+{count} retry tier{'s' if count > 1 else ''}")
            edges.append(e)
        used = {e.topic for e in edges}
        topics = tuple(t for t in self.topics if t.kind == "topic" or t.name in used)
        return replace(self, topics=topics, edges=tuple(edges))


def build_topology(agents: Iterable[Agent[Any]], *, topics: Iterable[Topic[Any]] = (),
                   sources: Iterable[str] = (), sinks: Iterable[str] = ()) -> Topology:
    """The full topology of ``agents`` plus the declared ``topics`` (which may be unused:
    they are flagged then). ``sources``/``sinks`` name topics fed or read from outside.

    Two different agents with one name are replicas when they are wired the same way
    (one node, ``replicas`` counted), else a :class:`ConfigError`.
    """
    nodes, declared = _agents(agents)
    by_name = collect_topics([*topics, *(t for a in declared for t in a.all_topics)])
    names = list(by_name)  # first-seen order: a chain reads left to right
    edges: dict[Edge, None] = {}
    for item in declared:
        for edge in _edges_of(item):
            edges.setdefault(edge)
            names.append(edge.topic)
    outside = {"source": set(sources), "sink": set(sinks)}
    for what, wanted in outside.items():
        unknown = sorted(wanted - set(names))
        if unknown:
            known = sorted(n for n in set(names) if n in by_name and n != audit_topic.name)
            raise ConfigError(f"--{what} {', '.join(unknown)}: no such topic in the graph "
                              f"(known: {', '.join(known)}). Fix the name.")
    topic_nodes = tuple(_topic_node(name, by_name, outside) for name in dict.fromkeys(names))
    return Topology(nodes, topic_nodes, tuple(edges), _flags(topic_nodes, tuple(edges)))


def _agents(agents: Iterable[Agent[Any]]) -> tuple[tuple[AgentNode, ...], list[Agent[Any]]]:
    first: dict[str, Agent[Any]] = {}
    replicas: dict[str, list[Agent[Any]]] = {}
    for item in agents:
        known = first.setdefault(item.name, item)
        copies = replicas.setdefault(item.name, [])
        if any(c is item for c in copies):
            continue
        if _wiring(known) != _wiring(item):
            raise ConfigError(f"Two different agents are named {item.name!r}: {known!r} and "
                              f"{item!r}. Agent names are consumer groups: rename one.")
        copies.append(item)
    nodes = tuple(AgentNode(a.name, a.group, a.description.splitlines()[0] if a.description
                            else "", len(replicas[a.name])) for a in first.values())
    return nodes, list(first.values())


def _wiring(item: Agent[Any]) -> tuple[Any, ...]:
    return (item.group, [t.name for t in item.all_topics])


def _edges_of(item: Agent[Any]) -> Iterator[Edge]:
    name = item.name
    for topic in item.consumes:
        yield Edge(name, topic.name, "consumes")
    for tier in item.retry_topics:
        yield Edge(name, tier.name, "retry")
        yield Edge(name, tier.name, "consumes", label=f"tier {tier.name.rsplit('.', 1)[1]}")
    for topic in item.consumes:
        if topic.dead_letters:
            yield Edge(name, topic.dlq_name, "dead_letter")
    for topic in item.produces:
        yield Edge(name, topic.name, "produces")
    for topic in item.state:
        yield Edge(name, topic.name, "state")
    yield Edge(name, audit_topic.name, "audit")  # the runtime audits every input and output


def _topic_node(name: str, declared: dict[str, Topic[Any]],
                outside: dict[str, set[str]]) -> TopicNode:
    kind: TopicKind = "topic"
    origin = ""
    if name == audit_topic.name:
        kind = "audit"
    elif is_retry_topic(name):
        kind, origin = "retry", origin_of(name)
    elif name.endswith(DLQ_SUFFIX) and name.removesuffix(DLQ_SUFFIX) in declared:
        kind, origin = "dead_letter", name.removesuffix(DLQ_SUFFIX)
    topic = declared.get(name) or declared.get(origin) or audit_topic
    return TopicNode(name, topic.model.__name__ if kind != "dead_letter" else "dead letters",
                     topic.partitions, kind, topic.compacted and kind == "topic",
                     topic.dead_letters and kind == "topic", origin,
                     name in outside["source"], name in outside["sink"])


def _flags(topics: tuple[TopicNode, ...], edges: tuple[Edge, ...]) -> tuple[Flag, ...]:
    readers: dict[str, list[str]] = {}
    writers: dict[str, list[str]] = {}
    for e in edges:
        if e.kind in ("consumes", "state"):
            readers.setdefault(e.topic, []).append(e.agent)
        if e.kind != "consumes":
            writers.setdefault(e.topic, []).append(e.agent)
    flags = []
    for t in topics:
        if t.kind == "topic" and t.name not in readers and not t.sink:
            flags.append(Flag("unconsumed", t.name, tuple(dict.fromkeys(writers.get(t.name, [])))))
        if t.name in readers and t.name not in writers and not t.source:
            flags.append(Flag("unproduced", t.name, tuple(dict.fromkeys(readers[t.name]))))
    return tuple(flags)


# --- what to draw: resolving a target ---------------------------------------------


def load_target(spec: str | None) -> Any:
    """The object named by ``module:attribute``, or the module itself for ``module``
    (default: the ``agents`` package). The current directory is importable, as for
    ``mesh run``."""
    module_name, _, attr = (spec or DEFAULT_TARGET).partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise
        raise ConfigError(f"Cannot import {module_name!r} to draw: {exc}. Run from the "
                          "project root, or pass TARGET as module:app.") from exc
    for part in filter(None, attr.split(".")):
        if not hasattr(obj, part):
            raise ConfigError(f"{spec}: {type(obj).__name__} {getattr(obj, '__name__', obj)!r}"
                              f" has no attribute {part!r}. Name an agent or an app.")
        obj = getattr(obj, part)
    return obj


def collect(target: Any) -> tuple[list[Agent[Any]], list[Topic[Any]]]:
    """The agents of ``target`` and the extra topics its apps declare.

    ``target`` may be an :class:`Agent`, an :class:`App`, a pattern object with an
    ``app`` or ``agent`` (a ``Chain``, ``Pipeline``, ``Supervisor``, ``WorkerService``,
    ``EventBus``), a list of those, a function returning them (called with no
    arguments), or a module: then every agent or
    app at module level in it and its submodules (functions are not called).
    """
    found = list(_walk_target(target, explicit=True))
    agents = [x for x in found if isinstance(x, Agent)]
    if not agents:
        what = getattr(target, "__name__", None) or f"a {type(target).__name__}"
        raise ConfigError(f"No agents found in {what}: name an Agent, an App, a pattern "
                          "object with .app/.agent, or a module declaring them at module "
                          "level (module:app).")
    return agents, [x for x in found if isinstance(x, Topic)]


def _apps(obj: Any) -> Iterator[App]:
    """The apps in ``obj`` (an app, a module, a list, a pattern object with ``.app``)."""
    if isinstance(obj, App):
        yield obj
    elif isinstance(obj, ModuleType):
        for module in _modules(obj):
            yield from (v for v in list(vars(module).values()) if isinstance(v, App))
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            yield from _apps(item)
    elif isinstance(getattr(obj, "app", None), App):
        yield obj.app


def _walk_target(obj: Any, *, explicit: bool) -> Iterator[Agent[Any] | Topic[Any]]:
    if isinstance(obj, Agent):
        yield obj
    elif isinstance(obj, App):
        yield from obj.agents
        yield from obj.topics.values()
    elif isinstance(obj, ModuleType):
        for module in _modules(obj):
            for value in list(vars(module).values()):
                if not isinstance(value, (ModuleType, type)):
                    yield from _walk_target(value, explicit=False)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            yield from _walk_target(item, explicit=explicit)
    elif isinstance(obj, type):
        return
    elif isinstance(getattr(obj, "app", None), App):
        yield from _walk_target(obj.app, explicit=False)
    elif isinstance(getattr(obj, "agent", None), Agent):
        yield obj.agent
    elif explicit and callable(obj):  # a factory of agents
        yield from _walk_target(obj(), explicit=False)


def _modules(module: ModuleType) -> Iterator[ModuleType]:
    yield module
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), module.__name__ + "."):
        yield importlib.import_module(info.name)


def draw(target: str | None, *, fmt: str = "mermaid", topic_modules: Iterable[str] = (),
         sources: Iterable[str] = (), sinks: Iterable[str] = (), retries: bool = False,
         dead_letters: bool = False, audit: bool = False) -> tuple[bytes, tuple[Flag, ...]]:
    """What ``mesh graph`` does: load ``target``, build its topology (plus every topic
    declared in ``topic_modules``), and render the default view in ``fmt``.

    Example:
        >>> data, flags = draw("examples.chain_fanout:app")  # doctest: +SKIP
        >>> data.decode().splitlines()[0]  # doctest: +SKIP
        'flowchart LR'
    """
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown --format {fmt!r}: use one of {', '.join(FORMATS)}.")
    loaded = load_target(target)
    agents, extra = collect(loaded)
    modules = list(topic_modules)
    declared = list(discover_topics(*modules).values()) if modules else []
    apps = list(_apps(loaded))  # their declared ends (App(sources=, sinks=)) count too
    sources = [*sources, *(t.name for app in apps for t in app.sources)]
    sinks = [*sinks, *(t.name for app in apps for t in app.sinks)]
    topology = build_topology(agents, topics=[*extra, *declared], sources=sources, sinks=sinks)
    view = topology.view(retries=retries, dead_letters=dead_letters, audit=audit)
    return render(view, fmt), topology.flags
