"""Unit tests for mesh.views.graph and mesh.views.drawing: the topology model, its
flags, the views and the Mermaid / DOT text. No broker, no renderer (the SVG path is in
tests/integration/test_graph_cli.py)."""

from __future__ import annotations

import doctest
import re
import sys
from typing import Any

import pytest
from pydantic import BaseModel

from mesh.agent import Agent, App, Context
from mesh.errors import ConfigError
from mesh.views import drawing, graph
from mesh.views.graph import Topology, build_topology, collect, to_dot, to_mermaid
from mesh.patterns.chain import Chain
from mesh.policy import RetryPolicy
from mesh.topic import Topic


class Doc(BaseModel):
    doc_id: str
    text: str = ""


def topic(name: str, **options: Any) -> Topic[Doc]:
    return Topic(f"g.{name}", Doc, key="doc_id", **options)


raw, clean, tagged, orphan, unfed, table = (
    topic("raw"), topic("clean"), topic("tagged"), topic("orphan"), topic("unfed"),
    topic("table", compacted=True))


async def _same(doc: Doc, ctx: Context) -> Doc:
    return doc


def make(name: str, consumes: Topic[Any] | list[Topic[Any]],
         produces: Topic[Any] | list[Topic[Any]] = (), **options: Any) -> Agent[Any]:
    return Agent(name, consumes=consumes, produces=produces, handler=_same, **options)


cleaner = make("cleaner", raw, clean)
tagger = make("tagger", clean, tagged)
archiver = make("archiver", tagged, description="Archives tagged docs.\nSecond line.")
# A chain raw -> cleaner -> clean -> tagger -> tagged -> archiver, plus two defects:
# a writer of g.orphan that nobody reads, a reader of g.unfed that nobody writes.
leaky = make("leaky", clean, orphan)
starved = make("starved", unfed, tagged)


def flags_of(topology: Topology) -> set[tuple[str, str, tuple[str, ...]]]:
    return {(f.kind, f.topic, f.agents) for f in topology.flags}


# --- the model and its flags --------------------------------------------------------


def test_orphaned_topic_and_unproduced_input_are_both_flagged() -> None:
    topology = build_topology([cleaner, tagger, archiver, leaky, starved],
                              sources=["g.raw"])

    assert flags_of(topology) == {("unconsumed", "g.orphan", ("leaky",)),
                                  ("unproduced", "g.unfed", ("starved",))}
    messages = {f.topic: f.message for f in topology.flags}
    assert "--sink g.orphan" in messages["g.orphan"] and "leaky" in messages["g.orphan"]
    assert "--source g.unfed" in messages["g.unfed"]
    assert "agent starved consumes" in messages["g.unfed"]


def test_clean_chain_with_declared_ends_has_no_flags() -> None:
    topology = build_topology([cleaner, tagger, archiver], sources=["g.raw"])

    assert topology.flags == ()
    assert topology.topic("g.raw").source and not topology.topic("g.tagged").sink


def test_chain_without_declared_ends_flags_only_its_entry() -> None:
    # archiver reads the tail, so only the entry (fed by an Emitter) is left
    topology = build_topology([cleaner, tagger, archiver])

    assert flags_of(topology) == {("unproduced", "g.raw", ("cleaner",))}


def test_the_consumers_of_an_unproduced_topic_are_listed_in_one_flag() -> None:
    twin = make("twin", raw, clean)
    topology = build_topology([cleaner, twin, tagger, archiver])

    (flag,) = topology.flags
    assert flag.agents == ("cleaner", "twin")
    assert flag.message.startswith("agents cleaner, twin consume 'g.raw'")


def test_declared_topic_nobody_uses_is_flagged() -> None:
    topology = build_topology([cleaner, tagger, archiver], topics=[orphan],
                              sources=["g.raw"])

    (flag,) = topology.flags
    assert (flag.kind, flag.topic, flag.agents) == ("unconsumed", "g.orphan", ())
    assert "declared but no agent produces or consumes it" in flag.message


