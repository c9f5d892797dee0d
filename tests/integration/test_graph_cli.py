"""`mesh graph` driven as a user types it: one subprocess per command, no broker (the
picture comes from the declarations). SVG and PNG go through the renderer of the
``graph`` extra (graphviz-pure), which the ``test`` extra installs too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from mesh.views.graph import find_renderer
from tests.conftest import ROOT

CLI_TIMEOUT_S = 60.0
DEMO_AGENTS = ("researcher", "writer", "editor", "fact_checker")  # as demo-<name>
DEMO_ENDS = ("--source", "demo.requests", "--sink", "demo.articles", "--sink",
             "demo.fact-checks")


def mesh_graph(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "mesh.cli", "graph", *args], cwd=ROOT,
                          env=env, capture_output=True, timeout=CLI_TIMEOUT_S, check=False)


def warnings_of(done: subprocess.CompletedProcess[bytes]) -> list[str]:
    return [line for line in done.stderr.decode().splitlines() if line.startswith("warning:")]


def test_demo_app_prints_mermaid_with_every_agent_and_the_fan_out() -> None:
    done = mesh_graph("examples.chain_fanout:app")

    assert done.returncode == 0, done.stderr.decode()
    text = done.stdout.decode()
    assert text.splitlines()[0] == "flowchart LR"
    for name in DEMO_AGENTS:
        agent = f"demo-{name.replace('_', '-')}"
        assert re.search(rf'^    a_demo_{name}\("{agent}<br/>group: {agent}"\):::agent$', text,
                         re.MULTILINE)
    edges = set(re.findall(r"^    (\w+) -->(?:\|[^|]*\|)? (\w+)$", text, re.MULTILINE))
    assert {("t_demo_findings", "a_demo_writer"), ("t_demo_findings", "a_demo_fact_checker"),
            ("t_demo_requests", "a_demo_researcher"), ("a_demo_editor", "t_demo_articles")
            } <= edges
    assert '-->|"+2 retry tiers"| a_demo_researcher' in text  # the default retry policy
    # the demo app declares its ends (App(sources=, sinks=)): nothing to warn about
    assert warnings_of(done) == []
    assert "fed from outside" in text and "read outside" in text


def test_strict_fails_on_warnings_and_passes_once_the_ends_are_declared() -> None:
    alone = mesh_graph("examples.chain_fanout:researcher", "--strict")  # one agent, no app: no ends
    assert alone.returncode == 1
    warnings = warnings_of(alone)
    assert any("demo-researcher consumes 'demo.requests'" in w for w in warnings)
    assert any("'demo.findings' is produced by demo-researcher" in w for w in warnings)

    declared = mesh_graph("examples.chain_fanout:researcher", "--strict",
                          "--source", "demo.requests", "--sink", "demo.findings")
    assert declared.returncode == 0, declared.stderr.decode()
    assert warnings_of(declared) == []
    assert "fed from outside" in declared.stdout.decode()


def test_without_target_it_draws_the_agents_package() -> None:
    """Pass: the default draws the reference mesh of agents/, every agent under its own
    name."""
    default = mesh_graph()

    assert default.returncode == 0, default.stderr.decode()
    text = default.stdout.decode()
    for name in ("a_coordinator", "a_researcher", "a_analyst", "a_coder", "a_writer",
                 "a_reviewer"):
        assert f"    {name}(" in text, name


def test_the_reference_mesh_draws_coordinator_and_specialists() -> None:
    done = mesh_graph("agents.app:app", "--format", "dot")

    assert done.returncode == 0, done.stderr.decode()
    text = done.stdout.decode()
    assert text.startswith("digraph mesh {")
    for name in ("coordinator", "researcher", "analyst", "coder", "writer", "reviewer"):
        assert f"    a_{name} [" in text
    assert "    t_writing_tasks_writer -> a_writer [label=\"+2 retry tiers\"];" in text
    assert "    a_coordinator -> t_writing_workflows [" in text  # its state


def test_svg_is_xml_naming_every_agent(tmp_path: Path) -> None:
    assert find_renderer() is not None, "install the test extra: pip install -e '.[test]'"
    out = tmp_path / "mesh.svg"

    done = mesh_graph("examples.chain_fanout:app", "--format", "svg", "--out", str(out), *DEMO_ENDS)

    assert done.returncode == 0, done.stderr.decode()
    assert f"wrote {out}" in done.stderr.decode()
    root = ET.parse(out).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")}
    names = {f"demo-{name.replace('_', '-')}" for name in DEMO_AGENTS}
    assert {*names, "demo.findings", "group: demo-writer"} <= texts


def test_png_to_a_file(tmp_path: Path) -> None:
    out = tmp_path / "mesh.png"

    done = mesh_graph("examples.chain_fanout:app", "-f", "png", "-o", str(out), "--dead-letters")

    assert done.returncode == 0, done.stderr.decode()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_target_and_unknown_topic_are_errors_that_say_what_to_fix() -> None:
    missing = mesh_graph("no_such_module:app")
    assert missing.returncode == 1
    assert "Cannot import 'no_such_module'" in missing.stderr.decode()

    typo = mesh_graph("examples.chain_fanout:app", "--source", "demo.requestz")
    assert typo.returncode == 1
    assert "--source demo.requestz: no such topic" in typo.stderr.decode()