def test_sink_silences_an_unconsumed_topic() -> None:
    wired = [cleaner, leaky]  # leaky reads g.clean and writes g.orphan

    assert flags_of(build_topology(wired, sources=["g.raw"])) == {
        ("unconsumed", "g.orphan", ("leaky",))}
    declared = build_topology(wired, sources=["g.raw"], sinks=["g.orphan"])
    assert declared.flags == ()
    assert declared.topic("g.orphan").sink
    assert "read outside" in to_mermaid(declared.view())


def test_unknown_source_or_sink_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"--source g\.nope: no such topic.*g\.raw"):
        build_topology([cleaner], sources=["g.nope"])
    with pytest.raises(ConfigError, match=r"--sink g\.typo"):
        build_topology([cleaner], sinks=["g.typo"])


def test_dead_letters_audit_state_and_retry_tiers_are_never_flagged() -> None:
    retrying = make("retrying", raw, clean, retry=RetryPolicy(attempts=3), state=[table])
    topology = build_topology([retrying, tagger, archiver], sources=["g.raw"])

    assert topology.flags == ()
    kinds = {t.name: t.kind for t in topology.topics}
    assert kinds["g.raw.dlq"] == "dead_letter" and kinds["mesh.audit"] == "audit"
    assert kinds["g.raw.retry.1"] == kinds["g.raw.retry.2"] == "retry"
    assert kinds["g.table"] == "topic" and topology.topic("g.table").compacted


def test_agent_consuming_the_audit_topic_is_fed_by_every_agent() -> None:
    from mesh.runtime.audit import audit_topic

    auditor = Agent("auditor", consumes=Topic(audit_topic.name, audit_topic.model,
                                              key=audit_topic.key, partitions=3,
                                              retention_ms=audit_topic.retention_ms),
                    handler=_same)
    topology = build_topology([cleaner, tagger, archiver, auditor], sources=["g.raw"])

    assert topology.flags == ()
    # it reads mesh.audit explicitly, so the default view keeps that node and edge
    view = topology.view()
    assert "mesh.audit" in {t.name for t in view.topics}
    assert {(e.agent, e.kind) for e in view.edges if e.topic == "mesh.audit"} == {
        ("auditor", "consumes")}


def test_edges_go_topic_to_agent_for_consumes_and_agent_to_topic_for_produces() -> None:
    topology = build_topology([cleaner, tagger]).view()

    assert {(e.agent, e.topic, e.kind) for e in topology.edges} == {
        ("cleaner", "g.raw", "consumes"), ("cleaner", "g.clean", "produces"),
        ("tagger", "g.clean", "consumes"), ("tagger", "g.tagged", "produces")}
    assert [a.name for a in topology.agents] == ["cleaner", "tagger"]
    assert [t.name for t in topology.topics] == ["g.raw", "g.clean", "g.tagged"]


def test_agent_node_carries_its_consumer_group_and_first_description_line() -> None:
    grouped = make("grouped", raw, clean, group="cleaners", description="Cleans.\nMore.")
    (node,) = build_topology([grouped]).agents

    assert (node.name, node.group, node.description) == ("grouped", "cleaners", "Cleans.")


def test_replicas_of_one_agent_are_one_node_and_a_clash_is_an_error() -> None:
    replica = make("cleaner", raw, clean)
    (node,) = build_topology([cleaner, replica, cleaner]).agents
    assert node.replicas == 2

    impostor = make("cleaner", clean, tagged)
    with pytest.raises(ConfigError, match="Two different agents are named 'cleaner'"):
        build_topology([cleaner, impostor])


# --- views ------------------------------------------------------------------------


def test_default_view_collapses_retry_tiers_into_the_consume_edge() -> None:
    retrying = make("retrying", raw, clean, retry=RetryPolicy(attempts=3))
    full = build_topology([retrying])

    collapsed = full.view()
    assert {t.name for t in collapsed.topics} == {"g.raw", "g.clean"}
    (consume,) = [e for e in collapsed.edges if e.kind == "consumes"]
    assert (consume.topic, consume.label) == ("g.raw", "+2 retry tiers")

    expanded = full.view(retries=True)
    assert {"g.raw.retry.1", "g.raw.retry.2"} <= {t.name for t in expanded.topics}
    assert ("retrying", "g.raw.retry.2", "retry") in {
        (e.agent, e.topic, e.kind) for e in expanded.edges}
    assert collapsed.flags == expanded.flags == full.flags


def test_dead_letters_are_summarised_unless_asked_for() -> None:
    full = build_topology([cleaner])

    summarised = full.view()
    assert "g.raw.dlq" not in {t.name for t in summarised.topics}
    assert summarised.topics[0].dead_letters  # the label says "+ .dlq"
    assert "+ .dlq" in to_mermaid(summarised)

    drawn = full.view(dead_letters=True)
    assert ("cleaner", "g.raw.dlq", "dead_letter") in {
        (e.agent, e.topic, e.kind) for e in drawn.edges}
    assert "mesh.audit" not in {t.name for t in drawn.topics}
    assert "mesh.audit" in {t.name for t in full.view(audit=True).topics}


def test_state_topic_is_a_two_way_edge() -> None:
    stateful = make("stateful", raw, clean, state=[table])
    view = build_topology([stateful]).view()

    assert ("stateful", "g.table", "state") in {(e.agent, e.topic, e.kind) for e in view.edges}
    assert re.search(r"^\s+a_stateful <-\.->\|\"state\"\| t_g_table$", to_mermaid(view), re.MULTILINE)
    assert re.search(r"^\s+a_stateful -> t_g_table \[.*dir=both", to_dot(view), re.MULTILINE)


# --- Mermaid and DOT text -------------------------------------------------------------

NODE = re.compile(r'^    (?P<id>[at]_\w+)(?:\[\("(?P<topic>[^"]*)"\)\]|\("(?P<agent>[^"]*)"\))'
                  r":::(?P<cls>\w+)$")
EDGE = re.compile(r'^    (?P<a>\w+) (?P<arrow>-->|-\.->|<-\.->)(?:\|"(?P<label>[^"]*)"\|)? '
                  r"(?P<b>\w+)$")


def parse_mermaid(text: str) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """Node id -> label and the edges of a Mermaid flowchart; fails on a line it does
    not understand."""
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    nodes: dict[str, str] = {}
    edges = []
    for line in lines[1:]:
        if node := NODE.match(line):
            nodes[node["id"]] = node["topic"] or node["agent"]
        elif edge := EDGE.match(line):
            edges.append((edge["a"], edge["arrow"], edge["b"]))
        else:
            assert re.match(r"^    (%%|classDef |class )", line), f"unexpected line {line!r}"
    return nodes, edges


def test_mermaid_has_a_node_per_agent_and_topic_and_an_edge_per_link() -> None:
    topology = build_topology([cleaner, tagger, archiver, leaky, starved],
                              sources=["g.raw"]).view()
    nodes, edges = parse_mermaid(to_mermaid(topology))

    assert len(nodes) == len(topology.agents) + len(topology.topics) == 10
    assert nodes["a_cleaner"] == "cleaner<br/>group: cleaner"
    assert nodes["t_g_raw"].startswith("g.raw<br/>Doc<br/>3 partitions, + .dlq<br/>fed from")
    assert ("t_g_raw", "-->", "a_cleaner") in edges
    assert ("a_cleaner", "-->", "t_g_clean") in edges
    assert len(edges) == len(topology.edges)
    assert all(a in nodes and b in nodes for a, _, b in edges)


def test_mermaid_marks_the_flagged_topics() -> None:
    text = to_mermaid(build_topology([cleaner, leaky], sources=["g.raw"]).view())

    (marked,) = re.findall(r"^    class (\S+) flagged$", text, re.MULTILINE)
    assert set(marked.split(",")) == {"t_g_orphan"}


def test_mermaid_escapes_quotes_and_angle_brackets_in_labels() -> None:
    odd = make("odd", raw, clean, group='say "hi" <b>')
    text = to_mermaid(build_topology([odd]).view())
    nodes, _ = parse_mermaid(text)

    assert nodes["a_odd"] == "odd<br/>group: say #quot;hi#quot; #lt;b#gt;"


def test_node_ids_stay_unique_when_an_agent_and_topics_share_a_name() -> None:
    dotted, underscored = topic("x.y"), topic("x_y")
    same = Agent("g.x.y", consumes=dotted, produces=underscored, handler=_same)
    nodes, _ = parse_mermaid(to_mermaid(build_topology([same]).view()))

    assert len(nodes) == 3 and len(set(nodes)) == 3
    assert {"t_g_x_y", "t_g_x_y_2", "a_g_x_y"} == set(nodes)


def test_dot_declares_every_node_and_edge_with_escaped_labels() -> None:
    odd = make("odd", raw, clean, group='a "quoted" \\ group')
    text = to_dot(build_topology([odd, tagger]).view())

    assert text.startswith("digraph mesh {\n    rankdir=LR;") and text.endswith("}\n")
    ids = set(re.findall(r"^    ([at]_\w+) \[", text, re.MULTILINE))
    assert ids == {"a_odd", "a_tagger", "t_g_raw", "t_g_clean", "t_g_tagged"}
    edges = re.findall(r"^    (\w+) -> (\w+)", text, re.MULTILINE)
    assert ("t_g_raw", "a_odd") in edges and ("a_tagger", "t_g_tagged") in edges
    assert all(a in ids and b in ids for a, b in edges)
    assert 'label="odd\\ngroup: a \\"quoted\\" \\\\ group"' in text


# --- targets ------------------------------------------------------------------------


def test_collect_takes_an_app_with_its_extra_topics() -> None:
    app = App("g", agents=[cleaner, tagger], topics=[orphan])
    agents, topics = collect(app)

    assert agents == [cleaner, tagger]
    assert "g.orphan" in {t.name for t in topics}


def test_collect_takes_pattern_objects_lists_and_factories() -> None:
    async def step(doc: Doc, ctx: Context) -> Doc:
        return doc

    chain = Chain("gchain", [step], key="doc_id")

    assert collect(chain)[0] == chain.agents
    assert collect([cleaner, [tagger]])[0] == [cleaner, tagger]
    assert collect(lambda: App("g", agents=[archiver]))[0] == [archiver]


def test_collect_scans_a_module_without_calling_its_functions() -> None:
    agents, _ = collect(sys.modules[__name__])

    assert {a.name for a in agents} == {"cleaner", "tagger", "archiver", "leaky", "starved"}


def test_collect_with_no_agents_says_what_to_pass() -> None:
    with pytest.raises(ConfigError, match="No agents found in a dict"):
        collect({"not": "agents"})


def test_demo_app_graph_is_the_documented_chain_and_fan_out() -> None:
    agents, extra = collect(graph.load_target("examples.chain_fanout:app"))
    topology = build_topology(agents, topics=extra)
    consumes = {(e.topic, e.agent) for e in topology.edges if e.kind == "consumes"}

    assert {("demo.findings", "demo-writer"), ("demo.findings", "demo-fact-checker")} <= consumes
    assert flags_of(topology) == {
        ("unproduced", "demo.requests", ("demo-researcher",)),
        ("unconsumed", "demo.articles", ("demo-editor",)),
        ("unconsumed", "demo.fact-checks", ("demo-fact-checker",))}


def test_load_target_errors_name_the_target() -> None:
    with pytest.raises(ConfigError, match="Cannot import 'no_such_mesh_module'"):
        graph.load_target("no_such_mesh_module:app")
    with pytest.raises(ConfigError, match="examples.chain_fanout:nope.*no attribute 'nope'"):
        graph.load_target("examples.chain_fanout:nope")


@pytest.mark.parametrize(("module", "examples"), [(graph, 5), (drawing, 3)],
                         ids=["graph", "drawing"])
def test_module_docstring_example_runs(module: Any, examples: int) -> None:
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)[:2]

    assert tried >= examples and failures == 0


# --- renderer -----------------------------------------------------------------------


def test_missing_renderer_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(drawing, "RENDERERS", ("no-such-graphviz-here",))

    with pytest.raises(ConfigError, match=r"kafka-agent-mesh\[graph\]"):
        graph.render(build_topology([cleaner]).view(), "svg")
    # the text formats need no renderer
    assert graph.render(build_topology([cleaner]).view(), "dot").startswith(b"digraph")


def test_unknown_format_is_an_error_listing_the_formats() -> None:
    with pytest.raises(ConfigError, match="mermaid, dot, svg, png"):
        graph.render(build_topology([cleaner]), "jpeg")
